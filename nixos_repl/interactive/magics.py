"""The magics: each a few lines over one public Machine or Driver call.

Each magic's arguments and the testScript call it stands for are declared once, in
:data:`nixos_repl.magic_table.MAGICS`; a method here names its entry with ``@magic("name")``
(``%succeed?`` shows the help; a bad line is a ``UsageError`` that ends with the magic's usage
line). Magics whose text reaches the guest take the rest of the line raw (``@no_var_expand``:
no ``$var``/``{var}`` expansion, quoting kept). Values are returned, not printed: they render
themselves (``display.py``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from IPython.core import magic as _magic
from IPython.core import magic_arguments as _magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class

from ..errors import NixosReplError, UnknownMachineError
from ..loop import run_sync
from ..machine.console import MEMORY_LINES
from ..machine.keys import key_to_qmp
from ..magic_table import MAGICS, rewind_target, unescape
from ..magic_table import usage as parser_usage
from .display import Execution, MachineTable, Output, Screenshot
from .live import clean

if TYPE_CHECKING:
    from argparse import Namespace

    from ..machine import BaseMachine, Machine
    from .session import Session

__all__ = ["NixosMagics", "magic", "parse", "screenshot_name", "usage"]

F = TypeVar("F", bound=Callable[..., Any])


class _Decorator(Protocol):
    def __call__(self, fn: F, /) -> F: ...


# For a magic that only shows things and declares its own arguments (``%watch``).
magic_arguments: Callable[..., _Decorator] = _magic_arguments.magic_arguments
argument: Callable[..., _Decorator] = _magic_arguments.argument
parse_argstring: Callable[[Any, str], Any] = _magic_arguments.parse_argstring


def usage(magic: Callable[..., Any]) -> str:
    """``usage: %watch [--stop] [NAME]``: a magic's usage on one line."""
    return parser_usage(getattr(magic, "parser"))  # noqa: B009 - set by IPython


def magic(name: str) -> _Decorator:
    """Make the method the magic ``name``, with the arguments :data:`MAGICS` declares for it
    (a line or cell magic, raw or not, as its entry says)."""
    spec = MAGICS[name]

    def decorate(fn: F) -> F:
        register: Any = _magic.cell_magic if spec.cell else _magic.line_magic
        fn = register(name)(fn)
        if spec.raw:
            fn = _magic.no_var_expand(fn)
        return cast(F, spec.declare(fn))

    return decorate


def parse(name: str, line: str, body: str | None = None) -> Namespace:
    """``%name line``'s arguments; a UsageError (the reason and the usage line) if bad."""
    return MAGICS[name].parse(line, body)


def screenshot_name(machine: str) -> str:
    """A file name for a screenshot that was not given one: ``vm1-20260102-150405-123``."""
    now = dt.datetime.now()
    return f"{machine}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


