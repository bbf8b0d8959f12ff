"""What every magic stands for: its arguments and the testScript call it is.

One :class:`MagicSpec` per magic, in :data:`MAGICS`: the magics (``interactive/magics.py``)
declare their arguments from it, tab completion reads which words are machines, export and
``--batch`` turn a magic into the calls of its :meth:`MagicSpec.to_python`. A magic that has no
call says why: it only shows something (:class:`ShowOnly`: a comment in an export, nothing in
a batch run), it manages the session (:class:`Silent`: left out), or it has no testScript
equivalent (:class:`NoCall`: a comment in an export, a failed cell in a batch run).

Adding a magic is one entry here and one method in ``interactive/magics.py`` that names it.
"""

from __future__ import annotations

import argparse
import re
from argparse import Namespace
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from IPython.core import magic_arguments as _magic_arguments
from IPython.core.error import UsageError

from .driver import pythonize_name
from .machine import DEFAULT_TIMEOUT

__all__ = [
    "IPYTHON_SILENT",
    "MAGICS",
    "NEEDS",
    "Arg",
    "MagicSpec",
    "NoCall",
    "ShowOnly",
    "Silent",
    "Translation",
    "py_str",
    "unescape",
    "usage",
]

_TARGET = re.compile(r"\s*(\S+)(?:[ \t]+(.*?))?\s*\Z", re.DOTALL)


class NoCall(Exception):
    """A magic with no testScript equivalent; the message says why."""


class ShowOnly(NoCall):
    """A magic that only shows something: nothing to do outside the prompt."""


class Silent(ShowOnly):
    """A magic that manages the session itself: left out of an export without a word."""


# IPython's own magics that a notebook may hold and that mean nothing in a testScript.
IPYTHON_SILENT = {"load_ext": "the extension is loaded already"}


def unescape(text: str) -> str:
    r"""``\n`` is Enter, ``\t`` is Tab, ``\\`` a backslash; everything else stays as typed."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _escape(char: str, quote: str, multiline: bool) -> str:
    if char == "\\":
        return "\\\\"
    if char == quote and not multiline:
        return "\\" + quote
    if char == "\n":
        return "\n" if multiline else "\\n"
    if char == "\t":
        return "\t" if multiline else "\\t"
    if not char.isprintable():
        return repr(char)[1:-1]
    return char


def py_str(text: str) -> str:
    """A Python string literal for ``text``, as a person would write it: double quotes (single
    ones when the text has double quotes only), triple quotes for several lines."""
    import ast

    if "\n" in text[:-1]:
        body = "".join(_escape(c, '"', True) for c in text).replace('"""', '""\\"')
        if body.endswith('"'):
            body = body[:-1] + '\\"'
        literal = f'"""{body}"""'
    else:
        quote = "'" if '"' in text and "'" not in text else '"'
        literal = quote + "".join(_escape(c, quote, False) for c in text) + quote
    try:
        if ast.literal_eval(literal) == text:
            return literal
    except (SyntaxError, ValueError):
        pass
    return repr(text)


# -- argument types --------------------------------------------------------------------------


def _positive(convert: Callable[[str], float], noun: str, unit: str = "") -> Callable[[str], Any]:
    """An argument type: a number more than 0 (``convert`` of the word), else the reason."""

    def parse(value: str) -> float:
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {value!r}") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0{unit}: {value!r}")
        return number

    return parse


seconds = _positive(float, "number of seconds", " seconds")
count = _positive(int, "whole number")


# What a magic may need of its machine beyond what every kind has (commands, the log, start and
# stop): the attribute, and what a machine without it lacks (a container: nixpkgs'
# ``NspawnMachine`` has no QMP, monitor or crash, and a screen only in an X11 session).
NEEDS = {
    "screen": "no screen or keyboard (it has a display only when it runs X11 and the driver "
    "exports it); use %succeed or %shell on it",
    "crash": "no crash() (there is no QEMU to kill); stop it with %shutdown, or release() at once",
    "snapshot": "no snapshots (only a VM's RAM and disks are saved); use a VM for %snapshot",
}

WAIT_TIMEOUT = DEFAULT_TIMEOUT.total_seconds()  # Machine.wait_for_unit's default
DEFAULT_LABEL = "booted"  # Machine.snapshot's and restore's default label


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One ``magic_arguments.argument(*flags, **options)``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


def flag(name: str, help: str) -> Arg:
    """An option without a value: ``--all``."""
    return arg(name, action="store_true", help=help)


