"""The life of one machine's QEMU: start, connect, stop, crash detection, and its one state.

``MachineState`` is the only record of where a machine is; ``booted`` and ``connected`` are read
from it, so they cannot disagree with it. Every change goes through ``Lifecycle._set_state``,
which logs it and tells the registry's watchers (as qemu.qmp's ``_set_state`` does)::

    defined -> starting -> up -> stopping -> off
                  ^        |  ^               |
                  +--------+  |  (reboot)     +--> starting (start() again)
                     saving / restoring (a snapshot; back to up)
    starting/up/stopping --(QEMU exits unexpectedly)--> crashed --(start())--> starting

What each state allows is checked in one place (``check`` / ``require_running``), with a
message that names the state and the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..errors import MachineError
from .bootcache import BootCache, key_parts
from .console import Console
from .monitor import Monitor
from .process import QemuProcess, driver_qemu_options, graphical_display_available
from .qmp import QMPSession
from .shell import OUT_CHARDEV, ShellChannel
from .snapshot import BOOT_LABEL, SnapshotInfo, Snapshots, check_label
from .timing import Duration, nested, seconds
from .turbo import turbo_env

__all__ = ["CONNECT_TIMEOUT", "Lifecycle", "MachineState", "ShellFraming"]

T = TypeVar("T")

# How long connect() waits for the backdoor banner (nixpkgs: 10 x 30 s).
CONNECT_TIMEOUT = dt.timedelta(minutes=5)
# Sockets QEMU connects to right after it starts.
SOCKET_TIMEOUT = 60.0
# QMP SHUTDOWN reasons that mean the machine was powered off on purpose.
CLEAN_SHUTDOWNS = ("guest-shutdown", "host-qmp-quit")

ShellFraming = Literal["auto", "nixpkgs"]


class MachineState(StrEnum):
    """Where a machine is. A ``StrEnum``: ``machine.state == "up"`` works."""

    DEFINED = "defined"  # never started
    STARTING = "starting"  # QEMU runs; the backdoor shell is not connected (yet, or again)
    UP = "up"  # the backdoor shell is connected
    SAVING = "saving"  # a snapshot is being taken; commands wait for it
    RESTORING = "restoring"  # a snapshot is being loaded; commands wait for it
    STOPPING = "stopping"  # QEMU is expected to exit (shutdown, crash, release, reboot)
    OFF = "off"  # QEMU exited as expected
    CRASHED = "crashed"  # QEMU exited unexpectedly; start() boots it again

    @property
    def running(self) -> bool:
        """Whether a QEMU process belongs to this state (nixpkgs' ``booted``)."""
        return self not in (MachineState.DEFINED, MachineState.OFF, MachineState.CRASHED)


class RunState:
    """The state of a machine's run and its one transition point (both kinds of machine)."""

    name: str
    log: logging.Logger
    state: MachineState
    started_at: float | None  # time.time() of the last start
    crash_report: str | None
    connect_timeout: Duration  # how long a command waits for the machine to answer
    _on_change: Callable[[], None] | None
    _stopped: asyncio.Event  # set when the current run's process is gone
    kind = "VM"  # in log lines: "waiting for the VM to power off"

    @property
    def pid(self) -> int | None:
        """The machine's process (QEMU, systemd-nspawn), while it runs."""
        raise NotImplementedError

    def _set_state(self, state: MachineState) -> None:
        """The one transition point: logs the change and notifies the watchers."""
        if state is self.state:
            return
        self.log.debug("state %s -> %s", self.state, state)
        self.state = state
        if self._on_change is not None:
            self._on_change()

    def uptime(self) -> float | None:
        """Seconds since the machine's process started, while it runs."""
        if self.started_at is None or not self.state.running:
            return None
        return time.time() - self.started_at

    def _check_crashed(self) -> None:
        if self.state is MachineState.CRASHED:
            raise MachineError(self.crash_report or f"machine '{self.name}' crashed")

    async def explain_death(self) -> None:
        """After a lost connection: if the machine is dying, raise its crash report instead."""
        if self.pid is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), 1.0)
        self._check_crashed()

    async def wait_for_shutdown(self, timeout: Duration | None = None) -> None:
        """Wait until the machine's process has exited (nixpkgs: no-op unless booted)."""
        if not self.state.running:
            return
        with nested(self.log, f"waiting for the {self.kind} to power off"):
            await asyncio.wait_for(self._stopped.wait(), seconds(timeout))


