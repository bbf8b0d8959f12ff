"""Saved states of one machine: RAM, devices and writable disks, restored in place in a fraction
of a second.

The mechanism is QEMU's own internal snapshots, driven over QMP only (``snapshot-save``,
``snapshot-load``, ``snapshot-delete`` jobs, QEMU >= 6.0), so nothing in the start script changes
(NixOS's run-<name>-vm is not ours):

* The machine state (RAM and devices) goes into a qcow2 of the driver's, ``snapshots.qcow2`` in
  the machine's state directory, attached over QMP (``blockdev-add``) the first time it is
  needed. A guest without any disk (the tiny guest) can be saved too.
* Every writable disk is saved and rewound with it, under the same label (a NixOS VM's
  ``$NIX_DISK_IMAGE`` qcow2). A writable disk that cannot hold a snapshot (raw) is refused
  before anything happens.
* QEMU refuses to save while a 9p share is mounted in the guest, and every NixOS VM mounts
  ``/tmp/shared`` and ``/tmp/xchg``: the shares are unmounted over the backdoor shell before a
  save and mounted again after it, and after a restore (the saved guest had none mounted).
  A busy share is named with what holds it; a Nix store on 9p cannot be saved at all.
* A snapshot waits (a second at most) until the guest's vCPUs are idle: what the guest is busy
  with when it is saved, it would do again after every restore.
* After a restore the guest's wall clock is set from the host's and the console log gets the
  line ``restored snapshot LABEL``.

Timings (TCG, tiny guest, 256 MiB): ``bench/snapshot.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import re
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import MachineError, QMPAPIError
from .qmp import INTERNAL_PREFIX, QMPSession

__all__ = ["BOOT_LABEL", "LABEL", "SnapshotInfo", "Snapshots", "check_label"]

BOOT_LABEL = "booted"  # the default label, and the boot cache's
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
NODE = f"{INTERNAL_PREFIX}snapshots"
FILE_NODE = f"{NODE}-file"
STORE_OPTIONS = "virtualisation.useNixStoreImage = true (or virtualisation.useBootLoader = true)"
FSTAB = "/run/nixos-repl.fstab"  # the shares to mount again (/tmp/.nixos-repl.fstab without /run)

# Before a save, the guest is given this long at most to finish what the unmounting started
# (systemd reading the mount table again...): it is quiet once its vCPUs have used under a
# tenth of a CPU in each of QUIET_POLLS polls QUIET_POLL s apart.
QUIET_WAIT = 1.0
QUIET_POLL = 0.02
QUIET_POLLS = 3

# Runs a guest command; returns (status, output). The lifecycle passes the shell channel's.
Run = Callable[[str], Awaitable[tuple[int, str]]]

# 9p mounts in the guest, one per line: tag, mount point, options.
LIST_SHARES = (
    "while read -r src dst fstype opts _; do "
    '[ "$fstype" = 9p ] && printf "%s %s %s\\n" "$src" "$dst" "$opts"; '
    "done < /proc/mounts; true"
)
# Who holds a mount point (cwd, root or an open file under it): "pid comm" lines.
HOLDERS = r"""t=%s
for p in /proc/[0-9]*; do
  for l in "$p"/cwd "$p"/root "$p"/fd/*; do
    d=$(readlink "$l" 2>/dev/null) || continue
    case "$d" in "$t"|"$t"/*) echo "${p#/proc/} $(cat "$p"/comm 2>/dev/null)"; break;; esac
  done
done; true"""


def check_label(label: str) -> str:
    """A snapshot label: letters, digits, ``._+-``, at most 64 characters."""
    if not isinstance(label, str) or not LABEL.match(label):
        raise MachineError(
            f"snapshot label {label!r} is not valid: use letters, digits, '.', '_', '+' and '-' "
            "(no '/' or spaces), at most 64 characters"
        )
    return label


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One saved state: its label, the size of its machine state, when it was taken."""

    label: str
    size: int  # bytes of RAM and device state
    created: dt.datetime

    @property
    def age(self) -> float:
        """Seconds since it was taken."""
        return (dt.datetime.now(dt.UTC) - self.created).total_seconds()

    def __str__(self) -> str:
        return f"{self.label} ({self.size / 2**20:.1f} MiB, {self.age:.0f} s ago)"


@dataclasses.dataclass(frozen=True)
class _Share:
    tag: str
    target: str  # as /proc/mounts and fstab write it (a space is \040)
    options: str


def mount_all(shares: list[_Share]) -> str:
    """A guest command that mounts ``shares`` again, in this order, and prints what fails.

    One ``mount -a`` over an fstab of their own (util-linux's and busybox's mount both take
    ``-T FILE``) instead of one ``mount`` per share: right after a restore TCG translates every
    program started anew, which on a dynamically linked guest is the larger part of the cost."""
    if not shares:
        return "true"
    lines = " ".join(shlex.quote(f"{s.tag} {s.target} 9p {s.options} 0 0") for s in shares)
    return (
        f"f={FSTAB}; {{ : > $f; }} 2>/dev/null || f=/tmp/.nixos-repl.fstab; "
        f"{{ printf '%s\\n' {lines} > $f && mount -a -T $f; }} 2>&1 || true"
    )


class Snapshots:
    """The saved states of one machine; used by its ``Lifecycle`` while the machine is up."""

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.path = state_dir / "snapshots.qcow2"
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self._attached: QMPSession | None = None  # the QMP session the node was added in
        self._known: list[SnapshotInfo] = []  # the last listing (shown while the machine is off)
        self._shares: dict[str, list[_Share]] = {}  # label -> the 9p shares it was saved without
        self._stamp: tuple[int, int] | None = None  # the file's size and mtime after our last write
        # label -> the backdoor's death token when it was saved (a fork's channel takes it on)
        self.death_tokens: dict[str, bytes] = {}

    # -- QEMU side -----------------------------------------------------------------------------

    async def _attach(self, qmp: QMPSession) -> None:
        """Add the state qcow2 to this QEMU (created on first use), once per QEMU run."""
        if self._attached is qmp:
            return
        # Attaching may touch the file: a change made behind QEMU's back must still show.
        untouched = self._stamp is None or self._file_stamp() == self._stamp
        if not self.path.exists():
            await qmp.run_job(
                "blockdev-create",
                {"options": {"driver": "file", "filename": str(self.path), "size": 0}},
                f"{INTERNAL_PREFIX}create-file",
            )
            await self._add_file_node(qmp)
            await qmp.run_job(
                "blockdev-create",
                {"options": {"driver": "qcow2", "file": FILE_NODE, "size": 2**20}},
                f"{INTERNAL_PREFIX}create-qcow2",
            )
        else:
            await self._add_file_node(qmp)
        await qmp.aexecute(
            "blockdev-add", {"driver": "qcow2", "node-name": NODE, "file": FILE_NODE}
        )
        self._attached = qmp
        if untouched:
            self._stamp = self._file_stamp()

    async def _add_file_node(self, qmp: QMPSession) -> None:
        """The file under the state qcow2, through io_uring where QEMU has it: a load reads the
        saved RAM in thousands of 32 KiB requests, and handing each to QEMU's thread pool
        (its default) costs more CPU than copying the RAM itself."""
        node = {"driver": "file", "node-name": FILE_NODE, "filename": str(self.path)}
        try:
            await qmp.aexecute("blockdev-add", {**node, "aio": "io_uring"})
        except QMPAPIError as e:  # a QEMU built without io_uring
            self.log.debug("state file without io_uring: %s", e.description)
            await qmp.aexecute("blockdev-add", node)

    async def _devices(self, qmp: QMPSession) -> list[str]:
        """The state node and every writable disk; a writable disk that is not qcow2 is refused."""
        devices = [NODE]
        for block in (await qmp.aexecute("query-block"))["return"]:
            inserted = block.get("inserted")
            if not inserted or inserted.get("ro"):
                continue
            node = inserted.get("node-name")
            if inserted.get("drv") != "qcow2":
                raise MachineError(
                    f"{self.name}: cannot save a snapshot: the writable disk "
                    f"{block.get('device') or block.get('qdev') or node} "
                    f"({inserted.get('drv')}: {inserted.get('file')}) cannot hold one; "
                    "use a qcow2 image (NixOS VMs' $NIX_DISK_IMAGE is one) or make it read-only"
                )
            if node != NODE:
                devices.append(str(node))
        return devices

    async def listing(self, qmp: QMPSession | None) -> list[SnapshotInfo]:
        """The saved states, oldest first (the last known ones while QEMU is not running)."""
        if qmp is None or not self.path.exists():
            return list(self._known)
        await self._attach(qmp)
        nodes = (await qmp.aexecute("query-named-block-nodes", {"flat": True}))["return"]
        image: dict[str, Any] = next(
            (n.get("image", {}) for n in nodes if n.get("node-name") == NODE), {}
        )
        self._known = [
            SnapshotInfo(
                s["name"],
                int(s.get("vm-state-size", 0)),
                dt.datetime.fromtimestamp(
                    s.get("date-sec", 0) + s.get("date-nsec", 0) / 1e9, dt.UTC
                ),
            )
            for s in image.get("snapshots", [])
        ]
        return list(self._known)

    async def _unknown(self, qmp: QMPSession, label: str) -> MachineError:
        known = ", ".join(s.label for s in await self.listing(qmp)) or "none yet"
        return MachineError(
            f"{self.name} has no snapshot {label!r} (its snapshots: {known}); "
            f"take one with {self.name}.snapshot({label!r})"
        )

    # -- guest side ----------------------------------------------------------------------------

    async def _unmount_shares(self, run: Run) -> list[_Share]:
        """Unmount the guest's 9p shares (QEMU cannot save with one mounted); the unmounted ones.

        A share that is busy is mounted again with the others, and the error names it and what
        holds it.
        """
        _, listing = await run(LIST_SHARES)
        shares = [
            _Share(*line.split(" ", 2)) for line in listing.splitlines() if line.count(" ") >= 2
        ]
        for share in shares:
            if share.tag == "nix-store" or share.target in ("/nix/store", "/nix/.ro-store"):
                raise MachineError(
                    f"{self.name}: cannot save a snapshot: its Nix store is the host's, mounted "
                    f"over 9p at {share.target}, and QEMU cannot save a machine with a 9p share "
                    f"mounted. Give the VM a store image of its own: {STORE_OPTIONS}"
                )
        done: list[_Share] = []
        for share in reversed(shares):  # nested mounts first
            status, out = await run(f"umount {shlex.quote(share.target)} 2>&1")
            if status != 0:
                _, holders = await run(HOLDERS % shlex.quote(share.target))
                await self._mount_shares(run, done)
                held = ", ".join(
                    f"pid {pid} ({comm})"
                    for pid, _, comm in (h.partition(" ") for h in holders.split("\n") if h)
                )
                raise MachineError(
                    f"{self.name}: cannot save a snapshot: the 9p share {share.target} is busy"
                    + (f", held by {held}" if held else f" ({out.strip()})")
                    + "; stop what uses it (or leave the directory) and try again"
                )
            done.append(share)
        return done

    async def _quiesce(self, qmp: QMPSession) -> None:
        """Wait (QUIET_WAIT at most) until the guest's vCPUs are idle.

        Whatever the guest still has to do when it is saved, it does again after every restore,
        and there TCG translates each of its code paths anew (a load empties the translation
        cache): a systemd guest that is saved while it reads the mount table after the unmount
        spends ~200 ms of each restore on it. The guest's vCPU threads' CPU time tells when it
        is done, without a guest command.
        """
        cpus = (await qmp.aexecute("query-cpus-fast"))["return"]
        stats = [Path(f"/proc/{cpu['thread-id']}/schedstat") for cpu in cpus if "thread-id" in cpu]

        def busy() -> int:
            total = 0
            for stat in stats:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(stat.read_text().split()[0])
            return total

        start = time.monotonic()
        used, quiet = busy(), 0
        while quiet < QUIET_POLLS and time.monotonic() - start < QUIET_WAIT:
            await asyncio.sleep(QUIET_POLL)
            now = busy()
            quiet = quiet + 1 if now - used < QUIET_POLL * 1e9 / 10 else 0
            used = now
        self.log.debug("quiet before the save after %.3f s", time.monotonic() - start)

    async def _mount_shares(self, run: Run, shares: list[_Share]) -> None:
        _, out = await run(mount_all(shares[::-1]))
        for line in filter(None, (line.strip() for line in out.splitlines())):
            self.log.warning("mounting the 9p shares again: %s", line)

    # -- save, restore, delete -----------------------------------------------------------------

    async def save(
        self, qmp: QMPSession, run: Run, label: str, quiesce: bool = True
    ) -> SnapshotInfo:
        """Save the running machine under ``label`` (replacing a snapshot of that label); with
        ``quiesce``, once the guest is quiet (the boot cache saves a boot as soon as the backdoor
        answers, as the cold boot it stands for goes on from there)."""
        check_label(label)
        await self._attach(qmp)
        devices = await self._devices(qmp)
        start = time.monotonic()
        shares = await self._unmount_shares(run)
        try:
            if quiesce:
                await self._quiesce(qmp)
            if any(s.label == label for s in await self.listing(qmp)):
                await self._job(qmp, "snapshot-delete", label, devices)
            await self._job(qmp, "snapshot-save", label, devices, vmstate=NODE)
        except MachineError as e:
            free = shutil.disk_usage(self.path.parent).free
            await self._discard_partial(qmp)
            if free < 64 * 2**20:
                e.args = (
                    f"{e} (the file system of {self.path.parent} is full: {free >> 20} MiB "
                    "free; make room and save again)",
                )
            raise
        finally:
            await self._mount_shares(run, shares)
        self._shares[label] = shares
        info = next(s for s in await self.listing(qmp) if s.label == label)
        self.log.info(
            "saved snapshot %s (%.1f MiB) in %.2f s",
            label,
            info.size / 2**20,
            time.monotonic() - start,
        )
        return info

    async def _discard_partial(self, qmp: QMPSession) -> None:
        """After a failed save: a file that holds no snapshot goes, with what the save wrote."""
        if await self.listing(qmp):
            return  # QEMU keeps what it allocated for reuse; the saved states stay
        for node in (NODE, FILE_NODE):
            with contextlib.suppress(QMPAPIError):
                await qmp.aexecute("blockdev-del", {"node-name": node})
        self._attached = None
        self._stamp = None
        self.path.unlink(missing_ok=True)

    async def load(self, qmp: QMPSession, label: str) -> None:
        """Load ``label`` into the running QEMU (the guest-side steps are the caller's)."""
        check_label(label)
        await self._attach(qmp)
        if not any(s.label == label for s in await self.listing(qmp)):
            raise await self._unknown(qmp, label)
        await self._job(qmp, "snapshot-load", label, await self._devices(qmp), vmstate=NODE)

    async def after_load(self, run: Run, label: str) -> None:
        """The guest-side steps after a load, in one command: the clock, the shares (the saved
        guest had them unmounted)."""
        clock = f"date -u -s @{round(time.time())} >/dev/null 2>&1 || echo could not set the clock"
        _, out = await run(f"{clock}; {mount_all(self._shares.get(label, [])[::-1])}")
        for line in filter(None, (line.strip() for line in out.splitlines())):
            self.log.warning("after restoring %s: %s", label, line)

    async def delete(self, qmp: QMPSession, label: str) -> None:
        check_label(label)
        await self._attach(qmp)
        if not any(s.label == label for s in await self.listing(qmp)):
            raise await self._unknown(qmp, label)
        await self._job(qmp, "snapshot-delete", label, await self._devices(qmp))
        await self.listing(qmp)

    async def _job(
        self,
        qmp: QMPSession,
        command: str,
        label: str,
        devices: list[str],
        vmstate: str | None = None,
    ) -> None:
        args: dict[str, Any] = {"tag": label, "devices": devices}
        if vmstate is not None:
            args["vmstate"] = vmstate
        if command == "snapshot-load":
            self._check_untouched()
        try:
            await qmp.run_job(command, args, f"{INTERNAL_PREFIX}{command}")
        except QMPAPIError as e:
            verb = {
                "snapshot-save": "save",
                "snapshot-load": "restore",
                "snapshot-delete": "delete",
            }
            raise MachineError(
                f"{self.name}: could not {verb[command]} snapshot {label!r}: {e.description}"
            ) from None
        finally:
            self._stamp = self._file_stamp()

    # -- the boot cache's view ------------------------------------------------------------------

    def describe(self, label: str) -> dict[str, Any]:
        """What a fork of ``label`` needs besides the files (kept in a boot cache entry)."""
        info = next(s for s in self._known if s.label == label)
        token = self.death_tokens.get(label)
        return {
            "label": label,
            "size": info.size,
            "shares": [[s.tag, s.target, s.options] for s in self._shares.get(label, [])],
            "token": token.hex() if token is not None else None,
        }

    def adopt(self, described: dict[str, Any]) -> None:
        """Take on a state file from elsewhere (a boot cache entry) with its description."""
        label = str(described["label"])
        self._known = [SnapshotInfo(label, int(described["size"]), dt.datetime.now(dt.UTC))]
        self._shares[label] = [_Share(*share) for share in described.get("shares", [])]
        token = described.get("token")
        if token:
            self.death_tokens[label] = bytes.fromhex(token)
        self._stamp = None

    def reset(self) -> None:
        """Forget every saved state (the file is removed)."""
        self.path.unlink(missing_ok=True)
        self._known, self._shares, self.death_tokens, self._stamp = [], {}, {}, None

    async def disk_files(self, qmp: QMPSession) -> dict[str, Path] | None:
        """The writable disks (file name in the state directory -> file); None when one lives
        elsewhere (a boot cache entry could not carry it)."""
        found: dict[str, Path] = {}
        for block in (await qmp.aexecute("query-block"))["return"]:
            inserted = block.get("inserted")
            if not inserted or inserted.get("ro") or inserted.get("node-name") == NODE:
                continue
            disk = Path(str(inserted.get("file", "")))
            if disk.parent != self.path.parent or not disk.is_file():
                return None
            found[disk.name] = disk
        return found

    @property
    def known(self) -> list[SnapshotInfo]:
        """The snapshots as last listed (no QEMU call)."""
        return list(self._known)

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def _check_untouched(self) -> None:
        """Refuse to load states that something else wrote to (QEMU would load them half-way
        and leave the machine broken)."""
        if self._stamp is not None and self._file_stamp() != self._stamp:
            raise MachineError(
                f"{self.name}: not restoring: {self.path} was changed by something other than "
                "this machine's QEMU (truncated or overwritten?), so its saved states cannot be "
                f"trusted. Take a new snapshot ({self.name}.snapshot(LABEL)); the machine is as "
                "it was"
            )

    def forget(self) -> None:
        """QEMU is gone: the node with it (the file stays, for a fork of this machine). QEMU
        wrote the file last as it closed it."""
        if self._attached is not None and self._stamp is not None:
            self._stamp = self._file_stamp()
        self._attached = None