class Translation:
    """What translating several magics in a row shares: names of unnamed screenshots
    (``vm1-1``, ``vm1-2``...), and which machines are containers (when a session log says)."""

    def __init__(self, containers: Iterable[str] = ()) -> None:
        self.shots: dict[str, int] = {}
        self.containers = frozenset(containers)

    def screenshot_name(self, machine: str) -> str:
        self.shots[machine] = self.shots.get(machine, 0) + 1
        return f"{machine}-{self.shots[machine]}"


ToPython = Callable[[Namespace, Translation], list[str]]


@dataclass(frozen=True)
class MagicSpec:
    """A magic: its arguments, which of its words are machines, and what call it stands for.

    ``rest`` (metavar, help, what): the magic takes ``NAME`` and the rest of the line raw;
    ``cell``: a cell magic (the body is ``args.body``); ``raw``: no ``$var`` expansion;
    ``machines``: ``one`` (the first word), ``many`` (every word) or ``""``; ``words``:
    subcommands completed in first place; ``labels``: the word after the machine is a snapshot
    label; ``needs``: the machine attribute the magic uses beyond what every kind of machine
    has (a key of :data:`NEEDS`). ``to_python(args, translation)`` returns the
    statements, or raises :class:`NoCall` (or a subclass) saying why there are none.
    """

    name: str
    to_python: ToPython
    arguments: Sequence[Arg] | None = ()  # None: the magic declares its own (it only shows)
    rest: tuple[str, str, str] | None = None
    cell: bool = False
    raw: bool = False
    machines: Literal["one", "many", ""] = ""
    words: tuple[str, ...] = ()
    labels: bool = False  # the word after the machine is one of its snapshots' labels
    needs: str = ""  # a key of NEEDS: what the machine must have (a VM has all of them)

    def declare(self, fn: Any) -> Any:
        """Attach the arguments to ``fn`` as IPython's ``@magic_arguments`` decorators do (so
        ``%name?`` shows them) and return it."""
        if self.arguments is None:
            return fn
        arguments = list(self.arguments)
        if self.rest is not None:
            metavar, help, _ = self.rest
            arguments = [
                arg("name", metavar="NAME", help="the machine"),
                *arguments,
                arg("rest", nargs=argparse.REMAINDER, metavar=metavar, help=help),
            ]
        argument: Any = _magic_arguments.argument
        magic_arguments: Any = _magic_arguments.magic_arguments
        for a in reversed(arguments):
            fn = argument(*a.flags, **a.options)(fn)
        return magic_arguments(name=self.name)(fn)

    @cached_property
    def parser(self) -> argparse.ArgumentParser | None:
        """The argument parser (None for a magic that declares its own)."""
        if self.arguments is None:
            return None

        def magic(line: str) -> None:
            """"""

        return getattr(self.declare(magic), "parser", None)

    def refusal(self, machine: Any) -> str | None:
        """Why this magic cannot run on ``machine`` (one line), or None if it can."""
        if not self.needs or hasattr(machine, self.needs):
            return None
        kind = getattr(getattr(machine, "lifecycle", None), "kind", "machine")
        return f"%{self.name}: {machine.name} is a {kind}, which has {NEEDS[self.needs]}"

    def usage(self) -> str:
        """``usage: %succeed NAME CMD...``: the magic's usage on one line."""
        return usage(self.parser) if self.parser is not None else f"usage: %{self.name}"

    def parse(self, line: str, body: str | None = None) -> Namespace:
        """The arguments of ``line`` (and the cell's body); UsageError with the usage line."""
        if self.rest is not None:
            match = _TARGET.match(line)
            what = self.rest[2]
            if match is None:
                raise UsageError(f"missing the machine name and {what}\n{self.usage()}")
            if not match.group(2):
                raise UsageError(f"missing {what}\n{self.usage()}")
            return Namespace(name=match.group(1), rest=match.group(2), body=body)
        if self.parser is None:
            return Namespace(line=line, body=body)
        try:
            args: Namespace = getattr(self.parser, "parse_argstring")(line)  # noqa: B009
        except (UsageError, ValueError) as e:  # ValueError: an unclosed quote
            raise UsageError(f"{e}\n{self.usage()}") from None
        args.body = body
        return args

    def calls(self, line: str, body: str | None, translation: Translation) -> list[str]:
        """The statements ``%name line`` stands for; NoCall (or a subclass) when there are
        none, with bad arguments too."""
        if body is not None and not self.cell:
            raise NoCall(f"%{self.name} is a line magic, not a cell magic")
        if body is None and self.cell:
            raise NoCall(f"%%{self.name} is a cell magic, not a line magic")
        try:
            args = self.parse(line, body)
        except UsageError as e:
            raise NoCall(str(e).splitlines()[0]) from None
        return self.to_python(args, translation)


