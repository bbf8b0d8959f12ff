"""The boot cache: each machine's state right after its backdoor connected, kept across runs.

Off unless asked (``NIXOS_REPL_BOOT_CACHE=DIR``, or ``--boot-cache DIR`` on the command line).
The first run boots as usual and then saves the machine (the ``booted`` snapshot) into
``DIR/<key>/``; a later run whose key matches starts the machine from that state (a fork:
QEMU loads it instead of booting). The key covers everything that shapes the VM:

* the start script's text, and every file it names by path (kernel, initrd, disk and store
  images: path, size and modification time);
* the QEMU binary's version;
* the environment that shapes the VM (``QEMU_OPTS``, ``QEMU_KERNEL_PARAMS``,
  ``QEMU_NET_OPTS``, ``NIXPKGS_QEMU_KERNEL_*``, the accelerator, TCG turbo) and the VLANs;
* this format's version.

A miss boots cold and says why in one line (which part changed since this machine's last
entry). A restored guest shares everything with the run that saved it, its random state too:
a test that makes keys gets the same keys each run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import write_atomic

__all__ = ["ENV", "BootCache", "CacheEntry", "key_parts"]

ENV = "NIXOS_REPL_BOOT_CACHE"
FORMAT = "1"
STATE_FILE = "snapshots.qcow2"
# Environment variables that shape the VM (besides NIXPKGS_QEMU_KERNEL_* and the VLAN sockets).
SHAPING = (
    "QEMU_OPTS",
    "QEMU_KERNEL_PARAMS",
    "QEMU_NET_OPTS",
    "NIXOS_REPL_ACCEL",
    "NIXOS_REPL_TURBO",
    "NIXOS_REPL_SHELL_FRAMING",
)

log = logging.getLogger(__name__)

_PATH = re.compile(r"(?<![\w.~-])/[\w.+@=-]+(?:/[\w.+@=-]+)*")
_QEMU = re.compile(r"(?:\S*/)?qemu-(?:system-[\w-]+|kvm)\b")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _qemu_version(binary: str) -> str:
    path = binary if "/" in binary else shutil.which(binary)
    if path is None:
        return f"{binary}: not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary}: {e}"
    return out.stdout.splitlines()[0] if out.stdout else f"{binary}: no version"


def key_parts(start_command: str, env: Mapping[str, str]) -> dict[str, str]:
    """What the key of a machine is made of, part by part (each a digest or a short text)."""
    argv0 = start_command.split()[0] if start_command.split() else start_command
    script = Path(argv0)
    text = script.read_bytes() if script.is_file() else start_command.encode()
    decoded = text.decode(errors="replace")
    files = []
    for found in sorted(set(_PATH.findall(decoded))):
        with_stat = Path(found)
        if with_stat.is_file():
            st = with_stat.stat()
            files.append(f"{found} {st.st_size} {st.st_mtime_ns}")
    qemus = sorted(set(_QEMU.findall(decoded))) or ["qemu-system-x86_64"]
    shaping = [f"{k}={env.get(k, '')}" for k in SHAPING]
    shaping += sorted(f"{k}={v}" for k, v in env.items() if k.startswith("NIXPKGS_QEMU_KERNEL_"))
    vlans = sorted(k.removeprefix("QEMU_VDE_SOCKET_") for k in env if k.startswith("QEMU_VDE_"))
    return {
        "the start script": _digest(start_command, text),
        "a file it names": _digest(*files),
        "QEMU's version": "; ".join(_qemu_version(q) for q in qemus),
        "the environment": _digest(*shaping),
        "the VLANs": ",".join(vlans),
        "the cache format": FORMAT,
    }


@dataclass
class CacheEntry:
    """One saved machine: where it is and what ``meta.json`` says of it."""

    path: Path
    meta: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class BootCache:
    """The entries under one directory: ``<key>/meta.json``, ``snapshots.qcow2``, ``disks/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BootCache | None:
        value = env.get(ENV, "")
        return cls(Path(value).expanduser()) if value else None

    def _key(self, parts: dict[str, str]) -> str:
        return _digest(*(f"{k}={v}" for k, v in sorted(parts.items())))[:32]

    def lookup(self, name: str, parts: dict[str, str]) -> tuple[CacheEntry | None, str]:
        """The entry for these parts, or None and why not (one line)."""
        path = self.root / self._key(parts)
        try:
            meta = json.loads((path / "meta.json").read_text())
            if (path / STATE_FILE).is_file():
                return CacheEntry(path, meta), ""
        except (OSError, ValueError):
            pass
        try:
            last = json.loads((self.root / "names" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None, "no entry for it yet"
        changed = [part for part, value in parts.items() if last.get(part) != value]
        return None, (f"{changed[0]} changed" if changed else "its entry is gone")

    def store(
        self,
        name: str,
        parts: dict[str, str],
        state_file: Path,
        disks: dict[str, Path],
        meta: dict[str, Any],
    ) -> CacheEntry:
        """Keep ``state_file`` and the ``disks`` (name in the state directory -> file) as the
        entry for ``parts``; written beside it first, so no half-written entry is ever seen."""
        key = self._key(parts)
        path = self.root / key
        self.root.mkdir(parents=True, exist_ok=True)
        # A name of its own, so machines saved at once (threads, processes) never share it.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        try:
            (tmp / "disks").mkdir()
            shutil.copyfile(state_file, tmp / STATE_FILE)
            for relative, disk in disks.items():
                shutil.copyfile(disk, tmp / "disks" / relative)
            full = {
                **meta,
                "name": name,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "disks": sorted(disks),
                "parts": parts,
            }
            (tmp / "meta.json").write_text(json.dumps(full, indent=1))
            self._swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        names = self.root / "names"
        names.mkdir(exist_ok=True)
        write_atomic(names / f"{name}.json", json.dumps(parts).encode())
        return CacheEntry(path, full)

    @staticmethod
    def _swap_in(tmp: Path, path: Path) -> None:
        """Put the entry written in ``tmp`` at ``path``, over an older one. Another process may
        put the same entry there at the same time: then one of the two is kept, whole."""
        old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
        with contextlib.suppress(FileNotFoundError):
            path.rename(old / "entry")
        try:
            tmp.rename(path)
        except OSError:  # the other one's is there (a directory is never renamed over another)
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    def install(self, entry: CacheEntry, state_dir: Path) -> None:
        """Copy an entry's files into a machine's state directory, for QEMU to start from."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(entry.path / STATE_FILE, state_dir / STATE_FILE)
        for relative in entry.meta.get("disks", []):
            shutil.copyfile(entry.path / "disks" / relative, state_dir / relative)

    def uninstall(self, entry: CacheEntry, state_dir: Path) -> None:
        """Remove what ``install`` put in a state directory (all of it or a part), so a machine
        whose saved boot failed boots cold from no disk, as it would without the cache."""
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        disks = entry.meta.get("disks")
        for relative in disks if isinstance(disks, list) else []:
            with contextlib.suppress(OSError):
                (state_dir / str(relative)).unlink(missing_ok=True)

    def discard(self, entry: CacheEntry) -> None:
        shutil.rmtree(entry.path, ignore_errors=True)

    def entries(self) -> list[CacheEntry]:
        found = []
        for meta_file in sorted(self.root.glob("[!.]*/meta.json")):  # not one being written
            try:
                found.append(CacheEntry(meta_file.parent, json.loads(meta_file.read_text())))
            except (OSError, ValueError):
                continue
        return found

    def clear(self) -> int:
        """Remove every entry; how many there were."""
        entries = self.entries()
        for entry in entries:
            self.discard(entry)
        shutil.rmtree(self.root / "names", ignore_errors=True)
        return len(entries)
