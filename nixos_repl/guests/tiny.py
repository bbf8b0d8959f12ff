"""The ``tiny`` guest: the Debian kernel and an initramfs whose ``/init`` runs the backdoor, plus
the helpers the ``debian`` guest shares (kernel, modules, cpio, run scripts, the cache).

QEMU boots a small PVH loader that finds the uncompressed kernel behind the initramfs
(``pvh_loader``): a snapshot's load would otherwise write the whole kernel into RAM again."""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from ..errors import GuestBuildError
from ..files import cache_dir, write_atomic
from ..machine.turbo import extract_vmlinux

__all__ = ["build_tiny", "cache_dir", "extract_vmlinux", "find_kernel"]

log = logging.getLogger(__name__)

BUILDER_VERSION = "3"
QEMU_BINARY = "qemu-system-x86_64"

# Modules the tiny guest loads (their dependencies are added from modules.dep, deps first).
TINY_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio-rng",
    "virtio_net",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "vmw_vsock_virtio_transport",
    "bochs",
)
# Dynamically linked host programs copied with their libraries (busybox lacks what nixpkgs needs:
# `nc -z`, and GNU `timeout`, which nixpkgs' framing runs for every command with a timeout; a
# compiled one costs what it costs on NixOS), with the Debian package that has each.
DYNAMIC_PROGRAMS = {
    "/bin/nc.openbsd": ("/bin/nc", "netcat-openbsd"),
    "/usr/bin/timeout": ("/bin/timeout", "coreutils"),
}
SEARCH_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin")

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
        ;;
