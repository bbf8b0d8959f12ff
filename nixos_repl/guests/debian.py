"""The ``debian`` guest: a debootstrapped systemd Debian 12 with NixOS's ``backdoor.service``.

It exercises the driver against a real systemd init and a dynamically linked userland, as close to
an unchanged NixOS guest as Debian packages allow. The root filesystem is ``debootstrap
--variant=minbase`` plus a few packages, configured like a NixOS test VM (the backdoor unit, no
serial gettys, an empty root password, 9p shares at /tmp/shared and /tmp/xchg, eth0 on DHCP and
VLAN NICs at 192.168.<vlan>.<node>), packed with ``mkfs.ext4 -d`` into a sparse raw image (no loop
mounts). The kernel is the host's Debian kernel with a small busybox initramfs that loads the
virtio/9p/ext4 modules, mounts /dev/vda and ``switch_root``s to systemd. Its start script follows
NixOS's: it boots the bzImage unless ``NIXPKGS_QEMU_KERNEL_<name>`` names another kernel, and it
has no ``norandmaps`` of its own (under TCG the driver's turbo adds both, as for a NixOS VM).

The image, kernel and initramfs are cached together, keyed by a hash of their inputs, and built in
a temporary directory that is renamed into place only when complete. Each machine's run script
creates ``$NIX_DISK_IMAGE`` (default ``./<name>.qcow2``) as a qcow2 overlay of the cached image,
as NixOS's run script creates its disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import GuestBuildError
from ..files import write_atomic
from .tiny import (
    Cpio,
    _require,
    add_modules,
    cache_dir,
    compress_initramfs,
    extract_vmlinux,
    find_kernel,
    module_order,
    network_names,
    write_run_scripts,
)

__all__ = ["build_debian", "build_debian_image", "debian_mirror"]

log = logging.getLogger(__name__)

DEBIAN_BUILDER_VERSION = "1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd-sysv",
    "udev",
    "bash",
    "kmod",  # without it kmod-static-nodes.service fails and the system is "degraded"
    "iproute2",
    "netcat-openbsd",
    "procps",
    "iputils-ping",
    "coreutils",
    # What nixpkgs' test scripts call on a NixOS guest: curl, python (python -m http.server),
    # iptables.
    "curl",
    "python-is-python3",
    "iptables",  # nftables-backed: needs the netfilter modules below
)
IMAGE_SIZE = "1G"
MEMORY_MIB = 512
# Loaded by the initramfs (dependencies added from modules.dep); they stay loaded under systemd.
# The root filesystem has no /lib/modules, so everything the guest needs is here.
DEBIAN_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",  # ext4's checksums (a soft dependency modules.dep does not list)
    "ext4",
    "virtio_console",
    "virtio-rng",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
    "bochs",
    "autofs4",  # systemd's automount points
    "binfmt_misc",  # systemd-binfmt.service (python3 registers a format)
    "nft_compat",  # iptables (iptables-nft) rules with xtables matches
    "xt_tcpudp",
)
INITRAMFS_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "sleep", "seq", "switch_root")
# No norandmaps: as on a NixOS VM, the driver adds it under TCG (machine/turbo.py).
KERNEL_PARAMS = "loglevel=4 net.ifnames=0 systemd.hostname=@NAME@ nixos_repl.name=@NAME@"
# Units that slow the boot, flood the console or fight the backdoor for its consoles.
MASKED_UNITS = (
    "serial-getty@ttyS0.service",  # writes to the consoles fail with EIO while a getty holds them
    "serial-getty@hvc0.service",
    "systemd-firstboot.service",
    "apt-daily.timer",  # background apt runs would eat the CPU under TCG
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty-static.service",  # gettys on tty2-tty6 (tty1's getty stays, for the screen)
    # The root filesystem has no /lib/modules: these modprobes can only fail, slowly under TCG.
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
)
ENABLED_UNITS = ("backdoor.service", "systemd-networkd.service", "vlan-addresses.service")

INITRAMFS_INIT = """#!/bin/sh
# /init of the debian guest's initramfs: load the modules, mount the root disk, start systemd.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Kernel modules, dependencies first (the order was read from modules.dep at build time).
while read -r mod; do insmod "/lib/modules/$mod" 2>/dev/null; done < /etc/modules.order
for _ in $(seq 250); do [ -b /dev/vda ] && break; sleep 0.02; done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "initramfs: cannot mount the root disk /dev/vda" > /dev/ttyS0
    exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

