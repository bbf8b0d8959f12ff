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

VLANs are wired as nixpkgs' container script (``run-nspawn``) wires them: the container runs in a
network namespace ``nixos-nspawn-<name>`` holding ``eth<i>`` for its i-th VLAN, the peer of a
veth ``<name>-eth<i>`` on the host's bridge ``br<vlan>`` (``192.168.<vlan>.254``, made by the
first container of the VLAN and removed by the last, under ``/run/nixos-nspawn/vlan-<vlan>.lock``)
on which the driver's tap ``vde-tap<vlan>`` (``vde_plug2tap`` into the VLAN's switch) is put too.
Inside, systemd-networkd gives ``eth<i>`` the test network's addresses and ``/etc/hosts`` names
the other machines, both written into the container's overlay at each start.
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
from .tiny import network_names, render_template

__all__ = ["build_debian_container", "container_root"]

log = logging.getLogger(__name__)

CONTAINER_BUILDER_VERSION = "2"
IFNAMSIZ = 15  # the longest network interface name Linux takes
# Units of the debian VM guest a container has no use for (no /dev/hvc0, no VLAN NICs).
MASKED_UNITS = ("backdoor.service", "vlan-addresses.service", "console-getty.service")

RUN_SCRIPT = r"""#!/bin/sh
# run-@NAME@-nspawn: the debian-container guest @NAME@ (nixos-repl), NixOS's container contract.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
name=@NAME@
# <interface>:<vlan> of each VLAN interface, as nixpkgs' --interfaces-json.
interfaces="@INTERFACES@"
warn() { echo "nixos-nspawn($name): $*" >&2; }
if [ "${1:-}" != --in-private-mounts ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "run-$name-nspawn: containers need root" >&2
        exit 1
    fi
    if ! command -v systemd-nspawn >/dev/null 2>&1; then
        echo "run-$name-nspawn: systemd-nspawn not found" \
            "(Debian: apt-get install systemd-container)" >&2
        exit 127
    fi
    : "${RUN_NSPAWN_ROOT_DIR:?run-@NAME@-nspawn: RUN_NSPAWN_ROOT_DIR is not set}"
    : "${RUN_NSPAWN_SHARED_DIR:?run-@NAME@-nspawn: RUN_NSPAWN_SHARED_DIR is not set}"
    mkdir -p "$RUN_NSPAWN_ROOT_DIR/var/log/journal" "$RUN_NSPAWN_SHARED_DIR" \
        "$RUN_NSPAWN_ROOT_DIR/.overlay/upper" "$RUN_NSPAWN_ROOT_DIR/.overlay/work" \
        "$RUN_NSPAWN_ROOT_DIR/.overlay/root"
    # The overlay and the network namespace's name live in a mount namespace of their own:
    # they go away with the container, however it ends.
    exec unshare --mount --propagation private "$0" --in-private-mounts
fi

o=$RUN_NSPAWN_ROOT_DIR/.overlay
mount -t overlay overlay -o "lowerdir=@ROOT@,upperdir=$o/upper,workdir=$o/work" "$o/root"
# The guest's side (NixOS's networking.interfaces and networking.extraHosts).
mkdir -p "$o/root/etc/systemd/network"
@GUEST_FILES@
# The host's side, as nixpkgs' run-nspawn: a network namespace nixos-nspawn-<name>; per
# interface a bridge br<vlan> (192.168.<vlan>.254, shared by the VLAN's containers, made and
# removed under a lock) with the driver's tap vde-tap<vlan> on it, and a veth pair
# <name>-<interface> (on the bridge) / <interface> (in the namespace).
netns=nixos-nspawn-$name
locks=/run/nixos-nspawn
# Links are looked up over netlink: /sys/class/net may show another network namespace's.
exists() { ip link show dev "$1" >/dev/null 2>&1; }
bridge_up() {
    (
        flock 9
        if ! exists "br$1"; then
            ip link add "br$1" type bridge
            ip link set "br$1" up
            ip addr add "192.168.$1.254/24" dev "br$1"
            ip addr add "2001:db8:$1::fe/64" dev "br$1"
        fi
        if exists "vde-tap$1"; then
            ip link set "vde-tap$1" master "br$1"
            ip link set "vde-tap$1" up
        else
            warn "TAP vde-tap$1 not found; container will be isolated from VDE"
        fi
    ) 9>"$locks/vlan-$1.lock"
}
bridge_down() {
    (
        flock 9
        # The tap belongs to the VLAN, not to a container: it does not keep the bridge.
        if exists "br$1" && [ -z "$(ip -o link show master "br$1" \
            | cut -d: -f2 | cut -d@ -f1 | tr -d ' ' | grep -vx "vde-tap$1")" ]; then
            ip link delete "br$1"
        fi
    ) 9>"$locks/vlan-$1.lock"
}
made=
cleanup() {
    status=$?
    trap - EXIT INT TERM
    for spec in $made; do
        ip link delete "$name-${spec%%:*}" 2>/dev/null || true
        bridge_down "${spec#*:}" || true
    done
    ip netns delete "$netns" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
mkdir -p "$locks" /run/netns
# The namespace's name too is private (another run's container may have the same name).
mount -t tmpfs -o mode=0755 netns /run/netns
ip netns add "$netns"
for spec in $interfaces; do
    ifname=${spec%%:*}
    vlan=${spec#*:}
    bridge_up "$vlan"
    made="$spec $made"
    ip link add "$name-$ifname" type veth peer name "$ifname" netns "$netns"
    ip link set "$name-$ifname" master "br$vlan"
    ip link set "$name-$ifname" up
done

systemd-nspawn --quiet --register=no --keep-unit --notify-ready=yes --console=passive \
    --private-network --network-namespace-path="/run/netns/$netns" \
    --machine="$name" --directory="$o/root" \
    --bind="$RUN_NSPAWN_ROOT_DIR/var/log/journal:/var/log/journal" \
    --bind="$RUN_NSPAWN_SHARED_DIR:/tmp/shared" \
    --boot -- systemd.show_status=false &
pid=$!
# SIGTERM (the driver's release()) goes on to systemd-nspawn, which powers the container off.
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM INT
while :; do
    status=0
    wait "$pid" || status=$?
    kill -0 "$pid" 2>/dev/null || break
done
exit "$status"
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


def _heredoc(path: str, text: str) -> str:
    return f"cat > \"$o/root/{path}\" <<'EOF'\n{text}EOF"


def guest_files(name: str, vlans: Sequence[int], machines: Sequence[str]) -> str:
    """The shell lines that write the container's network files into its root at start.

    As NixOS's test network (``nixos/lib/testing/network.nix``): ``vlans`` become the interfaces
    ``eth1``, ``eth2``, … with ``192.168.<vlan>.<node>/24`` and ``2001:db8:<vlan>::<node>/64``,
    where ``<node>`` is the 1-based position of the name among all ``machines`` sorted; and
    ``/etc/hosts`` names every machine at its address on the first VLAN (its primary address).
    """
    nodes = {m: i for i, m in enumerate(sorted(machines), start=1)}
    node = nodes[name]
    files = []
    for i, vlan in enumerate(vlans, start=1):
        network = (
            f"[Match]\nName=eth{i}\n\n[Network]\n"
            f"Address=192.168.{vlan}.{node}/24\nAddress=2001:db8:{vlan}::{node}/64\n"
        )
        files.append(_heredoc(f"etc/systemd/network/20-eth{i}.network", network))
    hosts = "127.0.0.1 localhost\n::1 localhost\n"
    if vlans:
        for machine, number in nodes.items():
            hosts += f"192.168.{vlans[0]}.{number} {machine}\n"
            hosts += f"2001:db8:{vlans[0]}::{number} {machine}\n"
    files.append(_heredoc("etc/hosts", hosts))
    return "\n".join(files)


def build_debian_container(
    names: Sequence[str],
    out_dir: Path,
    cache: Path | None = None,
    *,
    vlans: Sequence[int] = (),
    nodes: Sequence[str] = (),
) -> list[Path]:
    """Write an executable ``out_dir/run-<name>-nspawn`` per name; returns the script paths.

    Each container joins every VLAN of ``vlans`` (NixOS's ``virtualisation.vlans``: interface
    ``eth<i>`` for the i-th) at ``192.168.<vlan>.<node>``. Node numbers count every machine of
    the test, sorted by name: the containers' ``names`` and the other machines' ``nodes`` (the
    VMs, whose guests number themselves the same way).
    """
    machines = network_names(names, nodes)
    for vlan in vlans:
        if not 0 <= vlan <= 255:
            raise GuestBuildError(f"invalid VLAN {vlan}: VLANs are 0 to 255 (192.168.<vlan>.*)")
    if len(set(vlans)) != len(vlans):
        raise GuestBuildError(f"VLANs must be unique: {list(vlans)}")
    for name in names if vlans else ():
        veth = f"{name}-eth{len(vlans)}"
        if len(veth) > IFNAMSIZ:
            raise GuestBuildError(
                f"container name {name!r} is too long for VLANs: its host interface {veth} "
                f"would have {len(veth)} characters, Linux allows {IFNAMSIZ}; shorten the name"
            )
    root = container_root(cache)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    interfaces = " ".join(f"eth{i}:{vlan}" for i, vlan in enumerate(vlans, start=1))
    scripts = []
    for name in names:
        script = out_dir / f"run-{name}-nspawn"
        values = {
            "NAME": name,
            "ROOT": str(root),
            "INTERFACES": interfaces,
            "GUEST_FILES": guest_files(name, vlans, machines),
        }
        write_atomic(script, render_template(RUN_SCRIPT, values).encode(), 0o755)
        scripts.append(script)
    return scripts