esac
exit 0
"""
PROFILE = """export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PS1='\\u@\\h:\\w# '
"""
SYSTEMD_CAT = """#!/bin/sh
# The tiny guest has no journal: systemd-cat writes its input to the serial console.
exec cat > /dev/ttyS0
"""


# Where the PVH loader (pvh_loader) runs: above the firmware, below the kernel's 16 MiB.
LOADER_ADDR = 0x200000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _elf_segments(vmlinux: bytes) -> tuple[list[tuple[int, bytes, int]], int]:
    """The loadable segments of an ELF64 kernel, as (physical address, file bytes, memory size),
    and its PVH entry point (the Xen PHYS32_ENTRY note)."""
    (phoff,) = struct.unpack_from("<Q", vmlinux, 32)
    phentsize, phnum = struct.unpack_from("<HH", vmlinux, 54)
    segments, entry = [], 0
    for i in range(phnum):
        kind, _, off, _, paddr, filesz, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", vmlinux, phoff + i * phentsize
        )
        if kind == 1:  # PT_LOAD
            segments.append((paddr, vmlinux[off : off + filesz], memsz))
        elif kind == 4:  # PT_NOTE
            pos = off
            while pos + 12 <= off + filesz:
                namesz, descsz, note = struct.unpack_from("<III", vmlinux, pos)
                desc = pos + 12 + (namesz + 3) // 4 * 4
                if note == XEN_ELFNOTE_PHYS32_ENTRY and vmlinux[pos + 12 : pos + 15] == b"Xen":
                    entry = int.from_bytes(vmlinux[desc : desc + min(descsz, 8)], "little")
                pos = desc + (descsz + 3) // 4 * 4
    if not segments or not entry:
        raise GuestBuildError("the kernel is not an ELF with a PVH entry point (PHYS32_ENTRY)")
    return segments, entry


def pvh_loader(vmlinux: bytes, initrd_size: int) -> tuple[bytes, bytes]:
    """A small PVH kernel that puts ``vmlinux`` in place and jumps to it, and the bytes to append
    to an initrd of ``initrd_size`` bytes, which it copies the kernel from.

    QEMU boots an ELF kernel by writing its segments into guest RAM as "ROM" data, and writes them
    again at every system reset, which loading a snapshot does: ~60 MiB copied, and every
    translated block on those pages invalidated one by one, about half of the whole load under
    TCG. The initrd goes through fw_cfg instead, copied by the firmware at boot only. So the
    kernel rides at the end of the initrd: the loader (one small ROM segment) copies each segment
    to its physical address, zeroes the rest of its memory size, tells the kernel that the initrd
    ends where it did, and enters the kernel at its PVH entry with the firmware's start info.
    Another kernel booted with this initrd (``NIXPKGS_QEMU_KERNEL_<name>``) still boots; it logs
    "Initramfs unpacking failed: invalid magic" for the bytes behind the initramfs.
    """
    segments, entry = _elf_segments(vmlinux)
    blob = bytearray()
    code = bytearray(
        b"\xfc"  # cld
        b"\x8b\x73\x10"  # mov esi, [ebx+16]: hvm_start_info.modlist_paddr
        b"\x8b\x16"  # mov edx, [esi]: the first module (the initrd)
        + b"\xc7\x46\x08"
        + struct.pack("<I", initrd_size)  # mov dword [esi+8], size: it ends where it did
        + b"\xc7\x46\x0c\x00\x00\x00\x00"  # mov dword [esi+12], 0
        + b"\x89\xdd"  # mov ebp, ebx
    )
    base = (initrd_size + 4095) // 4096 * 4096
    for paddr, data, memsz in segments:
        data = data.rstrip(b"\0")
        code += b"\xbf" + struct.pack("<I", paddr)  # mov edi, paddr
        code += b"\x8d\xb2" + struct.pack("<I", base + len(blob))  # lea esi, [edx+offset]
        for count, op in ((len(data) // 4, b"\xa5"), (len(data) % 4, b"\xa4")):
            code += b"\xb9" + struct.pack("<I", count) + b"\xf3" + op  # rep movs{d,b}
        zeros = memsz - len(data)
        code += b"\x31\xc0"  # xor eax, eax
        for count, op in ((zeros // 4, b"\xab"), (zeros % 4, b"\xaa")):
            code += b"\xb9" + struct.pack("<I", count) + b"\xf3" + op  # rep stos{d,b}
        blob += data + b"\0" * (-len(data) % 4096)
    # The copied bytes are zeroed where they were: free memory the kernel never reserved, which a
    # snapshot would save page by page.
    code += b"\x8d\xba" + struct.pack("<I", base)  # lea edi, [edx+base]
    code += b"\xb9" + struct.pack("<I", len(blob) // 4) + b"\xf3\xab"  # rep stosd (eax = 0)
    code += b"\x89\xeb"  # mov ebx, ebp
    code += b"\xb8" + struct.pack("<I", entry) + b"\xff\xe0"  # mov eax, entry; jmp eax
    # ELF64 header, a PT_LOAD for the code and a PT_NOTE with its PVH entry.
    note = struct.pack("<III4sQ", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY, b"Xen", LOADER_ADDR)
    elf = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    elf += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LOADER_ADDR, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    size = len(code)
    elf += struct.pack("<IIQQQQQQ", 1, 5, 4096, LOADER_ADDR, LOADER_ADDR, size, size, 4096)
    elf += struct.pack("<IIQQQQQQ", 4, 4, 176, 0, 0, len(note), len(note), 4)
    elf += note + b"\0" * (4096 - 176 - len(note)) + code
    return bytes(elf), b"\0" * (base - initrd_size) + bytes(blob)


def find_kernel() -> tuple[Path, Path]:
    """The newest Debian kernel that has both /boot/vmlinuz-<v> and /lib/modules/<v>."""
    candidates = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = Path("/lib/modules") / version
        if (moddir / "modules.dep").exists() and os.access(vmlinuz, os.R_OK):
            candidates.append((vmlinuz.stat().st_mtime, vmlinuz, moddir))
    if not candidates:
        raise GuestBuildError(
            "no Debian kernel found (/boot/vmlinuz-* with /lib/modules/*): "
            "install one with `apt-get install linux-image-amd64`"
        )
    _, vmlinuz, moddir = max(candidates)
    return vmlinuz, moddir


def _require(path: str, package: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise GuestBuildError(f"{path} is missing: install it with `apt-get install {package}`")
    return p


def module_order(moddir: Path, wanted: Iterable[str]) -> list[str]:
    """Module paths (relative to ``moddir``) for ``wanted`` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[base] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise GuestBuildError(f"kernel module {name} not found in {moddir}/modules.dep")
        visit(by_name[key])
    return order


