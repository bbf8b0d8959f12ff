"""The magics: each a few lines over one public Machine or Driver call.

Arguments are declared with IPython's ``magic_arguments`` (``%succeed?`` shows the help; a bad
line is a ``UsageError`` that ends with the magic's usage line). Magics whose text reaches the
guest take the rest of the line raw (``@no_var_expand``: no ``$var``/``{var}`` expansion, quoting
kept). Values are returned, not printed: they render themselves (``display.py``).
"""

from __future__ import annotations

import argparse
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

from ..errors import UnknownMachineError
from ..loop import run_sync
from .display import Execution, MachineTable, Output, Screenshot

if TYPE_CHECKING:
    from ..machine import Machine
    from .session import Session

__all__ = ["NixosMagics", "screenshot_name", "unescape"]

F = TypeVar("F", bound=Callable[..., Any])


class _Decorator(Protocol):
    def __call__(self, fn: F, /) -> F: ...


# IPython's decorators, typed: each returns the function it decorates.
line_magic: _Decorator = cast(Any, _magic.line_magic)
named_line_magic: Callable[[str], _Decorator] = cast(Any, _magic.line_magic)
cell_magic: _Decorator = cast(Any, _magic.cell_magic)
no_var_expand: _Decorator = _magic.no_var_expand
magic_arguments: Callable[..., _Decorator] = _magic_arguments.magic_arguments
argument: Callable[..., _Decorator] = _magic_arguments.argument
parse_argstring: Callable[[Any, str], Any] = _magic_arguments.parse_argstring

_TARGET = re.compile(r"\s*(\S+)(?:[ \t]+(.*?))?\s*\Z", re.DOTALL)


def usage(magic: Callable[..., Any]) -> str:
    """``usage: %succeed NAME CMD...``: the magic's usage on one line."""
    parser: argparse.ArgumentParser = getattr(magic, "parser")  # noqa: B009 - set by IPython
    text = " ".join(parser.format_usage().replace("::", " ").split())
    for action in parser._actions:
        if action.nargs == argparse.REMAINDER:
            text = text.replace(" ...", f" {action.metavar}...")
    return f"usage: {text}"