# NixOS's backdoor.service script (test-instrumentation.nix), unchanged; NixOS runs unit scripts
# with `set -e`.
BACKDOOR_SCRIPT = """#!/bin/bash
set -e
export USER=root
export HOME=/root
export DISPLAY=:0.0

# Determine if this script is ran with nounset
strict="false"
if set -o | grep --quiet --perl-regexp "nounset\\s+on"; then
    strict="true"
fi

if [[ -e /etc/profile ]]; then
    # TODO: Currently shell profiles are not checked at build time,
    # so we need to unset stricter options to source them
    set +o nounset
    # shellcheck disable=SC1091
    source /etc/profile
    [ "$strict" = "true" ] && set -o nounset
fi

# Don't use a pager when executing backdoor
# actions. Because we use a tty, commands like systemctl
# or nix-store get confused into thinking they're running
# interactively.
export PAGER=

cd /tmp
exec < /dev/hvc0 > /dev/hvc0
while ! exec 2> /dev/ttyS0; do sleep 0.1; done
echo "connecting to host..." >&2
stty -F /dev/hvc0 raw -echo # prevent nl -> cr/nl conversion
# The following line is essential since it signals to
# the test driver that the shell is ready.
# See: the connect method in the Machine class.
echo "Spawning backdoor root shell..."
# Passing the terminal device makes bash run non-interactively.
PS1="" exec /bin/bash --norc /dev/hvc0
"""

BACKDOOR_UNIT = """[Unit]
Description=Backdoor shell for the test driver
Requires=dev-hvc0.device dev-ttyS0.device
After=dev-hvc0.device dev-ttyS0.device

[Service]
ExecStart=/usr/local/lib/nixos-repl/backdoor
KillSignal=SIGHUP

[Install]
WantedBy=multi-user.target
"""

# VLAN NICs carry MAC 52:54:00:12:<vlan>:<node>; systemd-networkd gives them 192.168.<vlan>.<node>.
# /etc/hosts names every machine built together (nixos_repl.nodes=, node numbers in that order)
# on each VLAN this machine is on, as NixOS's test network does.
VLAN_SCRIPT = """#!/bin/sh
# eth0 is always user networking (as in NixOS); only later NICs can be VLAN NICs.
mkdir -p /run/systemd/network
read -r name < /proc/sys/kernel/hostname
nodes=
for arg in $(cat /proc/cmdline); do
    case "$arg" in nixos_repl.nodes=*) nodes=$(echo "${arg#nixos_repl.nodes=}" | tr , ' ') ;; esac
done
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    ifname=${dev##*/}
    [ "$ifname" = eth0 ] && continue
    read -r mac < "$dev/address"
    case "$mac" in 52:54:00:12:*) ;; *) continue ;; esac
    vlan=$((0x$(echo "$mac" | cut -d: -f5)))
    node=$((0x$(echo "$mac" | cut -d: -f6)))
    addr=192.168.$vlan.$node
    printf '[Match]\\nName=%s\\n\\n[Network]\\nAddress=%s/24\\nLinkLocalAddressing=no\\n' \\
        "$ifname" "$addr" > "/run/systemd/network/20-$ifname.network"
    grep -qx "$addr $name" /etc/hosts || echo "$addr $name" >> /etc/hosts
    i=1
    for peer in $nodes; do
        line="192.168.$vlan.$i $peer"
        grep -qx "$line" /etc/hosts || echo "$line" >> /etc/hosts
        i=$((i + 1))
    done
done
"""

VLAN_UNIT = """[Unit]
Description=Addresses of the VLAN NICs (192.168.<vlan>.<node>)
DefaultDependencies=no
After=systemd-remount-fs.service
Before=systemd-networkd.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/lib/nixos-repl/vlan-addresses

[Install]
WantedBy=multi-user.target
"""

FSTAB = """/dev/vda / ext4 rw,errors=remount-ro 0 0
shared /tmp/shared 9p trans=virtio,version=9p2000.L,msize=16384,nofail 0 0
xchg /tmp/xchg 9p trans=virtio,version=9p2000.L,msize=16384,nofail 0 0
"""

# Files written into the root filesystem: path -> (content, mode).
ROOT_FILES: dict[str, tuple[str, int]] = {
    "etc/fstab": (FSTAB, 0o644),
    "etc/hosts": ("127.0.0.1 localhost\n::1 localhost\n", 0o644),
    "etc/resolv.conf": ("nameserver 10.0.2.3\n", 0o644),  # QEMU user networking's DNS
    # Empty: a fresh machine id per machine (not a first boot, so no presets are applied).
    "etc/machine-id": ("", 0o444),
    "etc/systemd/network/10-eth0.network": (
        "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n",
        0o644,
    ),
    "etc/systemd/system/backdoor.service": (BACKDOOR_UNIT, 0o644),
    "etc/systemd/system/vlan-addresses.service": (VLAN_UNIT, 0o644),
    "usr/local/lib/nixos-repl/backdoor": (BACKDOOR_SCRIPT, 0o755),
    "usr/local/lib/nixos-repl/vlan-addresses": (VLAN_SCRIPT, 0o755),
}
# Removed after debootstrap: caches and docs nothing in a test needs.
PRUNED = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
)