def usage(parser: argparse.ArgumentParser) -> str:
    """``usage: %succeed NAME CMD...`` from a magic's parser."""
    text = " ".join(parser.format_usage().replace("::", " ").split())
    for action in parser._actions:
        if action.nargs == argparse.REMAINDER:
            text = text.replace(" ...", f" {action.metavar}...")
    return f"usage: {text}"


def _var(name: str) -> str:
    return pythonize_name(name)


def _method(method: str, text: Callable[[str], str] = lambda s: s) -> ToPython:
    """``NAME REST`` -> ``NAME.method("REST")``."""
    return lambda a, _: [f"{_var(a.name)}.{method}({py_str(text(a.rest))})"]


def _shows(reason: str) -> ToPython:
    def to_python(args: Namespace, _: Translation) -> list[str]:
        raise ShowOnly(reason)

    return to_python


def _silent(reason: str) -> ToPython:
    def to_python(args: Namespace, _: Translation) -> list[str]:
        raise Silent(reason)

    return to_python


def _start(args: Namespace, translation: Translation) -> list[str]:
    # nixpkgs' containers have no connect(): their first command waits until they have booted.
    if args.all or not args.names:
        vms = "machines_qemu" if translation.containers else "machines"
        return ["start_all()", f"for machine_ in {vms}:", "    machine_.connect()"]
    names = [_var(n) for n in args.names]
    vm_names = [_var(n) for n in args.names if n not in translation.containers]
    return [f"{n}.start()" for n in names] + [f"{n}.connect()" for n in vm_names]


def _wait_for_unit(args: Namespace, _: Translation) -> list[str]:
    call = f"{_var(args.name)}.wait_for_unit({py_str(args.unit)}"
    if args.user:
        call += f", user={py_str(args.user)}"
    if args.timeout != WAIT_TIMEOUT:
        call += f", timeout={args.timeout:g}"
    return [call + ")"]


def _screenshot(args: Namespace, translation: Translation) -> list[str]:
    file = args.file or translation.screenshot_name(args.name)
    return [f"{_var(args.name)}.screenshot({py_str(file)})"]


def _machines(args: Namespace, _: Translation) -> list[str]:
    if args.action == "add":
        raise NoCall("a test defines its machines (nodes.NAME; --start-scripts to replay)")
    raise ShowOnly("it shows the machines")


def rewind_target(args: Namespace) -> tuple[str | None, str]:
    """``%snapshot``/``%restore``: the machine (None with ``--all``) and the label."""
    if args.all:
        if args.label is not None:
            raise UsageError("with --all, give only the LABEL (every running machine is meant)")
        return None, args.name or DEFAULT_LABEL
    if args.name is None:
        raise UsageError("missing the machine name (or --all)")
    return args.name, args.label or DEFAULT_LABEL


def _rewind(method: str) -> ToPython:
    """``NAME LABEL`` -> ``NAME.method("LABEL")``; ``--all LABEL`` -> ``driver.method_all(...)``."""

    def to_python(args: Namespace, _: Translation) -> list[str]:
        try:
            name, label = rewind_target(args)
        except UsageError as e:
            raise NoCall(str(e)) from None
        if name is None:
            return [f"driver.{method}_all({py_str(label)})"]
        return [f"{_var(name)}.{method}({py_str(label)})"]

    return to_python


def _rewind_args(verb: str) -> list[Arg]:
    return [
        arg("name", nargs="?", metavar="NAME", help="the machine"),
        arg("label", nargs="?", metavar="LABEL", help=f"the snapshot (default {DEFAULT_LABEL})"),
        flag("--all", f"{verb} every running machine at once"),
    ]


def _rewind_spec(method: str, verb: str) -> MagicSpec:
    """``%snapshot`` and ``%restore``: ``NAME [LABEL]`` or ``--all [LABEL]`` (VMs only)."""
    return MagicSpec(
        method, _rewind(method), _rewind_args(verb), machines="one", labels=True, needs="snapshot"
    )


def _rebuild(args: Namespace, _: Translation) -> list[str]:
    raise NoCall("redeploy by rebuilding the test instead")


_NAME = arg("name", metavar="NAME", help="the machine")
_COMMAND = ("CMD", "a shell command", "the command")