def unescape(text: str) -> str:
    r"""``\n`` is Enter, ``\t`` is Tab, ``\\`` a backslash; everything else stays as typed."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def screenshot_name(machine: str) -> str:
    """A file name for a screenshot that was not given one: ``vm1-20260102-150405-123``."""
    now = dt.datetime.now()
    return f"{machine}-{now:%Y%m%d-%H%M%S}-{now.microsecond // 1000:03d}"


def machine_and_rest(metavar: str, help: str) -> _Decorator:
    """A line magic taking ``NAME`` and the rest of the line raw (no ``$var`` expansion).

    The rest (``CMD...``, ``REGEX``, ``TEXT``) is declared for ``%name?`` and the usage line;
    the magic itself splits the line with ``NixosMagics._target``.
    """

    def decorate(fn: F) -> F:
        fn = no_var_expand(line_magic(fn))
        fn = argument("rest", nargs=argparse.REMAINDER, metavar=metavar, help=help)(fn)
        return magic_arguments()(argument("name", metavar="NAME", help="the machine")(fn))

    return decorate


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {value!r}")
    return seconds


@magics_class
class NixosMagics(Magics):
    """nixos-repl's magics over one :class:`~nixos_repl.interactive.session.Session`."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    # -- helpers -------------------------------------------------------------------------------

    def _parse(self, magic: Callable[..., Any], line: str) -> Any:
        try:
            return parse_argstring(magic, line)
        except UsageError as e:
            raise UsageError(f"{e}\n{usage(magic)}") from None
        except ValueError as e:  # an unclosed quote
            raise UsageError(f"{e}\n{usage(magic)}") from None

    def _machine(self, name: str) -> Machine:
        try:
            return self.session.machine(name)
        except UnknownMachineError as e:
            raise UsageError(str(e)) from None

    def _target(self, magic: Callable[..., Any], line: str, what: str) -> tuple[Machine, str]:
        """``NAME REST``: the machine and the rest of the line, raw."""
        match = _TARGET.match(line)
        if match is None:
            raise UsageError(f"missing the machine name and {what}\n{usage(magic)}")
        if not match.group(2):
            raise UsageError(f"missing {what}\n{usage(magic)}")
        return self._machine(match.group(1)), match.group(2)

    # -- machines ------------------------------------------------------------------------------

    @magic_arguments()
    @argument("action", nargs="?", choices=["add"], help="add: define a new machine")
    @argument("name", nargs="?", help="the new machine's name (with add)")
    @argument("start_script", nargs="?", help="its run-<name>-vm script (with add)")
    @line_magic
    def machines(self, line: str) -> MachineTable:
        """Show the machines: name, state, uptime, pid, last console line.

        ``%machines add NAME START_SCRIPT`` defines a machine (not started) and binds it in the
        namespace under NAME, as ``create_machine(START_SCRIPT, name=NAME)`` does.
        """
        args = self._parse(self.machines, line)
        if args.action == "add":
            if not args.name or not args.start_script:
                raise UsageError(f"add needs NAME and START_SCRIPT\n{usage(self.machines)}")
            script = Path(args.start_script).expanduser()
            command = str(script.absolute()) if script.exists() else args.start_script
            self.session.driver.create_machine(command, name=args.name)
        return MachineTable.of(self.session.machines)

    @magic_arguments()
    @argument("names", nargs="*", metavar="NAME", help="machines to start (default: all)")
    @argument("--all", action="store_true", help="start every machine")
    @line_magic
    def start(self, line: str) -> None:
        """Start machines in parallel and wait until each one's backdoor shell answers."""
        args = self._parse(self.start, line)
        names = self.session.machine_names() if args.all or not args.names else args.names
        machines = [self._machine(n) for n in names]

        async def connect_all() -> None:
            await asyncio.gather(*(m.aio.connect() for m in machines))

        run_sync(connect_all())

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @line_magic
    def shutdown(self, line: str) -> None:
        """Power a machine off from its shell and wait until QEMU has exited."""
        self._machine(self._parse(self.shutdown, line).name).shutdown()

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @line_magic
    def crash(self, line: str) -> None:
        """Kill a machine's QEMU at once, as a power cut would."""
        self._machine(self._parse(self.crash, line).name).crash()

    # -- commands ------------------------------------------------------------------------------

    @machine_and_rest("CMD", "a shell command")
    def succeed(self, line: str) -> Output:
        """Run a command in the guest's root shell; it must exit 0. Shows its output.

        The command is the rest of the line, as typed (no ``$var`` expansion by IPython).
        """
        machine, command = self._target(self.succeed, line, "the command")
        return Output(machine.succeed(command))

    @machine_and_rest("CMD", "a shell command")
    def fail(self, line: str) -> Output:
        """Run a command in the guest's root shell; it must exit non-zero. Shows its output."""
        machine, command = self._target(self.fail, line, "the command")
        return Output(machine.fail(command))

    @machine_and_rest("CMD", "a shell command")
    def execute(self, line: str) -> Execution:
        """Run a command in the guest's root shell; shows its output and exit status."""
        machine, command = self._target(self.execute, line, "the command")
        return Execution(*machine.execute(command))

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @no_var_expand
    @cell_magic
    def sh(self, line: str, cell: str) -> Output:
        """Run the cell's body as one script in the guest's root shell; it must exit 0."""
        machine = self._machine(self._parse(self.sh, line).name)
        return Output(machine.succeed(cell))

    # -- waits ---------------------------------------------------------------------------------

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @argument("unit", metavar="UNIT", help="a systemd unit")
    @argument("--user", help="a user's unit (systemctl --user)")
    @argument("--timeout", type=_seconds, default=900.0, help="seconds (default 900)")
    @line_magic
    def wait_for_unit(self, line: str) -> None:
        """Wait until a systemd unit is active (fails at once if it fails)."""
        args = self._parse(self.wait_for_unit, line)
        self._machine(args.name).wait_for_unit(args.unit, args.user, args.timeout)

    @machine_and_rest("REGEX", "a Python regex")
    def wait_for_console(self, line: str) -> Output:
        """Wait until the serial console shows a match of REGEX (the rest of the line)."""
        machine, regex = self._target(self.wait_for_console, line, "the regex")
        return Output(machine.wait_for_console_text(regex))

    # -- screen, keyboard, console -------------------------------------------------------------

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @argument("file", nargs="?", metavar="FILE", help="where to save it (default: NAME-time)")
    @line_magic
    def screenshot(self, line: str) -> Screenshot:
        """Take a screenshot, save it as PNG and show it.

        FILE follows nixpkgs' rules (``.png`` added, a bare name goes to the output
        directory); without it the name is the machine's and the time.
        """
        args = self._parse(self.screenshot, line)
        machine = self._machine(args.name)
        return machine.screenshot(args.file or screenshot_name(machine.name))

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @argument("keys", nargs="+", metavar="KEY", help="e.g. ctrl-alt-f2, ret, a")
    @line_magic
    def keys(self, line: str) -> None:
        """Press keys, one after the other (QEMU key names, or characters)."""
        args = self._parse(self.keys, line)
        machine = self._machine(args.name)
        for key in args.keys:
            machine.send_key(key)

    @machine_and_rest("TEXT", "what to type")
    def type(self, line: str) -> None:
        r"""Type TEXT (the rest of the line) on the machine's keyboard; ``\n`` is Enter."""
        machine, text = self._target(self.type, line, "the text")
        machine.send_chars(unescape(text))

    @magic_arguments()
    @argument("name", metavar="NAME", help="the machine")
    @argument("-n", type=int, default=20, metavar="N", help="how many lines (default 20)")
    @line_magic
    def console(self, line: str) -> Output:
        """Show the last lines of the machine's serial console (all of it is in its log)."""
        args = self._parse(self.console, line)
        return Output("\n".join(self._machine(args.name).console.tail(args.n)))

    @magic_arguments(name="shell")
    @argument("name", metavar="NAME", help="the machine")
    @named_line_magic("shell")
    def guest_shell(self, line: str) -> Any:
        """A root login shell on a tty of the guest (job control, Ctrl-C, full-screen programs).

        In the terminal REPL it takes over the terminal until Ctrl-] returns to the prompt; the
        shell keeps running for the next ``%shell``. Elsewhere (a notebook) it starts the
        shell and says how to attach from a terminal: ``nixos-repl shell NAME --state-dir DIR``.
        """
        machine = self._machine(self._parse(self.guest_shell, line).name)
        return self.session.open_shell(machine)