def debian_mirror() -> str:
    """The mirror the host's apt uses for bookworm (one-line or deb822 sources), else the CDN."""
    sources = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        sources += sorted(sources_d.iterdir())
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        uris: list[str] = []
        suites: list[str] = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("deb "):
                words = [w for w in line.split()[1:] if not w.startswith("[")]
                if len(words) >= 2 and words[1] == SUITE:
                    return words[0].rstrip("/")
            elif line.startswith("URIs:"):
                uris = line.removeprefix("URIs:").split()
            elif line.startswith("Suites:"):
                suites = line.removeprefix("Suites:").split()
            elif not line and uris:
                if SUITE in suites:
                    return uris[0].rstrip("/")
                uris, suites = [], []
        if uris and SUITE in suites:
            return uris[0].rstrip("/")
    return DEFAULT_MIRROR


def _inputs_key(vmlinuz: Path, files: dict[str, Path]) -> str:
    h = hashlib.sha256(f"debian-{DEBIAN_BUILDER_VERSION}\0{SUITE}\0{IMAGE_SIZE}\n".encode())
    for part in (PACKAGES, DEBIAN_MODULES, INITRAMFS_APPLETS, MASKED_UNITS, ENABLED_UNITS, PRUNED):
        h.update(("\0".join(part) + "\n").encode())
    h.update(INITRAMFS_INIT.encode())
    for path, (content, mode) in sorted(ROOT_FILES.items()):
        h.update(f"{path}\0{mode:o}\0{content}\0".encode())
    h.update(str(bool(shutil.which("lz4"))).encode())
    for key, file in sorted({"kernel": vmlinuz, **files}.items()):
        st = file.stat()
        h.update(f"{key}\0{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check_call(cmd: Sequence[str], what: str) -> None:
    log.debug("running %s", shlex.join(cmd))
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise GuestBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _build_initramfs(moddir: Path, modules: list[str], busybox: Path) -> bytes:
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "newroot", "bin"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("init", INITRAMFS_INIT.encode())
    cpio.file("bin/busybox", busybox.read_bytes())
    for applet in INITRAMFS_APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    add_modules(cpio, moddir, modules)
    return compress_initramfs(cpio.pack())


def _configure_root(root: Path) -> None:
    """Turn the debootstrapped tree into a NixOS-like test guest."""
    for rel, (content, mode) in ROOT_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # debootstrap copies some from the host (resolv.conf)
        path.write_text(content)
        os.chmod(path, mode)
    (root / "etc/hostname").unlink(missing_ok=True)  # systemd.hostname= names each machine
    for mountpoint in ("tmp/shared", "tmp/xchg"):
        (root / mountpoint).mkdir(parents=True, exist_ok=True)
    # An empty root password, as in a NixOS test VM (a login on tty1 needs none).
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = ""
            lines[i] = ":".join(fields)
    shadow.write_text("".join(lines))
    _check_call(["chroot", str(root), "systemctl", "enable", *ENABLED_UNITS], "systemctl enable")
    _check_call(["chroot", str(root), "systemctl", "mask", *MASKED_UNITS], "systemctl mask")
    for rel in PRUNED:
        path = root / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)