class Cpio:
    """A byte-reproducible cpio (newc) archive: sorted, mtime 0, owned by root."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def dir(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", 0))

    def file(self, path: str, data: bytes, mode: int = 0o755) -> None:
        self.dir(str(Path(path).parent))
        self.entries[path.strip("/")] = (stat.S_IFREG | mode, data, 0)

    def symlink(self, path: str, target: str) -> None:
        self.dir(str(Path(path).parent))
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int) -> None:
        self.dir(str(Path(path).parent))
        self.entries[path.strip("/")] = (stat.S_IFCHR | 0o600, b"", (major << 8) | minor)

    def pack(self) -> bytes:
        out = bytearray()

        def add(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
            fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF]
            fields += [len(name) + 1, 0]
            out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
            out.extend(name.encode() + b"\0")
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))

        for ino, name in enumerate(sorted(k for k in self.entries if k and k != "."), start=1):
            mode, data, rdev = self.entries[name]
            add(ino, name, mode, data, rdev)
        add(0, "TRAILER!!!", 0, b"", 0)
        return bytes(out)


def _libraries(program: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestBuildError(f"cannot list the libraries of {program}: {e}") from e
    return re.findall(r"(/\S+)\s+\(0x", out)


def _initramfs_inputs(moddir: Path) -> tuple[list[str], dict[str, Path]]:
    """The module order and every host file that goes into the initramfs (for the cache key)."""
    files = {
        "busybox": _require("/bin/busybox", "busybox-static"),
        "bash": _require("/bin/bash-static", "bash-static"),
    }
    for src, (_, package) in DYNAMIC_PROGRAMS.items():
        files[src] = _require(src, package)
        for lib in _libraries(src):
            files[lib] = Path(lib)
    modules = module_order(moddir, TINY_MODULES)
    for mod in modules:
        files[mod] = moddir / mod
    return modules, files


def add_modules(cpio: Cpio, moddir: Path, modules: Sequence[str]) -> None:
    """Put ``modules`` (from ``module_order``) under /lib/modules and their load order in
    /etc/modules.order (one path relative to /lib/modules per line, dependencies first)."""
    for mod in modules:
        data = (moddir / mod).read_bytes()
        if mod.endswith(".xz"):
            data, mod = lzma.decompress(data), mod.removesuffix(".xz")
        cpio.file(f"lib/modules/{mod}", data, 0o644)
    cpio.file("etc/modules.order", "".join(m.removesuffix(".xz") + "\n" for m in modules).encode())


def compress_initramfs(raw: bytes) -> bytes:
    """lz4 when available (fastest to unpack under TCG), else gzip."""
    if shutil.which("lz4"):
        # The kernel wants the legacy lz4 frame format (-l).
        return subprocess.run(
            ["lz4", "-l", "-9", "-q", "-c"], input=raw, capture_output=True, check=True
        ).stdout
    return gzip.compress(raw, compresslevel=6, mtime=0)


def _build_initramfs(moddir: Path, modules: list[str], files: dict[str, Path]) -> bytes:
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc", *SEARCH_DIRS):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    init = resources.files(__package__).joinpath("init.sh").read_bytes()
    cpio.file("init", init)
    cpio.file("bin/busybox", files["busybox"].read_bytes())
    applets = subprocess.run(
        [str(files["busybox"]), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet not in ("sh", "init", "linuxrc", "nc", "timeout", "busybox"):
            cpio.symlink(f"usr/bin/{applet}", "/bin/busybox")
    cpio.file("bin/bash", files["bash"].read_bytes())
    cpio.symlink("bin/sh", "bash")
    for src, (dst, _) in DYNAMIC_PROGRAMS.items():
        cpio.file(dst, files[src].read_bytes())
        for lib in _libraries(src):
            cpio.file(lib, Path(lib).resolve().read_bytes())
    cpio.file("usr/bin/systemd-cat", SYSTEMD_CAT.encode())
    add_modules(cpio, moddir, modules)
    cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode())
    cpio.file("etc/profile", PROFILE.encode(), 0o644)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", 0o644)
    cpio.file("etc/group", b"root:x:0:\n", 0o644)
    cpio.file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n", 0o644)
    return compress_initramfs(cpio.pack())


def _inputs_key(vmlinuz: Path, files: dict[str, Path]) -> str:
    h = hashlib.sha256(BUILDER_VERSION.encode())
    h.update(resources.files(__package__).joinpath("init.sh").read_bytes())
    h.update((UDHCPC_SCRIPT + PROFILE + SYSTEMD_CAT).encode())
    h.update(str(bool(shutil.which("lz4"))).encode())
    for key, path in sorted({"kernel": vmlinuz, **files}.items()):
        st = path.stat()
        h.update(f"{key}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def build_tiny_image(cache: Path | None = None) -> tuple[Path, Path]:
    """Build (or reuse) the tiny guest's kernel and initramfs; returns their cached paths."""
    vmlinuz, moddir = find_kernel()
    modules, files = _initramfs_inputs(moddir)
    target = (cache or cache_dir()) / f"tiny-{_inputs_key(vmlinuz, files)}"
    kernel, initrd = target / "kernel", target / "initrd"
    if kernel.exists() and initrd.exists():
        log.debug("tiny guest cached in %s", target)
        return kernel, initrd
    log.info("building the tiny guest into %s", target)
    bzimage = vmlinuz.read_bytes()
    vmlinux = extract_vmlinux(bzimage)
    initramfs = _build_initramfs(moddir, modules, files)
    if vmlinux is None:  # QEMU boots the bzImage (decompressing it in the guest is slow)
        boot, payload = bzimage, b""
    else:
        boot, payload = pvh_loader(vmlinux, len(initramfs))
    target.mkdir(parents=True, exist_ok=True)
    write_atomic(kernel, boot, 0o644)
    write_atomic(initrd, initramfs + payload, 0o644)
    return kernel, initrd