@magics_class
class NixosMagics(Magics):
    """nixos-repl's magics over one :class:`~nixos_repl.interactive.session.Session`."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    def _machine(self, name: str, magic: str) -> BaseMachine:
        """The machine ``name`` for ``%magic``: a UsageError (one line) if there is none, or if
        it lacks what the magic needs (a container has no screen, QMP or snapshots)."""
        try:
            machine = self.session.machine(name)
        except UnknownMachineError as e:
            raise UsageError(str(e)) from None
        refusal = MAGICS[magic].refusal(machine)
        if refusal is not None:
            raise UsageError(refusal)
        return machine

    def _vm(self, name: str, magic: str) -> Machine:
        """The machine for a magic that needs a VM's parts (``MagicSpec.needs``)."""
        return cast("Machine", self._machine(name, magic))

    # -- machines ------------------------------------------------------------------------------

    @magic("machines")
    def machines(self, line: str) -> MachineTable:
        """Show the machines: name, kind (vm, container), state, uptime, pid, last console line.

        ``%machines add NAME START_SCRIPT`` defines a machine (not started) and binds it in the
        namespace under NAME, as ``create_machine(START_SCRIPT, name=NAME)`` does; a
        ``run-<name>-nspawn`` script defines a systemd-nspawn container.
        """
        args = parse("machines", line)
        if args.action == "add":
            if not args.name or not args.start_script:
                raise UsageError(f"add needs NAME and START_SCRIPT\n{MAGICS['machines'].usage()}")
            script = Path(args.start_script).expanduser()
            command = str(script.absolute()) if script.exists() else args.start_script
            try:
                self.session.add_machine(command, args.name)
            except NixosReplError as e:
                raise UsageError(str(e)) from None
        return MachineTable.of(self.session.machines, self.session.driver.out_dir)

    @magic("start")
    def start(self, line: str) -> None:
        """Start machines in parallel and wait until each one's backdoor shell answers."""
        args = parse("start", line)
        names = self.session.machine_names() if args.all or not args.names else args.names
        machines = [self._machine(n, "start") for n in names]

        async def connect_all() -> None:
            await asyncio.gather(*(m.aio.connect() for m in machines))

        run_sync(connect_all())

    @magic("shutdown")
    def shutdown(self, line: str) -> None:
        """Power a machine off from its shell and wait until it has stopped (a VM's QEMU, a
        container's systemd-nspawn)."""
        self._machine(parse("shutdown", line).name, "shutdown").shutdown()

    @magic("crash")
    def crash(self, line: str) -> None:
        """Kill a machine's QEMU at once, as a power cut would."""
        self._vm(parse("crash", line).name, "crash").crash()

    # -- snapshots -----------------------------------------------------------------------------

    def _rewind_target(self, name: str, line: str) -> tuple[Machine | None, str]:
        try:
            machine, label = rewind_target(parse(name, line))
        except UsageError as e:
            raise UsageError(f"{str(e).splitlines()[0]}\n{MAGICS[name].usage()}") from None
        return (self._vm(machine, name) if machine is not None else None), label

    @magic("snapshot")
    def snapshot(self, line: str) -> Output:
        """Save a machine whole (RAM, devices, writable disks) as LABEL (default: booted).

        ``--all`` saves every running machine at once. ``%restore`` brings it back in a
        fraction of a second; the steps in between are left out of ``%export``.
        """
        machine, label = self._rewind_target("snapshot", line)
        if machine is None:
            self.session.driver.snapshot_all(label)
            return self._listing(self.session.machines)
        return Output(f"{machine.name}: {machine.snapshot(label)}")

    @magic("restore")
    def restore(self, line: str) -> None:
        """Bring a machine back to the snapshot LABEL (default: booted), in place.

        ``--all`` restores every running machine at once. A command running on the machine
        is waited for first.
        """
        machine, label = self._rewind_target("restore", line)
        if machine is None:
            self.session.driver.restore_all(label)
        else:
            machine.restore(label)

    @magic("snapshots")
    def snapshots(self, line: str) -> Output:
        """List the snapshots of a machine (or of every machine): label, size, age."""
        name = parse("snapshots", line).name
        return self._listing([self._vm(name, "snapshots")] if name else self.session.machines)

    def _listing(self, machines: list[BaseMachine]) -> Output:
        vms = [cast("Machine", m) for m in machines if hasattr(m, "snapshot")]
        rows = [f"{m.name}: {info}" for m in vms for info in m.snapshots()]
        return Output("\n".join(rows) or "no snapshots yet (take one with %snapshot NAME)")

    # -- commands ------------------------------------------------------------------------------

    def _target(self, name: str, line: str) -> tuple[BaseMachine, str]:
        """``NAME REST``: the machine and the rest of the line, raw."""
        args = parse(name, line)
        return self._machine(args.name, name), args.rest

    @magic("succeed")
    def succeed(self, line: str) -> Output:
        """Run a command in the guest's root shell; it must exit 0. Shows its output.

        The command is the rest of the line, as typed (no ``$var`` expansion by IPython).
        """
        machine, command = self._target("succeed", line)
        return Output(machine.succeed(command))

    @magic("fail")
    def fail(self, line: str) -> Output:
        """Run a command in the guest's root shell; it must exit non-zero. Shows its output."""
        machine, command = self._target("fail", line)
        return Output(machine.fail(command))

    @magic("execute")
    def execute(self, line: str) -> Execution:
        """Run a command in the guest's root shell; shows its output and exit status."""
        machine, command = self._target("execute", line)
        return Execution(*machine.execute(command))

    @magic("sh")
    def sh(self, line: str, cell: str) -> Output:
        """Run the cell's body as one script in the guest's root shell; it must exit 0."""
        machine = self._machine(parse("sh", line, cell).name, "sh")
        return Output(machine.succeed(cell))

    # -- waits ---------------------------------------------------------------------------------

    @magic("wait_for_unit")
    def wait_for_unit(self, line: str) -> None:
        """Wait until a systemd unit is active (fails at once if it fails)."""
        args = parse("wait_for_unit", line)
        self._machine(args.name, "wait_for_unit").wait_for_unit(args.unit, args.user, args.timeout)

    @magic("wait_for_console")
    def wait_for_console(self, line: str) -> Output:
        """Wait until the serial console shows a match of REGEX (the rest of the line)."""
        machine, regex = self._target("wait_for_console", line)
        try:
            re.compile(regex)
        except re.error as e:
            raise UsageError(f"not a valid regex: {e}: {regex}") from None
        return Output(machine.wait_for_console_text(regex))

    # -- screen, keyboard, console -------------------------------------------------------------

    @magic("screenshot")
    def screenshot(self, line: str) -> Screenshot:
        """Take a screenshot, save it as PNG and show it.

        FILE follows nixpkgs' rules (``.png`` added, a bare name goes to the output
        directory); without it the name is the machine's and the time.
        """
        args = parse("screenshot", line)
        machine = self._vm(args.name, "screenshot")
        return machine.screenshot(args.file or screenshot_name(machine.name))

    @magic("keys")
    def keys(self, line: str) -> None:
        """Press keys, one after the other (QEMU key names, or characters)."""
        args = parse("keys", line)
        machine = self._vm(args.name, "keys")
        for key in args.keys:  # all checked before the first is pressed
            try:
                key_to_qmp(key)
            except ValueError as e:
                raise UsageError(str(e)) from None
        for key in args.keys:
            machine.send_key(key)

    @magic("type")
    def type(self, line: str) -> None:
        r"""Type TEXT (the rest of the line) on the machine's keyboard; ``\n`` is Enter."""
        machine, text = self._target("type", line)
        cast("Machine", machine).send_chars(unescape(text))

    @magic("console")
    def console(self, line: str) -> Output:
        """Show the last N non-empty lines of the machine's serial console (all of it is in its
        log)."""
        args = parse("console", line)
        lines = self._machine(args.name, "console").console.tail(MEMORY_LINES)
        return Output("\n".join([line for line in lines if clean(line).strip()][-args.n :]))

    @magic("shell")
    def guest_shell(self, line: str) -> Any:
        """A root login shell on a tty of the guest (job control, Ctrl-C, full-screen programs).

        In the terminal REPL it takes over the terminal until Ctrl-] returns to the prompt; a
        VM's shell keeps running for the next ``%shell``. Elsewhere (a notebook) it starts the
        shell and says how to attach from a terminal: ``nixos-repl shell NAME --state-dir DIR``.
        On a container the shell is a new login shell in its namespaces (through nsenter, on a
        pty of this terminal): Ctrl-D (or Ctrl-]) ends it and comes back, leaving nothing.
        """
        machine = self._machine(parse("shell", line).name, "shell")
        return self.session.open_shell(machine)