class Lifecycle(RunState):
    """Owns one machine's QEMU run: the process, its sockets and sessions, and the state."""

    def __init__(
        self,
        name: str,
        start_command: str,
        state_dir: Path,
        shared_dir: Path,
        console: Console,
        *,
        env: Mapping[str, str],
        shell_framing: ShellFraming = "auto",
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.start_command = start_command
        self.state_dir = state_dir
        self.shared_dir = shared_dir
        self.console = console
        self.extra_env = dict(env)
        self.shell_framing: ShellFraming = shell_framing
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.state = MachineState.DEFINED
        self.allow_reboot = False
        self.connect_timeout: Duration = CONNECT_TIMEOUT
        self.socket_timeout = SOCKET_TIMEOUT  # for QEMU to connect to the driver's sockets
        self.crash_report: str | None = None
        self.started_at: float | None = None  # time.time() of the last start
        self.process: QemuProcess | None = None
        self.qmp: QMPSession | None = None
        self.monitor: Monitor | None = None
        self.shell: ShellChannel | None = None
        self._on_change = on_change
        self._shutdown_reason: str | None = None
        self._reset_expected = False  # reboot() sent Ctrl-Alt-Delete and prepared already
        self._start_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()  # set when the current run's QEMU is gone
        self.snapshots = Snapshots(name, state_dir)
        # With a boot cache: where to save this machine once it has booted cold.
        self._cache_todo: tuple[BootCache, dict[str, str]] | None = None
        # The state file's ``booted`` is the saved boot (the cache's, or the one saved for it),
        # no snapshot of the machine's own was taken since, and it has no writable disk (whose
        # changes a restart keeps): a restart forks from it.
        self._boot_in_state_file = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.state.running else None

    def check(self, action: str) -> None:
        """Raise if the machine cannot ``action`` in its state (crashed, or shutting down)."""
        self._check_crashed()
        if self.state is MachineState.STOPPING:
            raise MachineError(
                f"{self.name} is shutting down, so it cannot {action}. Call "
                f"{self.name}.wait_for_shutdown(), then {self.name}.start() to boot it again."
            )

    def require_running(self, action: str) -> QemuProcess:
        """The running QEMU, or a MachineError saying why there is none and what to do."""
        self.check(action)
        if self.process is None or not self.state.running:
            raise MachineError(
                f"{self.name} is {self.state}, so it cannot {action}. "
                f"Call {self.name}.start() first."
            )
        return self.process

    # -- start ---------------------------------------------------------------------------------

    async def start(self, allow_reboot: bool = False) -> None:
        """Start QEMU unless it runs; does not wait for the guest to boot. With a boot cache
        that has the machine, it starts from its saved boot (and is up when this returns)."""
        if not self.state.running:
            async with self._connect_lock:
                self.allow_reboot = allow_reboot
                if not self.state.running and await self._start_from_cache():
                    return
        await self._spawn(allow_reboot)

    async def _spawn(self, allow_reboot: bool, paused: bool = False) -> None:
        """Start QEMU unless it runs. ``paused``: the guest does not run until QMP ``cont``
        (to load a saved state first)."""
        async with self._start_lock:
            if self.state.running:
                return
            await self._start(allow_reboot, paused)

    async def _start(self, allow_reboot: bool, paused: bool = False) -> None:
        self.crash_report = None
        self._shutdown_reason = None
        self._reset_expected = False
        self.allow_reboot = allow_reboot
        self._stopped = asyncio.Event()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.console.reset(self.state_dir / "console.log")
        # Synchronous (no await), so a start is never cut between its state and its process. A
        # bzImage is hashed once per process and extracted once per content.
        turbo = turbo_env(self.name, self.start_command, {**os.environ, **self.extra_env}, self.log)
        process = QemuProcess(self.name, self.start_command, self.state_dir)
        self.process = process
        self._set_state(MachineState.STARTING)
        env = {
            **os.environ,
            **self.extra_env,
            "TMPDIR": str(self.state_dir),
            "SHARED_DIR": str(self.shared_dir),
            "USE_TMPDIR": "1",
        }
        env.update(turbo)
        extra = driver_qemu_options(self.state_dir, allow_reboot, graphical_display_available())
        if paused:
            extra.append("-S")
        try:
            process.spawn(extra, env, self.console.feed)
            monitor = await process.accept("monitor", self.socket_timeout)
            shell = await process.accept("shell", self.socket_timeout)
            out = await process.accept("nixos-repl-out", self.socket_timeout)
            ctl = await process.accept("nixos-repl-ctl", self.socket_timeout)
            self.shell = ShellChannel(self.name, shell, out, ctl, self._out_port_open)
            self.monitor = Monitor(self.name, monitor)
            self.qmp = QMPSession(self.name, self._on_qmp_event)
            await self.qmp.connect(self.state_dir / "qmp")
            await self.monitor.greeting()
        except BaseException as e:
            # Shielded: an interrupt (often the reason we are here) must not cut the cleanup.
            await asyncio.shield(self._abandon(process))
            if isinstance(e, MachineError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise MachineError(
                f"{self.name}: could not start QEMU: {e}\n{process.describe_exit()}"
            ) from e
        self.started_at = time.time()
        self.log.info("QEMU running (pid %s)", process.pid)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_exit(process))

    async def _abandon(self, process: QemuProcess) -> None:
        """Undo a start that failed or was interrupted half-way: nothing may be left behind."""
        await process.terminate()
        await self._teardown()
        self._set_state(MachineState.OFF)
        self._stopped.set()

    def _on_qmp_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "SHUTDOWN":
            self._shutdown_reason = str((event.get("data") or {}).get("reason", ""))
        elif event.get("event") == "RESET" and self.allow_reboot:
            if self._reset_expected:  # reboot() has prepared for it already
                self._reset_expected = False
            else:
                self.expect_new_boot()

    async def _out_port_open(self) -> bool:
        """Whether the guest holds the command output port open (QMP ``query-chardev``)."""
        if self.qmp is None:
            raise MachineError(f"{self.name}: QMP is not connected")
        reply = await self.qmp.aexecute("query-chardev")
        return any(
            c.get("label") == OUT_CHARDEV and c.get("frontend-open") for c in reply["return"]
        )

    # -- connect -------------------------------------------------------------------------------

    async def connect(self) -> ShellChannel:
        """Start QEMU if needed and wait for the backdoor shell (nixpkgs' ``connect``)."""
        if self.state is MachineState.UP and self.shell is not None:
            return self.shell
        self.check("run a command")
        async with self._connect_lock:  # one caller reads the banner; the others wait for it
            if self.state is not MachineState.UP:
                await self._connect()
        assert self.shell is not None
        return self.shell

    async def _connect(self) -> None:
        with nested(self.log, "waiting for the VM to finish booting"):
            if not self.state.running and await self._start_from_cache():
                return
            await self._spawn(self.allow_reboot)
            self.check("run a command")
            shell = self.shell
            assert shell is not None
            start = time.monotonic()
            limit = seconds(self.connect_timeout)
            try:
                banner = await self.guard(asyncio.wait_for(shell.wait_for_banner(), limit))
            except TimeoutError:
                tail = "\n".join(self.console.tail(20))
                raise MachineError(
                    f"{self.name}: the backdoor shell did not start within {limit:g} s. "
                    f"Last console lines:\n{tail}\n"
                    f"To debug, look at the console (get_console_log()) or the screen."
                ) from None
            self.log.info("Guest shell says: %r", banner)
            if self.shell_framing != "nixpkgs":
                await self.guard(shell.setup())
            self._set_state(MachineState.UP)
            self.log.info("connected to guest root shell")
            self.log.info("(connecting took %.2f seconds)", time.monotonic() - start)
            await self._fill_cache()

    def expect_new_boot(self) -> None:
        """The guest reboots in the same QEMU: the next command waits for the new backdoor."""
        if self.shell is not None:
            self.shell.new_boot()
        if self.state is MachineState.UP:
            self._set_state(MachineState.STARTING)

    def expect_reset(self) -> None:
        """reboot() is about to press Ctrl-Alt-Delete: a reboot, or the end of QEMU."""
        if self.allow_reboot:
            self._reset_expected = True
        else:
            self._set_state(MachineState.STOPPING)

    # -- guarding against QEMU's death ---------------------------------------------------------

    async def guard(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` but fail at once with the crash report if QEMU dies meanwhile."""
        process = self.process
        task = asyncio.ensure_future(coro)
        if process is None:
            return await task
        exited = asyncio.ensure_future(process.exited.wait())
        try:
            done, _ = await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        finally:
            exited.cancel()
        if task in done:
            try:
                return task.result()
            except (MachineError, ConnectionError):
                await self.explain_death()  # a lost connection is usually QEMU dying
                raise
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await self.explain_death()
        raise MachineError(
            f"{self.name}: QEMU exited (status {process.returncode}) while waiting.\n"
            f"{process.describe_exit()}"
        )

    async def qmp_execute(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a QMP command (starting QEMU if needed), failing with the crash report if QEMU
        dies meanwhile."""
        await self.start_if_needed()
        assert self.qmp is not None
        client = self.qmp
        try:
            return await self.guard(client.aexecute(command, args))
        except ConnectionError:
            await self.explain_death()
            raise

    async def monitor_command(self, command: str) -> str:
        """Run an HMP command (starting QEMU if needed); its raw reply."""
        await self.start_if_needed()
        assert self.monitor is not None
        return await self.guard(self.monitor.command(command))

    async def start_if_needed(self) -> None:
        """QEMU-side calls boot a machine that is not running, as in nixpkgs; not a crashed one.

        A machine shutting down still answers until QEMU exits.
        """
        self._check_crashed()
        await self.start(self.allow_reboot)
        self._check_crashed()
        if self._cache_todo is not None:
            # Keys, screenshots, monitor commands before the backdoor answered: what it would
            # save is no longer a boot.
            self.log.info("boot cache: not saving %s: it was driven while booting", self.name)
            self._cache_todo = None

    # -- snapshots -----------------------------------------------------------------------------

    async def _guest_run(self, command: str) -> tuple[int, str]:
        assert self.shell is not None
        status, out = await self.guard(self.shell.execute(command, timeout=60.0))
        return status, out.decode(errors="replace")

    async def save(self, label: str) -> SnapshotInfo:
        """Save the machine (RAM, devices, writable disks) under ``label``; it stays up.

        A command running on the machine is waited for; new ones wait for the save.
        """
        check_label(label)
        if self.state is not MachineState.UP:
            self.require_running("save a snapshot")
            raise MachineError(
                f"{self.name} is {self.state}, so it cannot save a snapshot yet; wait until it "
                f"is up ({self.name}.connect())"
            )
        async with self._connect_lock:  # new commands wait in connect() until it is up again
            self._boot_in_state_file = False
            return await self._save_locked(label)

    async def _save_locked(self, label: str, quiesce: bool = True) -> SnapshotInfo:
        assert self.qmp is not None
        self._set_state(MachineState.SAVING)
        try:
            info = await self.guard(self.snapshots.save(self.qmp, self._guest_run, label, quiesce))
            if self.shell is not None:
                self.snapshots.death_tokens[label] = self.shell.death_token
            return info
        finally:
            self._up_again()

    # -- the boot cache ------------------------------------------------------------------------

    async def _start_from_cache(self) -> bool:
        """With a boot cache: start from its saved boot when there is one (True), else note
        what to save once booted. A machine with snapshots of its own keeps them (no cache)."""
        self._cache_todo = None
        # The framing is in the key: the fast one leaves the guest's shell switched to it.
        env = {**os.environ, **self.extra_env, "NIXOS_REPL_SHELL_FRAMING": self.shell_framing}
        cache = BootCache.from_env(env)
        if cache is None:
            return False
        if self.snapshots.path.exists():
            return self._boot_in_state_file and await self._fork_saved_boot_again()
        parts = key_parts(self.start_command, env)
        entry, why = cache.lookup(self.name, parts)
        if entry is None:
            self.log.info("boot cache: booting %s cold (%s)", self.name, why)
            self._cache_todo = (cache, parts)
            return False
        try:
            cache.install(entry, self.state_dir)
            self.snapshots.adopt(entry.meta)
            await self._fork_locked(BOOT_LABEL)
        except (MachineError, OSError, LookupError, TypeError, ValueError) as e:
            self.log.warning(
                "boot cache: booting %s cold: its saved boot failed (%s)", self.name, e
            )
            cache.uninstall(entry, self.state_dir)
            if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)):
                cache.discard(entry)  # a full state directory is not the entry's fault
            self.snapshots.reset()
            self._cache_todo = (cache, parts)
            return False
        self.log.info("boot cache: %s started from its saved boot (%s)", self.name, entry.path)
        self._boot_in_state_file = not entry.meta.get("disks")
        return True

    async def _fork_saved_boot_again(self) -> bool:
        """A restart (after a crash, a shutdown) forks from the saved boot in the state file."""
        try:
            await self._fork_locked(BOOT_LABEL)
        except MachineError as e:
            self.log.warning(
                "boot cache: booting %s cold: its saved boot failed (%s)", self.name, e
            )
            self._boot_in_state_file = False
            return False
        self.log.info("boot cache: %s started again from its saved boot", self.name)
        return True

    async def _fill_cache(self) -> None:
        """After a cold boot with a boot cache: save the machine and keep it there."""
        todo, self._cache_todo = self._cache_todo, None
        if todo is None or self.qmp is None:
            return
        cache, parts = todo
        qmp = self.qmp
        disks = await self.snapshots.disk_files(qmp)
        if disks is None:
            self.log.info(
                "boot cache: not saving %s: a writable disk is outside its state directory",
                self.name,
            )
            return
        try:
            await self._save_locked(BOOT_LABEL, quiesce=False)
        except MachineError as e:  # the machine is up all the same (a full disk, say)
            self.log.warning("boot cache: could not save the boot of %s: %s", self.name, e)
            return
        self._boot_in_state_file = not disks
        await qmp.aexecute("stop")  # the disks hold still while they are copied
        meta = {**self.snapshots.describe(BOOT_LABEL), "command": self.start_command}
        try:
            entry = await asyncio.to_thread(
                cache.store, self.name, parts, self.snapshots.path, disks, meta
            )
        except OSError as e:  # the machine is up all the same
            self.log.warning("boot cache: could not save the boot of %s: %s", self.name, e)
            return
        finally:
            await qmp.aexecute("cont")
        self.log.info("boot cache: saved the boot of %s (%s)", self.name, entry.path)

    async def restore(self, label: str) -> None:
        """Bring the machine back to the state saved as ``label``: in place, in the same QEMU,
        when it runs; from a new QEMU started from that state (a fork) when it is off."""
        check_label(label)
        if not self.state.running:
            await self._fork(label)
            return
        if self.state is not MachineState.UP:
            self.require_running("restore a snapshot")
            raise MachineError(
                f"{self.name} is {self.state}, so it cannot restore a snapshot yet; wait until "
                f"it is up ({self.name}.connect())"
            )
        async with self._connect_lock:
            qmp, shell = self.qmp, self.shell
            assert qmp is not None and shell is not None
            self._set_state(MachineState.RESTORING)
            start = time.monotonic()
            try:
                # A command running now belongs to the timeline being abandoned: wait for it
                # (the shell's lock), then load with the channel idle on both sides.
                async with shell.idle():
                    try:
                        await self.guard(self.snapshots.load(qmp, label))
                    except MachineError as e:
                        await self._after_failed_load(qmp, e)
                        raise
                    shell.rewound()
                await self.guard(self.snapshots.after_load(self._guest_run, label))
            finally:
                self._up_again()
        self.console.note(f"restored snapshot {label}")
        self.log.info("restored snapshot %s in %.2f s", label, time.monotonic() - start)

    async def _fork(self, label: str) -> None:
        """Start QEMU paused, load ``label`` into it and let it run: the guest goes on from the
        saved state (its backdoor up already) instead of booting."""
        self._check_can_fork(label)
        async with self._connect_lock:
            await self._fork_locked(label)

    async def _fork_locked(self, label: str) -> None:
        start = time.monotonic()
        await self._spawn(self.allow_reboot, paused=True)
        qmp, shell = self.qmp, self.shell
        assert qmp is not None and shell is not None
        self._set_state(MachineState.RESTORING)
        try:
            await self.guard(self.snapshots.load(qmp, label))
            await self.guard(qmp.aexecute("cont"))
            shell.resume(self.snapshots.death_tokens.get(label) or shell.death_token)
            if self.shell_framing != "nixpkgs":
                await self.guard(shell.setup())
        except BaseException:
            process = self.process
            if process is not None:
                await asyncio.shield(self._abandon(process))
            raise
        self._set_state(MachineState.UP)
        await self.guard(self.snapshots.after_load(self._guest_run, label))
        self.console.note(f"restored snapshot {label}")
        self.log.info("started from snapshot %s in %.2f s", label, time.monotonic() - start)

    def _check_can_fork(self, label: str) -> None:
        if self.state is MachineState.STOPPING:
            self.check("restore a snapshot")
        known = [s.label for s in self.snapshots.known]
        if label not in known:
            raise MachineError(
                f"{self.name} has no snapshot {label!r} to start from (its snapshots: "
                f"{', '.join(known) or 'none yet'}); take one while it runs with "
                f"{self.name}.snapshot({label!r})"
            )

    async def _after_failed_load(self, qmp: QMPSession, error: MachineError) -> None:
        """A load QEMU gave up on half-way leaves a guest that cannot run: stop it, and say so."""
        with contextlib.suppress(Exception):
            if (await qmp.aexecute("query-status"))["return"].get("running"):
                return  # refused before anything was loaded: the machine is as it was
        self.log.error("the failed restore left the guest half-loaded; stopping QEMU")
        process = self.process
        self._set_state(MachineState.STOPPING)
        if process is not None:
            await process.terminate()
            await self._stopped.wait()
        error.args = (
            f"{error}\nThe guest was half-loaded, so its QEMU was stopped: the machine is off. "
            f"Start it again ({self.name}.start()).",
        )

    def _up_again(self) -> None:
        if self.state in (MachineState.SAVING, MachineState.RESTORING):
            self._set_state(MachineState.UP)

    async def list_snapshots(self) -> list[SnapshotInfo]:
        return await self.snapshots.listing(self.qmp if self.state.running else None)

    async def delete_snapshot(self, label: str) -> None:
        if not self.state.running or self.qmp is None:
            raise MachineError(
                f"{self.name} is {self.state}: start it to delete a snapshot ({self.name}.start())"
            )
        self._boot_in_state_file = False
        await self.guard(self.snapshots.delete(self.qmp, label))

    # -- stop ----------------------------------------------------------------------------------

    async def _watch_exit(self, process: QemuProcess) -> None:
        await process.exited.wait()
        code = process.returncode
        clean = self.state is MachineState.STOPPING or self._shutdown_reason in CLEAN_SHUTDOWNS
        if not clean:
            tail = "\n".join(f"    {line}" for line in self.console.tail(20)) or "    (nothing)"
            reason = f" ({self._shutdown_reason})" if self._shutdown_reason else ""
            self.crash_report = (
                f"machine '{self.name}' crashed: QEMU (pid {process.pid}) exited with status "
                f"{code}{reason}.\nLast console lines:\n{tail}\n{process.describe_exit()}\n"
                f"Call {self.name}.start() to boot it again."
            )
            self.log.error("%s", self.crash_report)
        await self._teardown()
        self._set_state(MachineState.OFF if clean else MachineState.CRASHED)
        self._stopped.set()

    async def _teardown(self) -> None:
        """Close every connection of the current QEMU run (the process is gone or going)."""
        self.snapshots.forget()
        if self.qmp is not None:
            await self.qmp.close()
        if self.shell is not None:
            self.shell.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.process is not None:
            self.process.close_sockets()
        self.console.close()

    async def shutdown(self) -> None:
        """Send ``poweroff`` to the backdoor shell and wait for QEMU to exit."""
        if not self.state.running or self.shell is None:
            return
        shell = self.shell
        self._set_state(MachineState.STOPPING)
        with contextlib.suppress(MachineError):
            await shell.send_raw(b"poweroff\n")
        await self.wait_for_shutdown()

    async def crash(self) -> None:
        """Make QEMU quit at once (HMP ``quit``), as if the machine lost power."""
        if not self.state.running or self.monitor is None:
            return
        monitor = self.monitor
        self.log.info("forced crash")
        self._set_state(MachineState.STOPPING)
        with contextlib.suppress(MachineError):
            await monitor.command("quit")
        await self.wait_for_shutdown()

    async def release(self) -> None:
        """Kill QEMU and close everything (the registry's teardown; nixpkgs' ``release``)."""
        process = self.process
        if process is None or not self.state.running:
            return
        self.log.info("kill QemuMachine (pid %s)", process.pid)
        self._set_state(MachineState.STOPPING)
        await process.terminate()
        await self._stopped.wait()
