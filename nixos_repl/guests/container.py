"""The ``debian-container`` guest: the debian guest's root filesystem as systemd-nspawn containers.

No Nix: the root filesystem is the one the debian guest builder caches (``debian.py``), copied
once out of its ext4 image with ``debugfs rdump`` (no loop mount) into a directory beside it and
adapted to a container (no fstab, no backdoor or VLAN units, ``/bin/sh`` is bash as on NixOS,
where nixpkgs' command prelude needs ``set -o pipefail``). That directory is never written: each
container's ``run-<name>-nspawn`` script mounts an overlay over it, with the upper layer in the
container's state directory, inside a private mount namespace that dies with the container, so
two containers never write the same files and no mount outlives a container.

The scripts follow NixOS's container contract (nixpkgs' ``NspawnMachine``): they are started with
``RUN_NSPAWN_ROOT_DIR`` (the state directory), ``RUN_NSPAWN_SHARED_DIR`` (bound at
``/tmp/shared``) and ``NOTIFY_SOCKET`` and nothing else; systemd-nspawn sends
``X_NSPAWN_LEADER_PID=`` and, once the container's systemd is up, ``READY=1``. The journal is
persistent in ``$RUN_NSPAWN_ROOT_DIR/var/log/journal``, where the driver follows it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import GuestBuildError
from ..files import write_atomic
from .debian import _check_call, build_debian_image
from .tiny import check_names, render_template

__all__ = ["build_debian_container", "container_root"]

log = logging.getLogger(__name__)

CONTAINER_BUILDER_VERSION = "2"
# Units of the debian VM guest a container has no use for (no /dev/hvc0, no VLAN NICs).
MASKED_UNITS = ("backdoor.service", "vlan-addresses.service", "console-getty.service")

RUN_SCRIPT = r"""#!/bin/sh
# run-@NAME@-nspawn: the debian-container guest @NAME@ (nixos-repl), NixOS's container contract.
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "run-@NAME@-nspawn: containers need root" >&2
    exit 1
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if ! command -v systemd-nspawn >/dev/null 2>&1; then
    echo "run-@NAME@-nspawn: systemd-nspawn not found" \
        "(Debian: apt-get install systemd-container)" >&2
    exit 127
fi
: "${RUN_NSPAWN_ROOT_DIR:?run-@NAME@-nspawn: RUN_NSPAWN_ROOT_DIR is not set}"
: "${RUN_NSPAWN_SHARED_DIR:?run-@NAME@-nspawn: RUN_NSPAWN_SHARED_DIR is not set}"
mkdir -p "$RUN_NSPAWN_ROOT_DIR/var/log/journal" "$RUN_NSPAWN_SHARED_DIR" \
    "$RUN_NSPAWN_ROOT_DIR/.overlay/upper" "$RUN_NSPAWN_ROOT_DIR/.overlay/work" \
    "$RUN_NSPAWN_ROOT_DIR/.overlay/root"
# The overlay lives in a mount namespace of its own: it goes away with the container.
exec unshare --mount --propagation private /bin/sh -c '
set -eu
o=$RUN_NSPAWN_ROOT_DIR/.overlay
mount -t overlay overlay -o "lowerdir=@ROOT@,upperdir=$o/upper,workdir=$o/work" "$o/root"
exec systemd-nspawn --quiet --register=no --keep-unit --notify-ready=yes --console=passive \
    --private-network --machine=@NAME@ --directory="$o/root" \
    --bind="$RUN_NSPAWN_ROOT_DIR/var/log/journal:/var/log/journal" \
    --bind="$RUN_NSPAWN_SHARED_DIR:/tmp/shared" \
    --boot -- systemd.show_status=false
'
"""


def _key(image: Path) -> str:
    h = hashlib.sha256(f"debian-container-{CONTAINER_BUILDER_VERSION}\0{image}\n".encode())
    h.update(("\0".join(MASKED_UNITS) + "\n").encode())
    st = image.stat()
    h.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _restore_special_modes(debugfs: str, image: Path, root: Path) -> None:
    """Give back the setuid, setgid and sticky bits ``rdump`` drops (its chown after the chmod
    clears them): one ``debugfs`` run lists every directory of the image with its modes."""
    dirs = ["/"] + [
        "/" + str(Path(d).relative_to(root) / name)
        for d, names, _ in os.walk(root)
        for name in names
        if not (Path(d) / name).is_symlink()
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as commands:
        commands.write("".join(f'ls -p "{d}"\n' for d in dirs))
        commands.flush()
        listing = subprocess.run(
            [debugfs, "-f", commands.name, str(image)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        ).stdout
    directory = "/"
    for line in listing.splitlines():
        if line.startswith("debugfs: ls -p "):
            directory = line.removeprefix("debugfs: ls -p ").strip('"')
            continue
        fields = line.split("/")
        if len(fields) < 6 or not fields[2].isdigit():
            continue
        mode = int(fields[2], 8)
        if mode & 0o7000 and fields[5] not in (".", ".."):
            os.chmod(root / directory.lstrip("/") / fields[5], mode & 0o7777)


def _adapt(root: Path) -> None:
    """Turn the debian VM guest's tree into a container's."""
    (root / "etc/fstab").write_text("")  # nspawn mounts what a container needs
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    sh = root / "usr/bin/sh"
    sh.unlink(missing_ok=True)
    sh.symlink_to("bash")


def container_root(cache: Path | None = None) -> Path:
    """Build (or reuse) the containers' shared, read-only root directory; returns its path."""
    if os.geteuid() != 0:
        raise GuestBuildError("building the debian-container guest needs root (debugfs, chown)")
    debugfs = shutil.which("debugfs") or shutil.which("/sbin/debugfs")
    if not debugfs:
        raise GuestBuildError("debugfs is missing: install it with `apt-get install e2fsprogs`")
    _, _, image = build_debian_image(cache)
    target = image.parent.parent / f"debian-container-{_key(image)}"
    root = target / "root"
    if root.is_dir():
        log.debug("debian-container root cached in %s", root)
        return root
    log.info("extracting the debian root filesystem into %s", target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        (tmp / "root").mkdir()
        _check_call([debugfs, "-R", f"rdump / {tmp / 'root'}", str(image)], "debugfs rdump")
        _restore_special_modes(debugfs, image, tmp / "root")
        _adapt(tmp / "root")
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not root.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def build_debian_container(
    names: Sequence[str], out_dir: Path, cache: Path | None = None
) -> list[Path]:
    """Write an executable ``out_dir/run-<name>-nspawn`` per name; returns the script paths."""
    check_names(names)
    root = container_root(cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name in names:
        script = out_dir / f"run-{name}-nspawn"
        text = render_template(RUN_SCRIPT, {"NAME": name, "ROOT": str(root)})
        write_atomic(script, text.encode(), 0o755)
        scripts.append(script)
    return scripts