def _unmount_below(path: Path) -> bool:
    """Lazily unmount whatever an interrupted debootstrap left mounted below ``path``.

    Returns True when nothing is mounted there any more.
    """
    prefix = str(path.resolve()) + "/"

    def mounted() -> list[str]:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].replace("\\040", " ") for line in f]
        return [p for p in points if p.startswith(prefix)]

    for point in sorted(mounted(), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return not mounted()


def _build(target: Path, vmlinuz: Path, moddir: Path, modules: list[str], busybox: Path) -> None:
    """Build into a temporary directory beside ``target`` and rename it into place."""
    if os.geteuid() != 0:
        raise GuestBuildError("building the debian guest needs root (debootstrap, chroot)")
    debootstrap = shutil.which("debootstrap") or shutil.which("/usr/sbin/debootstrap")
    if not debootstrap:
        raise GuestBuildError(
            "debootstrap is missing: install it with `apt-get install debootstrap`"
        )
    mkfs = shutil.which("mkfs.ext4") or shutil.which("/sbin/mkfs.ext4")
    if not mkfs:
        raise GuestBuildError("mkfs.ext4 is missing: install it with `apt-get install e2fsprogs`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        root = tmp / "root"
        mirror = debian_mirror()
        log.info("debootstrap %s from %s (a minute or two)", SUITE, mirror)
        started = time.monotonic()
        _check_call(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            "debootstrap",
        )
        log.info("debootstrap took %.1f s", time.monotonic() - started)
        _configure_root(root)
        started = time.monotonic()
        image = tmp / "rootfs.img"
        _check_call(
            [mkfs, "-q", "-F", "-L", "nixos", "-d", str(root), str(image), IMAGE_SIZE], "mkfs.ext4"
        )
        os.chmod(image, 0o444)  # the base of every machine's overlay: never written
        log.info("mkfs.ext4 -d took %.1f s", time.monotonic() - started)
        shutil.rmtree(root)
        bzimage = vmlinuz.read_bytes()
        write_atomic(tmp / "vmlinux", extract_vmlinux(bzimage) or bzimage, 0o644)
        write_atomic(tmp / "initrd", _build_initramfs(moddir, modules, busybox), 0o644)
        os.chmod(tmp, 0o755)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "rootfs.img").exists():
                raise
            log.debug("another build of %s finished first", target)
            shutil.rmtree(tmp)
    except BaseException:
        if _unmount_below(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.warning("left %s behind: something is still mounted below it", tmp)
        raise


def build_debian_image(cache: Path | None = None) -> tuple[Path, Path, Path]:
    """Build (or reuse) the debian guest; returns the cached kernel, initramfs and root image."""
    vmlinuz, moddir = find_kernel()
    busybox = _require("/bin/busybox", "busybox-static")
    modules = module_order(moddir, DEBIAN_MODULES)
    files = {"busybox": busybox, **{mod: moddir / mod for mod in modules}}
    target = (cache or cache_dir()) / f"debian-{_inputs_key(vmlinuz, files)}"
    kernel, initrd, image = target / "vmlinux", target / "initrd", target / "rootfs.img"
    if not (kernel.exists() and initrd.exists() and image.exists()):
        log.info("building the debian guest into %s", target)
        _build(target, vmlinuz, moddir, modules, busybox)
    else:
        log.debug("debian guest cached in %s", target)
    return kernel, initrd, image


def build_debian(
    names: Sequence[str], out_dir: Path, cache: Path | None = None, nodes: Sequence[str] = ()
) -> list[Path]:
    """Write an executable ``out_dir/run-<name>-vm`` per name; returns the script paths.

    Each machine's disk is ``$NIX_DISK_IMAGE`` (default ``./<name>.qcow2`` in the current
    directory), created at start as a qcow2 overlay of the cached base image. Node numbers (the
    last byte of VLAN addresses) follow the sorted names of every machine of the test, ``names``
    and the others' ``nodes`` (containers), as in a NixOS test network.
    """
    network_names(names, nodes)
    _, initrd, image = build_debian_image(cache)
    # As a NixOS VM: the bzImage by default; under TCG the driver boots its ELF vmlinux instead.
    kernel, _ = find_kernel()
    disk_setup = f"""NIX_DISK_IMAGE=$(readlink -f "${{NIX_DISK_IMAGE:-./@NAME@.qcow2}}")
if ! test -e "$NIX_DISK_IMAGE"; then
    if ! command -v qemu-img >/dev/null; then
        echo "run-@NAME@-vm: qemu-img not found (Debian: apt-get install qemu-utils)" >&2
        exit 127
    fi
    qemu-img create -q -f qcow2 -F raw -b {shlex.quote(str(image))} "$NIX_DISK_IMAGE"
fi"""
    disk_opts = (
        '-drive "cache=writeback,file=$NIX_DISK_IMAGE,id=drive1,if=none,index=1,werror=report" '
        "-device virtio-blk-pci,bootindex=1,drive=drive1,serial=root"
    )
    values = {
        "KIND": "debian",
        "MEMORY": str(MEMORY_MIB),
        "KERNEL": str(kernel),
        "INITRD": str(initrd),
        "KERNEL_PARAMS": f"{KERNEL_PARAMS} nixos_repl.nodes=@NODES@",
        "DISK_SETUP": disk_setup,
        "DISK_OPTS": disk_opts,
    }
    return write_run_scripts(names, out_dir, values, nodes)
