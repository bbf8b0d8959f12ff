"""The nixpkgs testScript Machine API as coroutines: ``machine.aio``.

Every method of nixpkgs' ``QemuMachine`` is defined here once, as a coroutine with its
documentation; ``Machine`` (in ``__init__.py``) gets its synchronous twin from it with
``sync()``, so the two cannot drift. The coroutines run on the shared I/O loop and can be
awaited from any event loop (IPython's, Jupyter's), so a notebook cell can drive several machines
at once::

    await asyncio.gather(vm1.aio.succeed("make"), vm2.aio.wait_for_unit("nginx"))

Each method is a few lines over the machine's parts: ``Lifecycle`` (QEMU, state, QMP, monitor),
``ShellChannel`` (the backdoor shell), ``Screen`` (screenshots, keys, OCR) and ``Console`` (the
serial console). Timeouts take a ``datetime.timedelta`` or a number of seconds, as in nixpkgs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import re
import shlex
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

from ..errors import MachineError, RequestedAssertionFailed
from ..loop import on_io_loop, run_sync
from . import systemd, waits
from .actions import observed
from .monitor import hmp_output, tcp_port
from .screenshot import Screenshot
from .shell import abbreviate
from .snapshot import SnapshotInfo
from .timing import (
    DEFAULT_TIMEOUT,
    Duration,
    attempt_expired,
    bounded,
    nested,
    poll_until,
    seconds,
    timed_out,
)

if TYPE_CHECKING:
    import logging

    from .console import Console
    from .lifecycle import Lifecycle
    from .screen import Screen

__all__ = ["AsyncMachine", "sync"]

P = ParamSpec("P")
T = TypeVar("T")

# The first VLAN NIC: the second virtio-net device (the first one is user networking).
VLAN_NIC = "virtio-net-pci.1"
# Where the guest mounts the shared directory (nixpkgs' ``/tmp/shared``).
GUEST_SHARED = Path("/tmp/shared")


class MachineParts(Protocol):
    """What the coroutines use of their machine (``Machine`` in ``__init__.py`` has it)."""

    name: str
    out_dir: Path
    shared_dir: Path
    logger: logging.Logger
    console: Console
    lifecycle: Lifecycle
    screen: Screen
    # Run before every command and monitor command (the polling conditions).
    callbacks: list[Callable[[], None]]


class _HasAio(Protocol):
    @property
    def aio(self) -> AsyncMachine: ...


def sync(
    afn: Callable[Concatenate[AsyncMachine, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[_HasAio, P], T]:
    """The blocking twin of an ``AsyncMachine`` coroutine, as a ``Machine`` method.

    Same signature, same documentation. The call waits on the I/O loop; Ctrl-C (a
    KeyboardInterrupt) cancels the coroutine, whose cancellation path keeps every channel in
    sync (a guest command is killed, not abandoned).
    """

    @functools.wraps(afn)
    def twin(self: _HasAio, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(afn(self.aio, *args, **kwargs))

    return twin


class AsyncMachine:
    """The coroutine form of one machine's nixpkgs API (``vm1.aio``); see ``Machine``."""

    def __init__(self, machine: MachineParts) -> None:
        self._m = machine

    def __repr__(self) -> str:
        return f"<AsyncMachine {self._m.name!r}>"

    async def _polling_conditions(self) -> None:
        """Run the machine's callbacks (nixpkgs' polling conditions) before a command, a
        monitor command, a screendump or a key press (nixpkgs runs them in
        ``send_monitor_command``, which screenshots, keys and ``crash`` go through).

        They run in a worker thread, so they may use the blocking API themselves. A callback
        with a length of 0 (the driver's conditions while there are none) is skipped.
        """
        for callback in self._m.callbacks:
            if _active(callback):
                await asyncio.to_thread(callback)

    def _host_loops(self) -> bool:
        """Whether waits loop on the host: polling conditions run before each try."""
        return any(map(_active, self._m.callbacks))

    # -- lifecycle -----------------------------------------------------------------------------

    @on_io_loop
    async def start(self, allow_reboot: bool = False) -> None:
        """Start QEMU if it is not running. Does not wait for the guest to boot.

        With ``allow_reboot`` the guest may reboot inside the same QEMU (nixpkgs: QEMU gets
        ``-no-reboot`` otherwise and exits on a reboot). After a crash this boots it again.
        """
        await self._m.lifecycle.start(allow_reboot)

    @on_io_loop
    async def connect(self) -> None:
        """Start the machine if needed and wait for the backdoor shell (up to 5 minutes).

        Every command does this first, so it is rarely needed by hand.
        """
        await self._m.lifecycle.connect()

    @on_io_loop
    async def shutdown(self) -> None:
        """Power the guest off from its shell (``poweroff``) and wait for QEMU to exit."""
        await self._m.lifecycle.shutdown()

    @on_io_loop
    async def wait_for_shutdown(self, timeout: Duration | None = None) -> None:
        """Wait until QEMU has exited (for ever without ``timeout``; TimeoutError after it)."""
        await self._m.lifecycle.wait_for_shutdown(timeout)

    @on_io_loop
    async def crash(self) -> None:
        """Make QEMU quit at once, as if the machine lost power (HMP ``quit``)."""
        await self._polling_conditions()
        await self._m.lifecycle.crash()

    @on_io_loop
    async def release(self) -> None:
        """Kill QEMU and close every connection (what the driver does at the end of a test)."""
        await self._m.lifecycle.release()

    @on_io_loop
    async def reboot(self) -> None:
        """Press Ctrl-Alt-Delete; the next command waits for the guest to come back.

        Useful when started with ``start(allow_reboot=True)``; otherwise QEMU exits on the reset
        and the machine is off (not crashed).
        """
        lifecycle = self._m.lifecycle
        await lifecycle.start_if_needed()
        # Before the reset is expected: a failing polling condition must leave nothing pending.
        await self._polling_conditions()
        lifecycle.expect_reset()
        await self.send_key("ctrl-alt-delete")
        if lifecycle.allow_reboot:
            lifecycle.expect_new_boot()

    @on_io_loop
    async def switch_root(self) -> None:
        """Leave a NixOS systemd initrd with a backdoor (``testing.initrdBackdoor``) for stage 2,
        and wait for the stage-2 backdoor."""
        await self.wait_for_unit("initrd.target")
        await self.execute(
            "systemctl isolate --no-block initrd-switch-root.target 2>/dev/null >/dev/null",
            check_return=False,
            check_output=False,
        )
        self._m.lifecycle.expect_new_boot()
        await self.connect()

    # -- commands ------------------------------------------------------------------------------

    @on_io_loop
    async def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Duration | None = DEFAULT_TIMEOUT,
    ) -> tuple[int, str]:
        """Run ``command`` in the guest's root shell; returns ``(status, stdout)``.

        As in nixpkgs: ``bash`` semantics with ``set -euo pipefail``, a fresh shell per command
        (``cd`` and variables do not carry over), stdout only (stderr goes to the serial
        console), and the call returns when stdout closes, so a background job that keeps it
        open is waited for (redirect its output to avoid that). After ``timeout`` (15 minutes by
        default; ``None`` for no limit) the command is killed and the status is 124.
        ``check_return=False`` returns ``(-1, stdout)``; ``check_output=False`` returns
        ``(-2, "")`` at once, and the command still stops at ``timeout``.

        Differences from nixpkgs: the timeout is enforced by the driver; Ctrl-C kills the command
        and what it started in the guest; stdin is ``/dev/null``. Inside a try of a wait with
        ``attempt_timeout``, the command is also cut when that try's time is up.
        """
        await self._polling_conditions()
        lifecycle = self._m.lifecycle
        shell = await lifecycle.connect()
        try:
            status, out = await shell.execute(command, bounded(seconds(timeout)), wait=check_output)
        except (MachineError, ConnectionError) as e:
            await lifecycle.explain_death()
            if isinstance(e, MachineError):
                raise
            raise MachineError(f"{self._m.name}: lost the connection to QEMU: {e}") from e
        if not check_output:
            return -2, ""
        if not check_return:
            return -1, out.decode(errors="replace")
        return status, out.decode(errors="replace")

    @on_io_loop
    async def succeed(self, *commands: str, timeout: Duration | None = None) -> str:
        """Run each command; all must exit 0. Returns their stdout, concatenated.

        A failing command raises ``RequestedAssertionFailed`` (``command `...` failed (exit code
        N)``) after logging its output. ``timeout`` bounds each command (none by default).
        """
        output = ""
        for command in commands:
            with nested(self._m.logger, f"must succeed: {abbreviate(command)}"):
                status, out = await self.execute(command, timeout=timeout)
                if status != 0:
                    self._m.logger.info("output: %s", out)
                    raise RequestedAssertionFailed(
                        f"command `{abbreviate(command)}` failed (exit code {status})"
                    )
                output += out
        return output

    @on_io_loop
    async def fail(self, *commands: str, timeout: Duration | None = None) -> str:
        """Run each command; all must exit non-zero. Returns their stdout, concatenated."""
        output = ""
        for command in commands:
            with nested(self._m.logger, f"must fail: {abbreviate(command)}"):
                status, out = await self.execute(command, timeout=timeout)
                if status == 0:
                    raise RequestedAssertionFailed(
                        f"command `{abbreviate(command)}` unexpectedly succeeded"
                    )
                output += out
        return output

    async def _wait_for_status(
        self,
        command: str,
        want_success: bool,
        timeout: Duration,
        attempt_timeout: Duration | None = None,
    ) -> str:
        limit = seconds(timeout)
        assert limit is not None
        start = time.monotonic()
        output = ""
        # Polling conditions run before each try, and a bounded try is the host's to cut: in
        # those cases the host loops.
        if attempt_timeout is None and not self._host_loops():
            seen, output = await waits.until(
                self.execute, self._m.logger, command, want_success, limit
            )
            if seen:
                return output
            raise timed_out(start, limit)  # the loop's try at the deadline was the last one

        async def check(_last_try: bool) -> bool:
            nonlocal output
            status, output = await self.execute(command, timeout=limit)
            # A try cut by ``attempt_timeout`` neither succeeded nor failed.
            return (status == 0) == want_success and not attempt_expired()

        await poll_until(check, limit, seconds(attempt_timeout), start)
        return output

    @on_io_loop
    async def wait_until_succeeds(
        self,
        command: str,
        timeout: Duration = DEFAULT_TIMEOUT,
        attempt_timeout: Duration | None = None,
    ) -> str:
        """Run ``command`` until it exits 0; returns its last output.

        Raises ``RequestedAssertionFailed`` (``action timed out after ...``) after ``timeout``.
        Tries again after 50 ms, doubling up to 1 s (nixpkgs: every second). With
        ``attempt_timeout`` (nixpkgs' in-flight per-attempt bound) a try that blocks is killed
        after that long and the next one starts; without it one try may use the whole budget.
        """
        with nested(self._m.logger, f"waiting for success: {abbreviate(command)}"):
            return await self._wait_for_status(command, True, timeout, attempt_timeout)

    @on_io_loop
    async def wait_until_fails(
        self,
        command: str,
        timeout: Duration = DEFAULT_TIMEOUT,
        attempt_timeout: Duration | None = None,
    ) -> str:
        """Run ``command`` until it exits non-zero; returns its last output (see
        ``wait_until_succeeds``)."""
        with nested(self._m.logger, f"waiting for failure: {abbreviate(command)}"):
            return await self._wait_for_status(command, False, timeout, attempt_timeout)

    @on_io_loop
    async def sleep(self, secs: Duration | None = None, duration: Duration | None = None) -> None:
        """Sleep in guest time (``sleep N`` in the guest), as nixpkgs does."""
        value = seconds(duration if duration is not None else secs)
        if value is None:
            raise TypeError("sleep() needs a duration")
        await self.succeed(f"sleep {value}")

    # -- systemd -------------------------------------------------------------------------------

    @on_io_loop
    async def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        """``systemctl <q>`` in the guest, or ``systemctl --user <q>`` as ``user``; returns
        ``(status, stdout)``."""
        return await self.execute(systemd.systemctl_command(q, user))

    @on_io_loop
    async def start_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        """``systemctl start <jobname>``."""
        return await self.systemctl(f"start {jobname}", user)

    @on_io_loop
    async def stop_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        """``systemctl stop <jobname>``."""
        return await self.systemctl(f"stop {jobname}", user)

    @on_io_loop
    async def get_unit_info(self, unit: str, user: str | None = None) -> dict[str, str]:
        """The unit's properties (``systemctl show``) as a dict."""
        status, lines = await self.systemctl(f'--no-pager show "{unit}"', user)
        return systemd.parse_unit_info(unit, user, status, lines)

    @on_io_loop
    async def get_unit_property(self, unit: str, property: str, user: str | None = None) -> str:
        """One property of the unit (``systemctl show --property``)."""
        status, lines = await self.systemctl(
            f'--no-pager show "{unit}" --property="{property}"', user
        )
        return systemd.parse_unit_property(unit, property, user, status, lines)

    @on_io_loop
    async def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        """Assert that the unit's ActiveState is ``require_state``."""
        with nested(
            self._m.logger, f"checking if unit '{unit}' has reached state '{require_state}'"
        ):
            info = await self.get_unit_info(unit)
            state = info["ActiveState"]
            if state != require_state:
                raise RequestedAssertionFailed(
                    f"Expected unit '{unit}' to to be in state "
                    f"'{require_state}' but it is in state '{state}'"
                )

    async def _explained(
        self, error: RequestedAssertionFailed, unit: str | None, user: str | None
    ) -> RequestedAssertionFailed:
        """``error`` with what systemd says appended (the unit's state, failed units, journal).

        nixpkgs' message stays the first line; nothing is added on a guest without systemd or
        when the guest cannot answer.
        """
        try:
            _, output = await self.execute(
                systemd.diagnostics_script(unit, user), check_return=False, timeout=10
            )
        except (MachineError, ConnectionError):
            return error
        extra = systemd.format_diagnostics(unit, output)
        return RequestedAssertionFailed(f"{error}{extra}") if extra else error

    async def _wait_for_unit_state(
        self,
        unit: str,
        user: str | None,
        timeout: Duration,
        done: Callable[[str], Coroutine[Any, Any, bool]],
        probe: Callable[[str, str | None], str] | None = None,
    ) -> None:
        """Poll the unit's ActiveState until ``done``; a guest-side wait on ``probe`` (a shell
        probe for the unit and user) first, when there are no polling conditions."""

        async def check(_last_try: bool) -> bool:
            return await done(await self.get_unit_property(unit, "ActiveState", user))

        limit = seconds(timeout)
        assert limit is not None
        start = time.monotonic()
        try:
            if probe is not None and not self._host_loops():
                await waits.until(self.execute, self._m.logger, probe(unit, user), True, limit)
            await poll_until(check, limit, None, start)
        except RequestedAssertionFailed as e:
            raise await self._explained(e, unit, user) from None

    @on_io_loop
    async def wait_for_unit(
        self, unit: str, user: str | None = None, timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until the unit is active.

        Fails at once if it reaches "failed", or if it is inactive with no job pending (as
        nixpkgs does); ``RequestedAssertionFailed`` after ``timeout``. Beyond nixpkgs, the
        failure message goes on with the unit's state, the failed units and the last 30 lines
        of the unit's journal. For a unit that may be inactive for a while before it starts
        (a oneshot, ``user@1000.service``), use ``wait_for_unit_active_state(unit, "active")``.
        """

        async def active(state: str) -> bool:
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "failed"')
            if state == "inactive":
                _, jobs = await self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs:
                    info = await self.get_unit_info(unit, user)
                    if info["ActiveState"] == state:
                        raise RequestedAssertionFailed(
                            f'unit "{unit}" is inactive and there are no pending jobs'
                        )
            return state == "active"

        with_user = f" with user {user}" if user is not None else ""
        with nested(self._m.logger, f"waiting for unit {unit}{with_user}"):
            await self._wait_for_unit_state(unit, user, timeout, active, waits.unit_settled)

    @on_io_loop
    async def wait_for_unit_active_state(
        self,
        unit: str,
        state: str,
        timeout: Duration = DEFAULT_TIMEOUT,
        user: str | None = None,
    ) -> None:
        """Wait until the unit's ActiveState is ``state`` (``active``, ``failed``, ``inactive``...).

        Unlike ``wait_for_unit`` it does not fail early on "failed" or "inactive", so it can
        wait for a unit to fail or to stop, or for a unit that starts late (nixpkgs #395622).
        ``RequestedAssertionFailed`` after ``timeout``, with the unit's state, the failed units
        and its journal.
        """

        async def reached(current: str) -> bool:
            return current == state

        with_user = f" with user {user}" if user is not None else ""
        with nested(self._m.logger, f"waiting for unit {unit}{with_user} to be {state}"):
            probe = functools.partial(waits.unit_in_state, state=state)
            await self._wait_for_unit_state(unit, user, timeout, reached, probe)

    # -- files and ports -----------------------------------------------------------------------

    @on_io_loop
    async def wait_for_file(self, filename: str, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        """Wait until ``filename`` exists in the guest (``test -e``)."""
        with nested(self._m.logger, f"waiting for file '{filename}'"):
            await self._wait_for_status(f"test -e {filename}", True, timeout)

    @on_io_loop
    async def wait_for_open_port(
        self, port: int, addr: str = "localhost", timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until something listens on TCP ``addr:port`` in the guest (``nc -z``).

        Beyond nixpkgs, a timeout's message goes on with the failed units and the journal's
        last 30 lines.
        """
        with nested(self._m.logger, f"waiting for TCP port {port} on {addr}"):
            try:
                await self._wait_for_status(f"nc -z {addr} {port}", True, timeout)
            except RequestedAssertionFailed as e:
                raise await self._explained(e, None, None) from None

    @on_io_loop
    async def wait_for_closed_port(
        self, port: int, addr: str = "localhost", timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until nothing listens on TCP ``addr:port`` in the guest."""
        with nested(self._m.logger, f"waiting for TCP port {port} on {addr} to be closed"):
            await self._wait_for_status(f"nc -z {addr} {port}", False, timeout)

    @on_io_loop
    async def wait_for_open_unix_socket(
        self, addr: str, is_datagram: bool = False, timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until the UNIX socket ``addr`` accepts connections in the guest."""
        nc_flags = "-z -uU" if is_datagram else "-z -U"
        with nested(self._m.logger, f"waiting for UNIX socket {addr}"):
            await self._wait_for_status(f"nc {nc_flags} {addr}", True, timeout)

    @on_io_loop
    async def copy_from_host_via_shell(self, source: str, target: str) -> None:
        """Copy a host file into the guest through the shell (no shared folder needed)."""
        data = await asyncio.to_thread(Path(source).read_bytes)
        encoded = base64.b64encode(data).decode("ascii")
        await self.succeed(
            f"mkdir -p $(dirname {shlex.quote(target)})",
            f"echo -n {encoded} | base64 -d > {shlex.quote(target)}",
        )

    @on_io_loop
    async def copy_from_host(self, source: str, target: str) -> None:
        """Copy a host file or directory to ``target`` in the guest, through the shared
        directory (``/tmp/shared`` in the guest)."""
        host_src = Path(source)
        if not host_src.exists():
            raise FileNotFoundError(f"copy_from_host: {source} does not exist on the host")
        shared = self._m.shared_dir
        shared.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=shared) as shared_temp:
            staging = Path(shared_temp)
            guest_staging = GUEST_SHARED / staging.name
            await self.succeed(f"mkdir -p {shlex.quote(str(guest_staging))}")
            await asyncio.to_thread(_copy, host_src, staging / host_src.name)
            await self.succeed(f"mkdir -p {shlex.quote(str(Path(target).parent))}")
            guest_src = shlex.quote(str(guest_staging / host_src.name))
            await self.succeed(f"cp -r {guest_src} {shlex.quote(target)}")

    @on_io_loop
    async def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        """Copy a guest file or directory to ``target_dir`` on the host.

        A relative ``target_dir`` is taken in the output directory (nixpkgs); an absolute one is
        used as it is.
        """
        shared = self._m.shared_dir
        shared.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = Path(source).name
        target = Path(target_dir)
        host_dst = (target if target.is_absolute() else self._m.out_dir / target) / name
        with tempfile.TemporaryDirectory(dir=shared) as shared_temp:
            staging = Path(shared_temp)
            guest_staging = shlex.quote(str(GUEST_SHARED / staging.name))
            await self.succeed(f"cp -r {shlex.quote(source)} {guest_staging}/")
            await asyncio.to_thread(_copy, staging / name, host_dst)

    @on_io_loop
    async def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        """Deprecated nixpkgs name of ``copy_from_machine``."""
        await self.copy_from_machine(source, target_dir)

    # -- serial console ------------------------------------------------------------------------

    @on_io_loop
    async def send_console(self, chars: str) -> None:
        """Type ``chars`` on the guest's serial console (QEMU's stdin, the guest's ttyS0)."""
        process = self._m.lifecycle.require_running("type on its serial console")
        process.write_stdin(chars.encode())

    @on_io_loop
    async def get_console_log(self) -> str:
        """Everything the serial console printed since the last start."""
        return await asyncio.to_thread(self._m.console.text)

    @on_io_loop
    async def wait_for_console_text(self, regex: str, timeout: Duration | None = None) -> str:
        """Wait until ``regex`` matches the serial console output; returns the match.

        Text printed before the call counts, but only after what the previous successful wait
        matched. Lines are joined with ``\\n``. Without ``timeout`` it waits for ever (nixpkgs);
        with it, ``RequestedAssertionFailed`` after that long. Unlike nixpkgs, two waits never
        take each other's lines.
        """
        limit = seconds(timeout)
        start = time.monotonic()
        with nested(self._m.logger, f"waiting for {regex} to appear on console"):
            try:
                return await asyncio.wait_for(self._m.console.wait_for(regex), limit)
            except TimeoutError:
                assert limit is not None
                detail = f": {regex!r} did not appear on the console of {self._m.name}"
                raise timed_out(start, limit, detail) from None

    # -- virtual terminals and X11 -------------------------------------------------------------

    @on_io_loop
    async def get_tty_text(self, tty: str) -> str:
        """The text on virtual terminal ``tty`` (``/dev/vcs<tty>``), folded to its width."""
        _, output = await self.execute(
            f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}"
        )
        return output

    @on_io_loop
    async def wait_until_tty_matches(
        self, tty: str, regexp: str, timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        """Wait until ``regexp`` matches the text on virtual terminal ``tty``."""
        limit = seconds(timeout)
        assert limit is not None
        matcher = re.compile(regexp)

        async def tty_matches(last_try: bool) -> bool:
            text = await self.get_tty_text(tty)
            if last_try:
                self._m.logger.info(
                    "Last chance to match /%s/ on TTY%s, which currently contains: %s",
                    regexp,
                    tty,
                    text,
                )
            return len(matcher.findall(text)) > 0

        with nested(self._m.logger, f"waiting for {regexp} to appear on tty {tty}"):
            await poll_until(tty_matches, limit)

    @on_io_loop
    async def dump_tty_contents(self, tty: str) -> None:
        """Send the text of virtual terminal ``tty`` to the guest's journal (``systemd-cat``)."""
        await self.execute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    @on_io_loop
    async def wait_for_x(self, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        """Wait until the guest's X11 server runs (graphical target reached, display :0)."""

        async def x_ready(_last_try: bool) -> bool:
            return await self._x_server_runs()

        limit = seconds(timeout)
        assert limit is not None
        with nested(self._m.logger, "waiting for the X11 server"):
            await poll_until(x_ready, limit)

    async def _x_server_runs(self) -> bool:
        """One try of ``wait_for_x`` on a VM, as nixpkgs: the graphical target was reached and
        display :0 has its socket."""
        status, _ = await self.execute(
            'journalctl -b SYSLOG_IDENTIFIER=systemd | grep "Reached target Current graphical"'
        )
        if status != 0:
            return False
        status, _ = await self.execute("[ -e /tmp/.X11-unix/X0 ]")
        return status == 0

    @on_io_loop
    async def get_window_names(self) -> list[str]:
        """Names of the X11 windows (``xwininfo -root -tree``)."""
        output = await self.succeed(
            r"xwininfo -root -tree | sed 's/.*0x[0-9a-f]* \"\([^\"]*\)\".*/\1/; t; d'"
        )
        return output.splitlines()

    @on_io_loop
    async def wait_for_window(self, regexp: str, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        """Wait until an X11 window's name matches ``regexp``."""
        pattern = re.compile(regexp)

        async def window_is_visible(last_try: bool) -> bool:
            names = await self.get_window_names()
            if last_try:
                self._m.logger.info(
                    "Last chance to match %s on the window list, which currently contains: %s",
                    regexp,
                    ", ".join(names),
                )
            return any(pattern.search(name) for name in names)

        limit = seconds(timeout)
        assert limit is not None
        with nested(self._m.logger, "waiting for a window to appear"):
            await poll_until(window_is_visible, limit)

    # -- screen and keyboard -------------------------------------------------------------------

    @on_io_loop
    async def screenshot(self, filename: str | None = None) -> Screenshot:
        """Take a screenshot; with ``filename``, also save it as PNG (nixpkgs' naming rules).

        A name without ``.`` gets ``.png``; a name without ``/`` goes to the output directory.
        Returns the :class:`Screenshot`, which IPython and Jupyter show inline.
        """
        return await self._m.screen.screenshot(filename)

    @on_io_loop
    async def send_key(
        self,
        key: str,
        delay: Duration | None = dt.timedelta(milliseconds=10),
        log: bool | None = True,
    ) -> None:
        """Press ``key`` (a character, or a QEMU key spec like ``ctrl-alt-delete``), then wait
        ``delay``. An unknown key raises ``ValueError`` naming it (nixpkgs ignores it)."""
        await self._m.screen.send_key(key, delay, log)

    @on_io_loop
    async def send_chars(
        self, chars: str, delay: Duration | None = dt.timedelta(milliseconds=10)
    ) -> None:
        """Type ``chars`` one key at a time (``\\n`` is Enter, ``\\t`` is Tab).

        Every character is checked before the first is typed: a character with no key raises
        ``ValueError`` and nothing is sent.
        """
        await self._m.screen.send_chars(chars, delay)

    @on_io_loop
    async def get_screen_text(self) -> str:
        """The text tesseract reads on a fresh screenshot, unprocessed."""
        return await self._m.screen.text()

    @on_io_loop
    async def get_screen_text_variants(self) -> list[str]:
        """Texts read on a fresh screenshot: raw, and two preprocessed variants."""
        return await self._m.screen.text_variants()

    @on_io_loop
    async def wait_for_text(self, regex: str, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        """Wait until OCR of the screen matches ``regex`` (``re.search``).

        Each attempt takes a screenshot, then others after 1, 2 and 4 s, and reads each one not
        read before (raw and two preprocessed variants, as the passes finish); it stops at the
        first match. At the deadline the running passes are killed, and one last raw pass reads
        a fresh screenshot.
        """
        await self._m.screen.wait_for_text(regex, timeout)

    # -- QEMU ----------------------------------------------------------------------------------

    @on_io_loop
    async def send_monitor_command(self, command: str) -> str:
        """Run a QEMU human monitor (HMP) command; returns its raw reply, as nixpkgs does."""
        await self._polling_conditions()
        return await self._m.lifecycle.monitor_command(command)

    async def _hmp_checked(self, command: str, what: str) -> None:
        """An HMP command that prints nothing on success; its message raises otherwise."""
        output = hmp_output(await self.send_monitor_command(command))
        if output:
            raise MachineError(f"{self._m.name}: {what} failed: {output} (HMP `{command}`)")

    @on_io_loop
    async def wait_for_qmp_event(
        self,
        event_filter: Callable[[dict[str, Any]], bool],
        timeout: Duration = dt.timedelta(minutes=10),
    ) -> dict[str, Any]:
        """The first QMP event ``event_filter`` accepts; the others are discarded (nixpkgs).

        Events that arrived since QEMU started and were not consumed yet count. Raises
        ``TimeoutError`` after ``timeout``, and the crash report when QEMU exits first.
        """
        lifecycle = self._m.lifecycle
        client = lifecycle.qmp
        if client is None or not lifecycle.state.running:
            raise RuntimeError("QMP API is not ready yet, is the VM ready?")
        limit = seconds(timeout)
        assert limit is not None
        deadline = time.monotonic() + limit
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = await client.await_event(remaining)
            except ConnectionError:
                await lifecycle.explain_death()
                raise
            except TimeoutError:
                break
            if event_filter(event):
                return event
        raise TimeoutError(f"no matching QMP event from {self._m.name} within {limit:g} s")

    @on_io_loop
    async def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Forward TCP ``127.0.0.1:host_port`` on the host to ``guest_port`` on the guest's
        user-networking interface (nixpkgs listens on every host interface)."""
        host_port = tcp_port(host_port, "forward_port(): host_port")
        guest_port = tcp_port(guest_port, "forward_port(): guest_port")
        await self._hmp_checked(
            f"hostfwd_add tcp:127.0.0.1:{host_port}-:{guest_port}",
            f"forwarding host port {host_port} to guest port {guest_port} "
            "(is the host port already in use?)",
        )

    @on_io_loop
    async def block(self) -> None:
        """Take the first VLAN interface's link down, as if its cable were unplugged."""
        await self._hmp_checked(
            f"set_link {VLAN_NIC} off", "block() (it needs a VLAN network interface)"
        )

    @on_io_loop
    async def unblock(self) -> None:
        """Bring the first VLAN interface's link back up."""
        await self._hmp_checked(
            f"set_link {VLAN_NIC} on", "unblock() (it needs a VLAN network interface)"
        )

    # -- snapshots (nixos-repl's; not in nixpkgs) ------------------------------------------------

    @on_io_loop
    async def snapshot(self, label: str = "booted") -> SnapshotInfo:
        """Save the whole machine (RAM, devices, writable disks) as ``label``; it keeps running.

        A snapshot of that label is replaced. The guest's 9p shares (``/tmp/shared``,
        ``/tmp/xchg``) are unmounted for the save and mounted again. Returns what was saved.
        """
        await self._polling_conditions()
        return await self._m.lifecycle.save(label)

    @on_io_loop
    async def restore(self, label: str = "booted") -> None:
        """Bring the machine back to exactly the state saved as ``label``, in place.

        What happened since is gone (files, processes, the console's view of it); the next
        command returns its own output, the guest's clock is set from the host's, and the shares
        are mounted again. A command running on the machine is waited for first.
        """
        await self._polling_conditions()
        await self._m.lifecycle.restore(label)

    @on_io_loop
    async def snapshots(self) -> list[SnapshotInfo]:
        """The machine's snapshots, oldest first: label, size of the saved state, age."""
        return await self._m.lifecycle.list_snapshots()

    @on_io_loop
    async def delete_snapshot(self, label: str) -> None:
        """Delete the snapshot ``label`` (its disk space is reused by later ones)."""
        await self._m.lifecycle.delete_snapshot(label)

    @on_io_loop
    async def shell_interact(self, address: str | None = None) -> None:
        """Not available: nixpkgs deprecated it for the SSH backdoor."""
        warnings.warn("Use the SSH backdoor instead", DeprecationWarning, stacklevel=2)
        raise MachineError(
            f"{self._m.name}: shell_interact() is not supported; in the nixos-repl terminal use "
            f"`%shell {self._m.name}`, or run commands with {self._m.name}.succeed(...)"
        )


# Every public method reports its calls to the machine's observers (``actions.py``); the
# blocking twins are made from these, so they report too. ``release`` is teardown, not an action.
for _name, _method in list(vars(AsyncMachine).items()):
    if not _name.startswith("_") and _name != "release" and callable(_method):
        setattr(AsyncMachine, _name, observed(_method))


def _active(callback: Callable[[], None]) -> bool:
    """A callback with a length (a collection of conditions) is active while it is not empty."""
    return len(callback) > 0 if isinstance(callback, Sized) else True


def _copy(source: Path, target: Path) -> None:
    """Copy a file or a directory tree, creating ``target``'s parent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copy(source, target)
