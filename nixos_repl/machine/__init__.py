"""One virtual machine with the nixpkgs Machine API, composed from the parts in this package.

``Machine`` is the facade a test script sees: nixpkgs' attributes, and nixpkgs' methods as
blocking calls. Each method is defined once, as a coroutine in ``AsyncMachine`` (``api.py``),
and its blocking twin here is generated from it (``sync``), with the same signature and
documentation. The coroutines are ``machine.aio``::

    vm1.succeed("true")              # blocking, like nixpkgs
    await vm1.aio.succeed("true")    # in a notebook cell or any event loop

The parts: ``Lifecycle`` (QEMU, the state, QMP and the monitor), ``ShellChannel`` (the backdoor
shell), ``Screen`` (screenshots, keys, OCR), ``Console`` (the serial console). This package
knows nothing of IPython, Jupyter or the CLI.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import MachineError
from .actions import Action, ActionObserver
from .api import AsyncMachine, sync
from .base import BaseMachine
from .console import stdin_reader
from .lifecycle import Lifecycle, MachineState, ShellFraming
from .monitor import Monitor
from .nspawn import NspawnMachine
from .process import QemuProcess
from .qmp import QMPSession
from .screen import Screen
from .shell import ShellChannel
from .timing import DEFAULT_TIMEOUT, Duration, seconds

__all__ = [
    "DEFAULT_TIMEOUT",
    "Action",
    "ActionObserver",
    "AsyncMachine",
    "BaseMachine",
    "Duration",
    "Machine",
    "MachineState",
    "NspawnMachine",
    "QemuMachine",
    "machine_name_from_start_command",
    "seconds",
]


def machine_name_from_start_command(start_command: str) -> str:
    match = re.search("run-(.+)-vm$", start_command)
    return match.group(1) if match else "machine"


def state_dir_in_use(state_dir: Path, grace: float = 2.0) -> bool:
    """Whether a running QEMU listens on the QMP socket of ``state_dir`` (a live run owns it).

    A QEMU that is exiting (killed a moment ago) can hold its sockets for a little while after
    its main thread is gone: it has ``grace`` seconds to let go.
    """
    deadline = time.monotonic() + grace
    while _listening(state_dir / "qmp"):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)
    return False


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except BlockingIOError:
        return True  # a listener whose queue is full: alive
    except OSError:
        return False  # no socket, nobody listening, or a path no QEMU could have bound
    finally:
        probe.close()
    return True


class Machine(BaseMachine):
    """A QEMU machine started from a ``run-<name>-vm`` script (nixpkgs' ``QemuMachine``).

    Any command starts the machine if needed and waits for its backdoor shell. ``state`` is one
    of ``MachineState`` (defined, starting, up, stopping, off, crashed). ``aio`` has every method
    as a coroutine.
    """

    lifecycle: Lifecycle

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
        shell_framing: ShellFraming = "auto",
        observers: list[ActionObserver] | None = None,
    ) -> None:
        start_command = str(start_command)
        name = name or machine_name_from_start_command(start_command)
        self._init_base(start_command, name, tmp_dir, out_dir, keep_machine_state, callbacks)
        # Told of every public call when it ends (``actions.py``; the session recording).
        self.observers = observers if observers is not None else []
        self.lifecycle = Lifecycle(
            self.name,
            self.start_command,
            self.state_dir,
            self.shared_dir,
            self.console,
            env=env or {},
            shell_framing=shell_framing,
            on_change=(lambda: on_state_change(self)) if on_state_change is not None else None,
        )
        self.aio = AsyncMachine(self)
        # Screenshots and keys run the polling conditions first, as commands do.
        self.screen = Screen(self.lifecycle, self.out_dir, self.aio._polling_conditions)
        self.shared_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if state_dir_in_use(self.state_dir):
            raise MachineError(
                f"{self.name}: the machine state directory {self.state_dir} belongs to a QEMU "
                "that is still running (another nixos-repl or test driver with a machine of the "
                "same name); stop it, or give this run its own directory with "
                "XDG_RUNTIME_DIR=<a private dir>"
            )
        if not keep_machine_state and self.state_dir.exists():
            self.cleanup_statedir()

    def __repr__(self) -> str:
        return f"<QemuMachine '{self.name}'>"

    # -- state (read from the lifecycle; nixpkgs' attributes) ----------------------------------

    @property
    def booted(self) -> bool:
        """Whether QEMU runs (nixpkgs' ``booted``)."""
        return self.lifecycle.state.running

    @booted.setter
    def booted(self, value: bool) -> None:
        if value != self.booted:
            raise MachineError(
                f"{self.name}: `booted` follows QEMU; use {self.name}.start(), "
                f"{self.name}.shutdown() or {self.name}.crash() instead of setting it"
            )

    @property
    def connected(self) -> bool:
        """Whether the backdoor shell is connected. Setting it to False makes the next command
        wait for a new backdoor shell (after the guest rebooted on its own, e.g. by kexec)."""
        return self.lifecycle.state in (
            MachineState.UP,
            MachineState.SAVING,
            MachineState.RESTORING,
        )

    @connected.setter
    def connected(self, value: bool) -> None:
        if not value:
            self.lifecycle.expect_new_boot()
        elif not self.connected:
            raise MachineError(
                f"{self.name}: `connected` cannot be set to True; {self.name}.connect() connects"
            )

    @property
    def process(self) -> QemuProcess | None:
        return self.lifecycle.process

    @property
    def shell(self) -> ShellChannel | None:
        return self.lifecycle.shell

    @property
    def qmp_client(self) -> QMPSession | None:
        return self.lifecycle.qmp

    @property
    def monitor(self) -> Monitor | None:
        return self.lifecycle.monitor

    @property
    def allow_reboot(self) -> bool:
        return self.lifecycle.allow_reboot

    def is_up(self) -> bool:
        """Whether QEMU runs and the backdoor shell is connected."""
        return self.booted and self.connected

    def console_interact(self) -> None:
        """Forward this terminal's input to the guest's serial console until EOF or Ctrl-C.

        What the guest writes there goes to the console log (and the terminal, unless serial
        output is turned off). There is no prompt.
        """
        self.logger.info("Terminal is ready (there is no prompt):")
        read = stdin_reader()
        try:
            while True:
                text, eof = read()
                if text:
                    self.send_console(text)
                if eof:
                    self.logger.info("Closing connection to the console")
                    return
        except KeyboardInterrupt:
            return

    # -- the nixpkgs API, blocking (each the twin of ``aio.<name>``) ---------------------------

    crash = sync(AsyncMachine.crash)
    reboot = sync(AsyncMachine.reboot)
    switch_root = sync(AsyncMachine.switch_root)

    send_console = sync(AsyncMachine.send_console)

    get_tty_text = sync(AsyncMachine.get_tty_text)
    wait_until_tty_matches = sync(AsyncMachine.wait_until_tty_matches)
    dump_tty_contents = sync(AsyncMachine.dump_tty_contents)

    screenshot = sync(AsyncMachine.screenshot)
    send_key = sync(AsyncMachine.send_key)
    send_chars = sync(AsyncMachine.send_chars)
    get_screen_text = sync(AsyncMachine.get_screen_text)
    get_screen_text_variants = sync(AsyncMachine.get_screen_text_variants)
    wait_for_text = sync(AsyncMachine.wait_for_text)

    send_monitor_command = sync(AsyncMachine.send_monitor_command)
    wait_for_qmp_event = sync(AsyncMachine.wait_for_qmp_event)
    forward_port = sync(AsyncMachine.forward_port)
    block = sync(AsyncMachine.block)
    unblock = sync(AsyncMachine.unblock)
    shell_interact = sync(AsyncMachine.shell_interact)

    snapshot = sync(AsyncMachine.snapshot)
    restore = sync(AsyncMachine.restore)
    snapshots = sync(AsyncMachine.snapshots)
    delete_snapshot = sync(AsyncMachine.delete_snapshot)


# nixpkgs' name for the same class.
QemuMachine = Machine
