"""TCG turbo: faster guests without KVM, for any start script that follows NixOS's contract.

Under TCG (no KVM: CI runners, cross-architecture tests) every process the guest creates costs
milliseconds. Two environment variables of NixOS's run-vm scripts let the driver help, with the
script left unchanged:

* ``kernel``: NixOS's script boots ``${NIXPKGS_QEMU_KERNEL_<name>:-<bzImage>}``. Decompressing an
  XZ bzImage inside a TCG guest takes seconds; QEMU boots the ELF ``vmlinux`` directly (PVH). The
  driver reads the default kernel path out of the script, extracts the ELF once into a cache
  keyed by the bzImage's content, and points the variable at it;
* ``norandmaps`` (in ``QEMU_KERNEL_PARAMS``): with the same addresses in every process, TCG reuses
  the code it translated for one process in the next (a dynamically linked command costs a
  fraction as much).

Each part is on by default under TCG and off under KVM. ``NIXOS_REPL_TURBO=0`` turns all off;
``NIXOS_REPL_TURBO=kernel`` or ``=norandmaps`` keeps only the parts named (comma-separated).
What was done is logged once per machine start.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import lzma
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..files import cache_dir, write_atomic

__all__ = ["PARTS", "accelerator", "extract_vmlinux", "turbo_env"]

PARTS = ("kernel", "norandmaps")
_KERNEL_VAR = re.compile(r"-kernel\s+\"?\$\{(NIXPKGS_QEMU_KERNEL_[A-Za-z0-9_]+):-([^}\"]+)\}")
_MAX_SCRIPT = 1 << 20


def accelerator(env: Mapping[str, str]) -> str:
    """``kvm`` or ``tcg``: what a start script will use (NIXOS_REPL_ACCEL, else /dev/kvm)."""
    forced = env.get("NIXOS_REPL_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


def enabled_parts(env: Mapping[str, str]) -> tuple[str, ...]:
    value = env.get("NIXOS_REPL_TURBO", "1").strip().lower()
    if value in ("", "1", "on", "yes", "true"):
        return PARTS
    if value in ("0", "off", "no", "false"):
        return ()
    wanted = {part.strip() for part in value.split(",")}
    return tuple(part for part in PARTS if part in wanted)


def _script_kernel(start_command: str) -> tuple[str, Path] | None:
    """The kernel variable of the script and its default kernel, if the script has them."""
    script = Path(start_command)
    try:
        if not script.is_file() or script.stat().st_size > _MAX_SCRIPT:
            return None
        text = script.read_text(errors="replace")
    except OSError:
        return None
    match = _KERNEL_VAR.search(text)
    if match is None:
        return None
    return match.group(1), Path(match.group(2))


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (xz or gzip payload), or None if it cannot be found."""

    def unxz(data: bytes) -> bytes:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)

    def gunzip(data: bytes) -> bytes:
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read()

    for magic, opener in ((b"\xfd7zXZ\x00", unxz), (b"\x1f\x8b\x08\x00", gunzip)):
        start = 0
        while (off := bzimage.find(magic, start)) >= 0:
            start = off + 1
            try:
                out: bytes = opener(bzimage[off:])
            except (lzma.LZMAError, OSError, EOFError):
                continue
            if out.startswith(b"\x7fELF"):
                return out
    return None


# (path, size, mtime, cache directory) -> the cached ELF
_extracted: dict[tuple[str, int, int, Path], Path] = {}


def elf_kernel(kernel: Path, cache: Path) -> Path | None:
    """The ELF vmlinux of ``kernel`` (a bzImage), extracted once into ``cache``."""
    with kernel.open("rb") as f:
        if f.read(4) == b"\x7fELF":
            return None  # already an ELF kernel
    info = kernel.stat()
    key = (str(kernel), info.st_size, info.st_mtime_ns, cache)
    if (known := _extracted.get(key)) is not None and known.exists():
        return known
    data = kernel.read_bytes()
    target = cache / f"vmlinux-{hashlib.sha256(data).hexdigest()[:24]}"
    if not target.exists():
        vmlinux = extract_vmlinux(data)
        if vmlinux is None:
            return None
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(target, vmlinux, 0o644)
    _extracted[key] = target
    return target


def turbo_env(
    name: str, start_command: str, env: Mapping[str, str], log: logging.Logger
) -> dict[str, str]:
    """The variables to add to the start script's environment for TCG turbo (maybe none)."""
    if accelerator(env) != "tcg":
        return {}
    parts = enabled_parts(env)
    extra: dict[str, str] = {}
    done: list[str] = []
    if "kernel" in parts:
        found = _script_kernel(start_command)
        if found is not None and found[0] not in env:
            var, kernel = found
            try:
                elf = elf_kernel(kernel, cache_dir() / "kernels")
            except OSError as e:
                log.info("TCG turbo: cannot read kernel %s (%s); booting it as it is", kernel, e)
                elf = None
            if elf is not None:
                extra[var] = str(elf)
                done.append(f"ELF kernel {elf} ({var})")
    if "norandmaps" in parts:
        params = env.get("QEMU_KERNEL_PARAMS", "")
        if "norandmaps" not in params.split():
            extra["QEMU_KERNEL_PARAMS"] = f"{params} norandmaps".strip()
        done.append("norandmaps")
    if done:
        log.info("TCG turbo for %s: %s (NIXOS_REPL_TURBO=0 turns it off)", name, ", ".join(done))
    return extra
