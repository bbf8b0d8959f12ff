"""One virtual machine with the nixpkgs Machine API, composed from the backends in this package.

Every public method is synchronous like nixpkgs' and has an async twin prefixed with ``a``
(``succeed`` / ``asucceed``) that runs on the shared I/O loop, so a notebook cell can drive
several machines at once. This package knows nothing of IPython, Jupyter or the CLI.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..errors import MachineError, RequestedAssertionFailed
from ..loop import on_io_loop, run_sync
from .console import Console
from .monitor import Monitor
from .process import QemuProcess, driver_qemu_options, graphical_display_available
from .qmp import QMPSession
from .screen import ScreenMixin
from .shell import OUT_CHARDEV, ShellChannel
from .timing import Duration, backoff, poll_until, seconds, timed_out

__all__ = ["Duration", "Machine", "seconds"]

T = TypeVar("T")

DEFAULT_TIMEOUT = dt.timedelta(minutes=15)
# How long connect() waits for the backdoor banner (nixpkgs: 10 x 30 s).
CONNECT_TIMEOUT = dt.timedelta(minutes=5)
# Sockets QEMU connects to right after it starts.
SOCKET_TIMEOUT = 60.0


def machine_name_from_start_command(start_command: str) -> str:
    match = re.search("run-(.+)-vm$", start_command)
    return match.group(1) if match else "machine"


class Machine(ScreenMixin):
    """A QEMU machine started from a ``run-<name>-vm`` script (nixpkgs' ``QemuMachine``)."""

    def __init__(
        self,
        start_command: str,
        *,
        tmp_dir: Path,
        out_dir: Path,
        name: str | None = None,
        keep_machine_state: bool = False,
        callbacks: list[Callable[[], None]] | None = None,
        env: Mapping[str, str] | None = None,
        on_state_change: Callable[[Machine], None] | None = None,
    ) -> None:
        self.start_command = str(start_command)
        self.name = name or machine_name_from_start_command(self.start_command)
        self.tmp_dir = Path(tmp_dir)
        self.out_dir = Path(out_dir)
        self.state_dir = self.tmp_dir / f"vm-state-{self.name}"
        self.shared_dir = self.tmp_dir / "shared-xchg"
        self.keep_machine_state = keep_machine_state
        self.callbacks = callbacks if callbacks is not None else []
        self.extra_env = dict(env or {})
        self.log = logging.getLogger(f"nixos_repl.machine.{self.name}")
        self.console = Console(self.name)
        self.connect_timeout = CONNECT_TIMEOUT
        # "auto": the fast framing when the guest has the ports; "nixpkgs": always nixpkgs' own.
        self.shell_framing = os.environ.get("NIXOS_REPL_SHELL_FRAMING", "auto")
        self.booted = False
        self.connected = False
        self.pid: int | None = None
        self.state = "defined"
        self.allow_reboot = False
        self.process: QemuProcess | None = None
        self.qmp_client: QMPSession | None = None
        self.monitor: Monitor | None = None
        self.shell: ShellChannel | None = None
        self._on_state_change = on_state_change
        self._expect_exit = False
        self._reboot_requested = False
        self._crash: str | None = None
        self._shutdown_reason: str | None = None
        self._start_lock: asyncio.Lock | None = None
        self.shared_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not keep_machine_state and self.state_dir.exists():
            self.cleanup_statedir()

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    # -- helpers -------------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], checks: bool = True) -> T:
        """Run one of the async twins for a sync public method, in the caller's thread.

        Polling conditions (``callbacks``) run first, here and not on the I/O loop, so they may
        use the sync API themselves; lifecycle methods pass ``checks=False``.
        """
        if checks:
            try:
                self.run_callbacks()
            except BaseException:
                coro.close()
                raise
        return run_sync(coro)

    @contextlib.contextmanager
    def nested(self, msg: str) -> Iterator[None]:
        """Log ``msg``, run the body, then log how long it took (nixpkgs' ``nested``)."""
        self.log.info("%s", msg)
        start = time.monotonic()
        try:
            yield
        finally:
            self.log.info("(finished: %s, in %.2f seconds)", msg, time.monotonic() - start)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.log.debug("state %s -> %s", self.state, state)
            self.state = state
            if self._on_state_change is not None:
                self._on_state_change(self)

    def run_callbacks(self) -> None:
        for callback in self.callbacks:
            callback()

    def cleanup_statedir(self) -> None:
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            self.log.info("deleting machine state directory %s", self.state_dir)
            self.log.info("if you want to keep the machine state, pass --keep-machine-state")

    def _check_crashed(self) -> None:
        if self._crash is not None:
            raise MachineError(self._crash)

    def is_up(self) -> bool:
        return self.booted and self.connected

    # -- lifecycle -----------------------------------------------------------------------------

    @on_io_loop
    async def astart(self, allow_reboot: bool = False) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.booted:
                return
            await self._start(allow_reboot)

    async def _start(self, allow_reboot: bool) -> None:
        self._crash = None
        self._shutdown_reason = None
        self._expect_exit = False
        self.allow_reboot = allow_reboot
        self._set_state("starting")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.console.reset(self.state_dir / "console.log")
        process = QemuProcess(self.name, self.start_command, self.state_dir)
        env = {
            **os.environ,
            **self.extra_env,
            "TMPDIR": str(self.state_dir),
            "SHARED_DIR": str(self.shared_dir),
            "USE_TMPDIR": "1",
        }
        extra = driver_qemu_options(self.state_dir, allow_reboot, graphical_display_available())
        try:
            await process.spawn(extra, env, self.console.feed)
            self.process = process
            self.pid = process.pid
            monitor = await process.accept("monitor", SOCKET_TIMEOUT)
            shell = await process.accept("shell", SOCKET_TIMEOUT)
            out = await process.accept("nixos-repl-out", SOCKET_TIMEOUT)
            ctl = await process.accept("nixos-repl-ctl", SOCKET_TIMEOUT)
            self.shell = ShellChannel(self.name, shell, out, ctl, self._out_port_open)
            self.qmp_client = QMPSession(self.name, self._on_qmp_event)
            await self.qmp_client.connect(self.state_dir / "qmp")
            self.monitor = Monitor(self.name, monitor)
            await self.monitor.greeting()
        except BaseException as e:
            await process.terminate()
            await self._teardown()
            self._set_state("off")
            if isinstance(e, MachineError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise MachineError(
                f"{self.name}: could not start QEMU: {e}\n{process.describe_exit()}"
            ) from e
        self.booted = True
        asyncio.get_running_loop().create_task(self._watch_exit(process))

    def _on_qmp_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "SHUTDOWN":
            self._shutdown_reason = str((event.get("data") or {}).get("reason", ""))
        elif event.get("event") == "RESET" and self.allow_reboot:
            if self._reboot_requested:  # reboot() has prepared for it already
                self._reboot_requested = False
            else:
                self.expect_new_boot()

    def expect_new_boot(self) -> None:
        """The guest reboots in the same QEMU: the next command waits for the new backdoor."""
        self.connected = False
        if self.shell is not None:
            self.shell.new_boot()
        self._set_state("starting")

    async def _out_port_open(self) -> bool:
        """Whether the guest holds the command output port open (QMP ``query-chardev``)."""
        if self.qmp_client is None:
            raise MachineError(f"{self.name}: QMP is not connected")
        reply = await self.qmp_client.aexecute("query-chardev")
        return any(
            c.get("label") == OUT_CHARDEV and c.get("frontend-open") for c in reply["return"]
        )

    async def _watch_exit(self, process: QemuProcess) -> None:
        await process.exited.wait()
        if self.process is not process:
            return
        code = process.returncode
        clean = self._expect_exit or self._shutdown_reason in ("guest-shutdown", "host-qmp-quit")
        if not clean:
            tail = "\n".join(f"    {line}" for line in self.console.tail(20)) or "    (nothing)"
            self._crash = (
                f"machine '{self.name}' crashed: QEMU (pid {process.pid}) exited with status "
                f"{code}{f' ({self._shutdown_reason})' if self._shutdown_reason else ''}.\n"
                f"Last console lines:\n{tail}\n{process.describe_exit()}\n"
                f"Call {self.name}.start() to boot it again."
            )
            self.log.error("%s", self._crash)
        await self._teardown()
        self._set_state("crashed" if not clean else "off")

    async def _teardown(self) -> None:
        """Close every connection of the current QEMU run (the process is gone or going)."""
        if self.qmp_client is not None:
            self.qmp_client.mark_closed()
            await self.qmp_client.close()
        if self.shell is not None:
            self.shell.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.process is not None:
            self.process.close_listeners()
        self.console.close()
        self.booted = False
        self.connected = False
        self.pid = None

    @on_io_loop
    async def aconnect(self) -> None:
        if self.connected:
            return
        self._check_crashed()
        with self.nested("waiting for the VM to finish booting"):
            await self.astart(self.allow_reboot)
            assert self.shell is not None and self.process is not None
            start = time.monotonic()
            limit = seconds(self.connect_timeout)
            try:
                banner = await self._guard(asyncio.wait_for(self.shell.wait_for_banner(), limit))
            except TimeoutError:
                tail = "\n".join(self.console.tail(20))
                raise MachineError(
                    f"{self.name}: the backdoor shell did not start within {limit} s. "
                    f"Last console lines:\n{tail}\n"
                    f"To debug, look at the console (get_console_log()) or the screen."
                ) from None
            self.log.info("Guest shell says: %r", banner)
            if self.shell_framing != "nixpkgs":
                await self._guard(self.shell.setup())
            self.connected = True
            self._set_state("up")
            self.log.info("connected to guest root shell")
            self.log.info("(connecting took %.2f seconds)", time.monotonic() - start)

    async def _guard(self, coro: Awaitable[T]) -> T:
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
                await self._explain_death()  # a lost connection is usually QEMU dying
                raise
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await asyncio.sleep(0)  # let the exit watcher write its report
        self._check_crashed()
        raise MachineError(
            f"{self.name}: QEMU exited (status {process.returncode}) while waiting.\n"
            f"{process.describe_exit()}"
        )

    async def _explain_death(self) -> None:
        """After a lost connection: if QEMU is dying, raise its crash report instead."""
        process = self.process
        if process is None:
            self._check_crashed()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.exited.wait(), 1.0)
        await asyncio.sleep(0)  # let the exit watcher write its report
        self._check_crashed()

    @on_io_loop
    async def ashutdown(self) -> None:
        if not self.booted:
            return
        assert self.shell is not None
        self._expect_exit = True
        self._set_state("stopping")
        with contextlib.suppress(MachineError):
            await self.shell.send_raw(b"poweroff\n")
        await self.await_for_shutdown()

    @on_io_loop
    async def await_for_shutdown(self, timeout: Duration | None = None) -> None:
        if not self.booted or self.process is None:
            return
        with self.nested("waiting for the VM to power off"):
            await asyncio.wait_for(self.process.exited.wait(), seconds(timeout))
            await self._teardown()
            self._set_state("crashed" if self._crash else "off")

    @on_io_loop
    async def acrash(self) -> None:
        if not self.booted or self.monitor is None:
            return
        self.log.info("forced crash")
        self._expect_exit = True
        self._set_state("stopping")
        with contextlib.suppress(MachineError):
            await self.monitor.command("quit")
        await self.await_for_shutdown()

    @on_io_loop
    async def arelease(self) -> None:
        """Kill QEMU and close everything (the registry's teardown; nixpkgs' ``release``)."""
        if self.process is None or self.process.exited.is_set():
            await self._teardown()
            return
        self.log.info("kill machine (pid %s)", self.process.pid)
        self._expect_exit = True
        self._set_state("stopping")
        await self.process.terminate()
        await self._teardown()
        self._set_state("off")

    def start(self, allow_reboot: bool = False) -> None:
        self._run(self.astart(allow_reboot), checks=False)

    def connect(self) -> None:
        self._run(self.aconnect(), checks=False)

    def shutdown(self) -> None:
        self._run(self.ashutdown(), checks=False)

    def wait_for_shutdown(self, timeout: Duration | None = None) -> None:
        self._run(self.await_for_shutdown(timeout), checks=False)

    def crash(self) -> None:
        self._run(self.acrash(), checks=False)

    def release(self) -> None:
        self._run(self.arelease(), checks=False)

    # -- commands ------------------------------------------------------------------------------

    @on_io_loop
    async def aexecute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Duration | None = DEFAULT_TIMEOUT,
    ) -> tuple[int, str]:
        """Run ``command`` in the guest; returns (status, stdout), as nixpkgs' ``execute``."""
        await self.aconnect()
        assert self.shell is not None
        try:
            status, out = await self.shell.execute(command, seconds(timeout), wait=check_output)
        except (MachineError, ConnectionError) as e:
            await self._explain_death()
            if isinstance(e, MachineError):
                raise
            raise MachineError(f"{self.name}: lost the connection to QEMU: {e}") from e
        if not check_output:
            return -2, ""
        if not check_return:
            return -1, out.decode(errors="replace")
        return status, out.decode(errors="replace")

    @on_io_loop
    async def asucceed(self, *commands: str, timeout: Duration | None = None) -> str:
        output = ""
        for command in commands:
            with self.nested(f"must succeed: {command}"):
                status, out = await self.aexecute(command, timeout=timeout)
                if status != 0:
                    self.log.info("output: %s", out)
                    raise RequestedAssertionFailed(
                        f"command `{command}` failed (exit code {status})"
                    )
                output += out
        return output

    @on_io_loop
    async def afail(self, *commands: str, timeout: Duration | None = None) -> str:
        output = ""
        for command in commands:
            with self.nested(f"must fail: {command}"):
                status, out = await self.aexecute(command, timeout=timeout)
                if status == 0:
                    raise RequestedAssertionFailed(f"command `{command}` unexpectedly succeeded")
                output += out
        return output

    async def _await_status(self, command: str, want_success: bool, timeout: Duration) -> str:
        limit = seconds(timeout)
        assert limit is not None
        output = ""

        async def check(_last_try: bool) -> bool:
            nonlocal output
            status, output = await self.aexecute(command, timeout=limit)
            return (status == 0) == want_success

        what = "success" if want_success else "failure"
        with self.nested(f"waiting for {what}: {command}"):
            await poll_until(check, limit)
        return output

    @on_io_loop
    async def await_until_succeeds(self, command: str, timeout: Duration = DEFAULT_TIMEOUT) -> str:
        return await self._await_status(command, True, timeout)

    @on_io_loop
    async def await_until_fails(self, command: str, timeout: Duration = DEFAULT_TIMEOUT) -> str:
        return await self._await_status(command, False, timeout)

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Duration | None = DEFAULT_TIMEOUT,
    ) -> tuple[int, str]:
        return self._run(self.aexecute(command, check_return, check_output, timeout))

    def succeed(self, *commands: str, timeout: Duration | None = None) -> str:
        return self._run(self.asucceed(*commands, timeout=timeout))

    def fail(self, *commands: str, timeout: Duration | None = None) -> str:
        return self._run(self.afail(*commands, timeout=timeout))

    def wait_until_succeeds(self, command: str, timeout: Duration = DEFAULT_TIMEOUT) -> str:
        return self._run(self.await_until_succeeds(command, timeout))

    def wait_until_fails(self, command: str, timeout: Duration = DEFAULT_TIMEOUT) -> str:
        return self._run(self.await_until_fails(command, timeout))

    def sleep(self, secs: Duration | None = None, duration: Duration | None = None) -> None:
        """Sleep in guest time (``sleep N`` in the guest), as nixpkgs does."""
        value = seconds(duration if duration is not None else secs)
        if value is None:
            raise TypeError("sleep() needs a duration")
        self.succeed(f"sleep {value}")

    # -- systemd -------------------------------------------------------------------------------

    def systemctl(self, q: str, user: str | None = None) -> tuple[int, str]:
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c "
                "$'XDG_RUNTIME_DIR=/run/user/`id -u` "
                f"systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def start_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname: str, user: str | None = None) -> tuple[int, str]:
        return self.systemctl(f"stop {jobname}", user)

    def get_unit_info(self, unit: str, user: str | None = None) -> dict[str, str]:
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            under = f' under user "{user}"' if user is not None else ""
            raise RequestedAssertionFailed(
                f'retrieving systemctl info for unit "{unit}"{under} failed with exit code {status}'
            )
        line_pattern = re.compile(r"^([^=]+)=(.*)$")
        info = {}
        for line in lines.split("\n"):
            match = line_pattern.match(line)
            if match:
                info[match.group(1)] = match.group(2)
        return info

    def get_unit_property(self, unit: str, property: str, user: str | None = None) -> str:
        status, lines = self.systemctl(f'--no-pager show "{unit}" --property="{property}"', user)
        if status != 0:
            under = f' under user "{user}"' if user is not None else ""
            raise RequestedAssertionFailed(
                f'retrieving systemctl property "{property}" for unit "{unit}"{under} '
                f"failed with exit code {status}"
            )
        match = re.match(r"^([^=]+)=(.*)$", lines.strip())
        if match is None or match.group(1) != property:
            raise RequestedAssertionFailed(
                f"unexpected systemctl output for {unit}.{property}: {lines!r}"
            )
        return match.group(2)

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        with self.nested(f"checking if unit '{unit}' has reached state '{require_state}'"):
            info = self.get_unit_info(unit)
            state = info["ActiveState"]
            if state != require_state:
                raise RequestedAssertionFailed(
                    f"Expected unit '{unit}' to to be in state "
                    f"'{require_state}' but it is in state '{state}'"
                )

    def wait_for_unit(
        self, unit: str, user: str | None = None, timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        def check(_last_try: bool) -> bool:
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "failed"')
            if state == "inactive":
                _, jobs = self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs:
                    info = self.get_unit_info(unit, user)
                    if info["ActiveState"] == state:
                        raise RequestedAssertionFailed(
                            f'unit "{unit}" is inactive and there are no pending jobs'
                        )
            return state == "active"

        with_user = f" with user {user}" if user is not None else ""
        with self.nested(f"waiting for unit {unit}{with_user}"):
            self._poll_sync(check, timeout)

    def _poll_sync(self, check: Callable[[bool], bool], timeout: Duration) -> None:
        """poll_until() for checks written with the sync API (they run in the caller's thread)."""
        limit = seconds(timeout)
        assert limit is not None
        start = time.monotonic()
        for pause in backoff(limit):
            if check(False):
                return
            time.sleep(pause)
        if not check(True):
            raise timed_out(start, limit)

    # -- files and ports -----------------------------------------------------------------------

    def wait_for_file(self, filename: str, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        with self.nested(f"waiting for file '{filename}'"):
            self._run(self._await_status(f"test -e {filename}", True, timeout))

    def wait_for_open_port(
        self, port: int, addr: str = "localhost", timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        with self.nested(f"waiting for TCP port {port} on {addr}"):
            self._run(self._await_status(f"nc -z {addr} {port}", True, timeout))

    def wait_for_closed_port(
        self, port: int, addr: str = "localhost", timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        with self.nested(f"waiting for TCP port {port} on {addr} to be closed"):
            self._run(self._await_status(f"nc -z {addr} {port}", False, timeout))

    def wait_for_open_unix_socket(
        self, addr: str, is_datagram: bool = False, timeout: Duration = DEFAULT_TIMEOUT
    ) -> None:
        nc_flags = "-z -uU" if is_datagram else "-z -U"
        with self.nested(f"waiting for UNIX socket {addr}"):
            self._run(self._await_status(f"nc {nc_flags} {addr}", True, timeout))

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        """Copy a host file into the guest through the shell (no shared folder needed)."""
        data = base64.b64encode(Path(source).read_bytes()).decode("ascii")
        self.succeed(
            f"mkdir -p $(dirname {shlex.quote(target)})",
            f"echo -n {data} | base64 -d > {shlex.quote(target)}",
        )

    def copy_from_host(self, source: str, target: str) -> None:
        """Copy a host file or directory into the guest through the shared directory."""
        host_src = Path(source)
        if not host_src.exists():
            raise FileNotFoundError(f"copy_from_host: {source} does not exist on the host")
        self.shared_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.shared_dir) as shared_temp:
            shared_temp_path = Path(shared_temp)
            vm_shared_temp = Path("/tmp/shared") / shared_temp_path.name
            vm_intermediate = vm_shared_temp / host_src.name
            self.succeed(f"mkdir -p {shlex.quote(str(vm_shared_temp))}")
            if host_src.is_dir():
                shutil.copytree(host_src, shared_temp_path / host_src.name)
            else:
                shutil.copy(host_src, shared_temp_path)
            self.succeed(f"mkdir -p {shlex.quote(str(Path(target).parent))}")
            self.succeed(f"cp -r {shlex.quote(str(vm_intermediate))} {shlex.quote(target)}")

    def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        """Copy a guest file or directory into ``out_dir/target_dir`` on the host."""
        vm_src = Path(source)
        vm_target = Path("/tmp/shared") / target_dir
        self.succeed(f"mkdir -p {shlex.quote(str(vm_target))}")
        self.succeed(f"cp -r {shlex.quote(str(vm_src))} {shlex.quote(str(vm_target))}")
        shared = self.shared_dir / target_dir / vm_src.name
        host_dst = self.out_dir / target_dir / vm_src.name
        host_dst.parent.mkdir(parents=True, exist_ok=True)
        if shared.is_dir():
            shutil.copytree(shared, host_dst, dirs_exist_ok=True)
        else:
            shutil.copy(shared, host_dst)

    def copy_from_vm(self, source: str, target_dir: str = "") -> None:
        """Deprecated nixpkgs alias of ``copy_from_machine``."""
        self.copy_from_machine(source, target_dir)

    # -- serial console ------------------------------------------------------------------------

    def send_console(self, chars: str) -> None:
        """Type ``chars`` on the guest's serial console (QEMU's stdin)."""
        if self.process is None or not self.booted:
            raise MachineError(f"{self.name}: not started; call {self.name}.start() first")
        process = self.process
        self._run(_call(lambda: process.write_stdin(chars.encode())))

    def get_console_log(self) -> str:
        return self.console.text()

    @on_io_loop
    async def await_for_console_text(self, regex: str, timeout: Duration | None = None) -> str:
        limit = seconds(timeout)
        start = time.monotonic()
        with self.nested(f"waiting for {regex} to appear on console"):
            try:
                return await asyncio.wait_for(self.console.wait_for(regex), limit)
            except TimeoutError:
                assert limit is not None
                detail = f": {regex!r} did not appear on the console of {self.name}"
                raise timed_out(start, limit, detail) from None

    def wait_for_console_text(self, regex: str, timeout: Duration | None = None) -> str:
        return self._run(self.await_for_console_text(regex, timeout))

    # -- monitor -------------------------------------------------------------------------------

    @on_io_loop
    async def asend_monitor_command(self, command: str) -> str:
        self._check_crashed()
        await self.astart(self.allow_reboot)
        assert self.monitor is not None
        return await self._guard(self.monitor.command(command))

    def send_monitor_command(self, command: str) -> str:
        return self._run(self.asend_monitor_command(command))


async def _call(fn: Callable[[], T]) -> T:
    """Run a plain function on the I/O loop (for objects that belong to it)."""
    return fn()


# nixpkgs names for the same class.
QemuMachine = Machine
BaseMachine = Machine