MAGICS: dict[str, MagicSpec] = {
    spec.name: spec
    for spec in [
        # machines
        MagicSpec(
            "machines",
            _machines,
            [
                arg("action", nargs="?", choices=["add"], help="add: define a new machine"),
                arg("name", nargs="?", help="the new machine's name (with add)"),
                arg(
                    "start_script",
                    nargs="?",
                    help="its run-<name>-vm script, or run-<name>-nspawn for a container "
                    "(with add)",
                ),
            ],
            words=("add",),
        ),
        MagicSpec(
            "start",
            _start,
            [
                arg("names", nargs="*", metavar="NAME", help="machines to start (default: all)"),
                flag("--all", "start every machine"),
            ],
            machines="many",
        ),
        MagicSpec(
            "shutdown",
            lambda a, _: [f"{_var(a.name)}.shutdown()"],
            [_NAME],
            machines="one",
        ),
        MagicSpec(
            "crash",
            lambda a, _: [f"{_var(a.name)}.crash()"],
            [_NAME],
            machines="one",
            needs="crash",
        ),
        # snapshots
        _rewind_spec("snapshot", "save"),
        _rewind_spec("restore", "restore"),
        MagicSpec(
            "snapshots",
            _shows("it shows the snapshots"),
            [arg("name", nargs="?", metavar="NAME", help="the machine (default: all)")],
            machines="one",
            needs="snapshot",
        ),
        # commands
        MagicSpec("succeed", _method("succeed"), rest=_COMMAND, raw=True, machines="one"),
        MagicSpec("fail", _method("fail"), rest=_COMMAND, raw=True, machines="one"),
        MagicSpec("execute", _method("execute"), rest=_COMMAND, raw=True, machines="one"),
        MagicSpec(
            "sh",
            lambda a, _: [f"{_var(a.name)}.succeed({py_str(a.body)})"],
            [_NAME],
            cell=True,
            raw=True,
            machines="one",
        ),
        # waits
        MagicSpec(
            "wait_for_unit",
            _wait_for_unit,
            [
                _NAME,
                arg("unit", metavar="UNIT", help="a systemd unit"),
                arg("--user", help="a user's unit (systemctl --user)"),
                arg(
                    "--timeout",
                    type=seconds,
                    default=WAIT_TIMEOUT,
                    help=f"seconds (default {WAIT_TIMEOUT:g})",
                ),
            ],
            machines="one",
        ),
        MagicSpec(
            "wait_for_console",
            _method("wait_for_console_text"),
            rest=("REGEX", "a Python regex", "the regex"),
            raw=True,
            machines="one",
        ),
        # screen, keyboard, console
        MagicSpec(
            "screenshot",
            _screenshot,
            [
                _NAME,
                arg(
                    "file", nargs="?", metavar="FILE", help="where to save it (default: NAME-time)"
                ),
            ],
            machines="one",
            needs="screen",
        ),
        MagicSpec(
            "keys",
            lambda a, _: [f"{_var(a.name)}.send_key({py_str(k)})" for k in a.keys],
            [_NAME, arg("keys", nargs="+", metavar="KEY", help="e.g. ctrl-alt-f2, ret, a")],
            machines="one",
            needs="screen",
        ),
        MagicSpec(
            "type",
            _method("send_chars", unescape),
            rest=("TEXT", "what to type", "the text"),
            raw=True,
            machines="one",
            needs="screen",
        ),
        MagicSpec(
            "console",
            _shows("it shows console lines"),
            [
                _NAME,
                arg("-n", type=count, default=20, metavar="N", help="how many lines (default 20)"),
            ],
            machines="one",
        ),
        MagicSpec("shell", _shows("an interactive shell"), [_NAME], machines="one"),
        MagicSpec("watch", _shows("it shows the screen"), None, needs="screen"),
        MagicSpec("rebuild", _rebuild, None, raw=True),
        # the session
        MagicSpec(
            "record",
            _silent("it manages the session log"),
            [
                flag("--outputs", "also record the output of commands"),
                flag("--no-outputs", "record only status and size (default)"),
                flag("--off", "pause the recording"),
                flag("--on", "resume the recording"),
            ],
        ),
        MagicSpec(
            "export",
            _silent("it exports the session"),
            [
                arg("file", metavar="FILE", help="the testScript to write"),
                flag(
                    "--keep-failures",
                    "keep failed succeed/fail steps as the opposite assertion instead of comments",
                ),
                flag("--keep-undone", "keep the steps a %restore undid, as comments"),
            ],
        ),
    ]
}