def check_names(names: Sequence[str]) -> None:
    """Machine names must be given, unique, and usable in file names and kernel parameters."""
    if not names:
        raise GuestBuildError("no machine names given: pass at least one --name")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise GuestBuildError(f"invalid machine name {name!r}: use letters, digits, - _ .")
    if len(set(names)) != len(names):
        raise GuestBuildError(f"machine names must be unique: {list(names)}")


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``@KEY@`` by its value.

    A line that holds nothing but one placeholder (and possibly a line-continuing backslash)
    whose value is empty is dropped, so optional sections leave no trace in the output.
    """
    lines = []
    for line in template.splitlines(keepends=True):
        bare = line.strip().removesuffix("\\").strip()
        if bare.startswith("@") and bare.endswith("@") and values.get(bare[1:-1], None) == "":
            continue
        for key, value in values.items():
            line = line.replace(f"@{key}@", value)
        lines.append(line)
    return "".join(lines)


def network_names(names: Sequence[str], nodes: Sequence[str] = ()) -> list[str]:
    """Every machine of a test, sorted by name: the ones built now (``names``) and the others
    (``nodes``: the VMs beside containers, the containers beside VMs). A machine's node number,
    the last byte of its VLAN addresses (192.168.<vlan>.<node>), is its 1-based position here,
    as in a NixOS test network."""
    check_names(names)
    if both := sorted(set(names) & set(nodes)):
        raise GuestBuildError(
            f"the following names are both a machine built here (--name) and another machine "
            f"of the test (--node): {', '.join(both)}; a machine has one name"
        )
    machines = sorted({*names, *nodes})
    check_names(machines)
    if len(machines) > 254:
        raise GuestBuildError(f"{len(machines)} machines: a VLAN has addresses for 254")
    return machines


def write_run_scripts(
    names: Sequence[str], out_dir: Path, values: Mapping[str, str], nodes: Sequence[str] = ()
) -> list[Path]:
    """Write an executable ``out_dir/run-<name>-vm`` per name from ``run-vm.sh``.

    ``values`` fills the guest's placeholders (KIND, MEMORY, KERNEL, INITRD, KERNEL_PARAMS,
    DISK_SETUP, DISK_OPTS); they may contain ``@NAME@`` and ``@NODE@``, filled in per machine,
    and ``@NODES@``, every machine of the test (see :func:`network_names`), comma-separated.
    """
    machines = network_names(names, nodes)
    template = resources.files(__package__).joinpath("run-vm.sh").read_text()
    template = render_template(template, {"QEMU": QEMU_BINARY, **values})
    template = render_template(template, {"NODES": ",".join(machines)})
    scripts = []
    for node, name in enumerate(machines, start=1):
        if name not in names:
            continue
        var = re.sub(r"[^A-Za-z0-9_]", "_", name)
        text = render_template(template, {"NAME": name, "NODE": str(node), "VAR": var})
        script = Path(out_dir) / f"run-{name}-vm"
        script.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(script, text.encode(), 0o755)
        scripts.append(script)
    return scripts


def build_tiny(
    names: Sequence[str], out_dir: Path, cache: Path | None = None, nodes: Sequence[str] = ()
) -> list[Path]:
    """Write an executable ``out_dir/run-<name>-vm`` per name; returns the script paths.

    Node numbers (the last byte of VLAN addresses, 192.168.<vlan>.<node>) follow the sorted
    names of every machine of the test, ``names`` and the others' ``nodes`` (containers), as
    in a NixOS test network; /etc/hosts names them all on each VLAN.
    """
    network_names(names, nodes)
    kernel, initrd = build_tiny_image(cache)
    values = {
        "KIND": "tiny",
        "MEMORY": "256",
        "KERNEL": str(kernel),
        "INITRD": str(initrd),
        "KERNEL_PARAMS": "loglevel=4 nixos_repl.name=@NAME@ nixos_repl.nodes=@NODES@",
        "DISK_SETUP": "",
        "DISK_OPTS": "",
    }
    return write_run_scripts(names, out_dir, values, nodes)
