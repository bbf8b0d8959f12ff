"""What both kinds of machine have: nixpkgs' ``BaseMachine``.

A QEMU machine (``Machine``) and a systemd-nspawn container (``NspawnMachine``) differ in how
they start, stop and run a command; everything written against a command, the log and a stop is
one coroutine in ``AsyncMachine`` (``api.py``) and one blocking twin here.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from ..config import check_machine_name
from .api import AsyncMachine, sync
from .console import Console
from .lifecycle import MachineState, RunState
from .timing import Duration, nested, seconds

__all__ = ["BaseMachine"]


class BaseMachine:
    """A machine of either kind: its name, log, state directory and the shell-based API."""

    name: str
    start_command: str
    out_dir: Path
    tmp_dir: Path
    state_dir: Path
    shared_dir: Path
    keep_machine_state: bool
    logger: logging.Logger
    console: Console
    callbacks: list[Callable[[], None]]
    aio: AsyncMachine
    lifecycle: RunState

    def _init_base(
        self,
        start_command: str,
        name: str,
        tmp_dir: Path,
        out_dir: Path,
        keep_machine_state: bool,
        callbacks: list[Callable[[], None]] | None,
    ) -> None:
        """The attributes both kinds have (nixpkgs' ``BaseMachine.__init__``)."""
        self.start_command = start_command
        self.name = check_machine_name(name)
        self.tmp_dir = Path(tmp_dir)
        self.out_dir = Path(out_dir)
        self.state_dir = self.tmp_dir / f"vm-state-{self.name}"
        self.shared_dir = self.tmp_dir / "shared-xchg"
        self.keep_machine_state = keep_machine_state
        # Run before every command and monitor command (nixpkgs: the polling conditions).
        self.callbacks = callbacks if callbacks is not None else []
        self.logger = logging.getLogger(f"nixos_repl.machine.{self.name}")
        self.console = Console(self.name)

    @property
    def state(self) -> MachineState:
        """One of ``MachineState`` (defined, starting, up, stopping, off, crashed)."""
        return self.lifecycle.state

    @property
    def booted(self) -> bool:
        """Whether the machine's process runs (nixpkgs' ``booted``)."""
        return self.state.running

    @property
    def pid(self) -> int | None:
        """The pid of the machine's process (QEMU, systemd-nspawn) while it runs."""
        return self.lifecycle.pid

    @property
    def connect_timeout(self) -> Duration:
        """How long a command waits for a starting machine to answer (5 minutes): a VM's
        backdoor shell, a container's READY=1."""
        return self.lifecycle.connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, value: Duration) -> None:
        seconds(value)  # type check
        self.lifecycle.connect_timeout = value

    def uptime(self) -> float | None:
        """Seconds since the machine's process started, while it runs."""
        return self.lifecycle.uptime()

    def is_up(self) -> bool:
        """Whether the machine runs and takes commands (each kind says what that means)."""
        raise NotImplementedError

    @property
    def full_console_log(self) -> list[str]:
        """The console (a container: journal) lines since the last start (nixpkgs' attribute)."""
        return self.console.text().splitlines()

    # -- logging and housekeeping --------------------------------------------------------------

    def log(self, msg: str) -> None:
        """Log ``msg`` under this machine's name (nixpkgs' ``machine.log``)."""
        self.logger.info("%s", msg)

    def log_serial(self, msg: str) -> None:
        """Log ``msg`` as a serial console line of this machine."""
        self.console.log.info("%s # %s", self.name, msg)

    @contextlib.contextmanager
    def nested(self, msg: str) -> Iterator[None]:
        """Log ``msg``, run the body, then log how long it took (nixpkgs' ``nested``)."""
        with nested(self.logger, msg):
            yield

    def run_callbacks(self) -> None:
        """Run the polling conditions (every command does this first)."""
        for callback in self.callbacks:
            callback()

    def cleanup_statedir(self) -> None:
        """Delete the state directory (disk images, sockets, logs) left by an earlier run."""
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
            self.logger.info("deleting machine state directory %s", self.state_dir)
            self.logger.info("if you want to keep the machine state, pass --keep-machine-state")

    # -- the nixpkgs API, blocking (each the twin of ``aio.<name>``) ---------------------------

    start = sync(AsyncMachine.start)
    connect = sync(AsyncMachine.connect)
    shutdown = sync(AsyncMachine.shutdown)
    wait_for_shutdown = sync(AsyncMachine.wait_for_shutdown)
    release = sync(AsyncMachine.release)

    execute = sync(AsyncMachine.execute)
    succeed = sync(AsyncMachine.succeed)
    fail = sync(AsyncMachine.fail)
    wait_until_succeeds = sync(AsyncMachine.wait_until_succeeds)
    wait_until_fails = sync(AsyncMachine.wait_until_fails)
    sleep = sync(AsyncMachine.sleep)

    systemctl = sync(AsyncMachine.systemctl)
    start_job = sync(AsyncMachine.start_job)
    stop_job = sync(AsyncMachine.stop_job)
    get_unit_info = sync(AsyncMachine.get_unit_info)
    get_unit_property = sync(AsyncMachine.get_unit_property)
    require_unit_state = sync(AsyncMachine.require_unit_state)
    wait_for_unit = sync(AsyncMachine.wait_for_unit)
    wait_for_unit_active_state = sync(AsyncMachine.wait_for_unit_active_state)

    wait_for_file = sync(AsyncMachine.wait_for_file)
    wait_for_open_port = sync(AsyncMachine.wait_for_open_port)
    wait_for_closed_port = sync(AsyncMachine.wait_for_closed_port)
    wait_for_open_unix_socket = sync(AsyncMachine.wait_for_open_unix_socket)
    copy_from_host = sync(AsyncMachine.copy_from_host)
    copy_from_host_via_shell = sync(AsyncMachine.copy_from_host_via_shell)
    copy_from_machine = sync(AsyncMachine.copy_from_machine)
    copy_from_vm = sync(AsyncMachine.copy_from_vm)

    get_console_log = sync(AsyncMachine.get_console_log)
    wait_for_console_text = sync(AsyncMachine.wait_for_console_text)

    wait_for_x = sync(AsyncMachine.wait_for_x)
    get_window_names = sync(AsyncMachine.get_window_names)
    wait_for_window = sync(AsyncMachine.wait_for_window)
