"""nixpkgs-shaped output as ``logging`` handlers: the terminal log, the XML log and JUnit XML.

Everything in nixos-repl logs through :mod:`logging`. The shape of nixpkgs' driver output lives
here, in handlers attached to the ``nixos_repl`` logger:

* :class:`TerminalHandler`: nixpkgs' terminal log on stderr (``vm1: message``, green bold nested
  headers and ``(finished: MSG, in X.XX seconds)``, dim ``vm1 # line`` serial lines, red ``!!!``).
* :class:`XMLLogHandler`: the ``$LOGFILE`` XML log (``<logfile>``, ``<nest><head>``, ``<line>``).
* :class:`JUnitHandler`: JUnit XML, one case per subtest (``main`` when there is none).

Structure travels in the records' ``extra`` attributes (the ``NESTED``, ``SUBTEST``... names
below): :class:`DriverLogger`, the ``log`` object of test scripts, sets them, and the machine
layer's nested steps carry the same ``step``/``phase``/``elapsed``. Records without
them are plain lines: a record of logger ``nixos_repl.machine.<name>`` belongs to machine
``<name>``, and one of ``nixos_repl.machine.<name>.serial`` is a serial console line.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
import time
import traceback
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import XMLGenerator
from xml.sax.xmlreader import AttributesImpl

__all__ = [
    "AbstractLogger",
    "DriverLogger",
    "JUnitHandler",
    "LogLevel",
    "NixpkgsHandler",
    "TerminalHandler",
    "XMLLogHandler",
    "attach",
    "nixpkgs_handlers",
]

# Names of the ``extra`` attributes that carry structure.
# The names the machine layer's ``nested`` uses too, so its steps nest like the driver's.
NESTED = "phase"  # "start" or "end" of a nested step
NESTED_MSG = "step"  # the step's message (on both records)
ELAPSED = "elapsed"  # seconds, on the "end" record
SUBTEST = "nixos_subtest"  # the subtest's name, on the nested records of ``subtest()``
MACHINE = "nixos_machine"  # the machine a record is about
LEVEL = "nixos_level"  # "debug", "info" or "warning": filtered by the nixpkgs log level
TEST_ERROR = "nixos_test_error"  # a ``!!!`` line
SERIAL = "nixos_serial"  # a serial console line (value: the line, without the machine prefix)
ATTRS = "attrs"  # a nested step's XML attributes, e.g. a screenshot's ``image``

ROOT_LOGGER = "nixos_repl"
DRIVER_LOGGER = "nixos_repl.driver"
_MACHINE_PREFIX = "nixos_repl.machine."
# Module loggers under nixos_repl.machine that are not machines.
_MACHINE_MODULES = frozenset(
    {"console", "keys", "monitor", "ocr", "process", "qmp", "screen", "screenshot", "shell"}
)
# Loggers whose INFO records are bookkeeping, not nixpkgs log lines: shown at --log-level debug.
_DEMOTED = ("nixos_repl.registry", "nixos_repl.loop")
FINISHED = "(finished: %s, in %.2f seconds)"

BRIGHT, DIM, GREEN, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[32m", "\x1b[31m", "\x1b[0m"


class LogLevel(enum.IntEnum):
    """nixpkgs' log levels (``--log-level``)."""

    DEBUG = 1
    INFO = 2
    WARNING = 3
    ERROR = 4


# -- what a record is ------------------------------------------------------------------------


def record_machine(record: logging.LogRecord) -> str | None:
    """The machine a record is about: its ``extra``, else its logger's name."""
    machine = getattr(record, MACHINE, None)
    if machine is not None:
        return str(machine)
    if not record.name.startswith(_MACHINE_PREFIX):
        return None
    rest = record.name[len(_MACHINE_PREFIX) :]
    for suffix in (".serial", ".qmp"):
        if rest.endswith(suffix):
            return rest[: -len(suffix)]
    return None if rest in _MACHINE_MODULES else rest


def serial_line(record: logging.LogRecord) -> str | None:
    """The console line of a serial record (without ``name #``), else None."""
    line = getattr(record, SERIAL, None)
    if line is not None:
        return str(line)
    if record.name.startswith(_MACHINE_PREFIX) and record.name.endswith(".serial"):
        args = record.args
        if isinstance(args, tuple) and len(args) == 2:
            return str(args[1])
        return record.getMessage().partition(" # ")[2]
    return None


def nested_kind(record: logging.LogRecord) -> str | None:
    """ "start" or "end" for the records of a nested step, else None."""
    kind = getattr(record, NESTED, None)
    if kind is not None:
        return str(kind)
    if record.msg == FINISHED:  # a machine's nested step, logged without extra
        return "end"
    return None


def is_test_error(record: logging.LogRecord) -> bool:
    return bool(getattr(record, TEST_ERROR, False))


# -- handlers --------------------------------------------------------------------------------


class NixpkgsHandler(logging.Handler):
    """Common filtering: the nixpkgs log level and the serial switch (``serial_stdout_on/off``).

    As in nixpkgs, the level filters only ``info``/``warning``/``debug`` lines of the driver's
    logger; plain log lines, nested steps, errors and serial lines always pass.
    """

    def __init__(self, log_level: LogLevel = LogLevel.INFO) -> None:
        super().__init__(logging.DEBUG)
        self.log_level = log_level
        self.print_serial = True

    def wants(self, record: logging.LogRecord) -> bool:
        if serial_line(record) is not None:
            return self.print_serial
        level = getattr(record, LEVEL, None)
        if level is not None:
            return LogLevel[str(level).upper()] >= self.log_level
        if record.levelno < logging.INFO or (
            record.levelno < logging.WARNING and record.name.startswith(_DEMOTED)
        ):
            return self.log_level <= LogLevel.DEBUG
        return True

    def is_debug(self, record: logging.LogRecord) -> bool:
        level = getattr(record, LEVEL, None)
        if level is not None:
            return str(level) == "debug"
        return record.levelno < logging.INFO or record.name.startswith(_DEMOTED)


class TerminalHandler(NixpkgsHandler):
    """nixpkgs' terminal log (stderr); colours when the stream is a terminal."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        color: bool | None = None,
        log_level: LogLevel = LogLevel.INFO,
    ) -> None:
        super().__init__(log_level)
        self.stream = stream if stream is not None else sys.stderr
        self.color = self.stream.isatty() if color is None else color

    def _c(self, code: str) -> str:
        return code if self.color else ""

    def format_record(self, record: logging.LogRecord) -> str:
        machine = record_machine(record)
        line = serial_line(record)
        if line is not None:
            return f"{self._c(DIM)}{machine} # {line}{self._c(RESET)}"
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if is_test_error(record):
            return f"{self._c(RED)}!!! {self._c(RESET)}{msg}"
        if nested_kind(record) == "start":
            msg = f"{self._c(BRIGHT + GREEN)}{msg}{self._c(RESET)}"
        text = f"{machine}: {msg}" if machine is not None else msg
        if self.is_debug(record):
            return f"{self._c(DIM)}{text}{self._c(RESET)}"
        return text

    def emit(self, record: logging.LogRecord) -> None:
        if not self.wants(record):
            return
        try:
            self.stream.write(self.format_record(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)


class XMLLogHandler(NixpkgsHandler):
    """nixpkgs' XML log (``$LOGFILE``): ``<logfile>`` of ``<nest>``/``<head>`` and ``<line>``.

    Serial lines are held back and written at the next log line or step boundary, with control
    characters removed, as nixpkgs does. :meth:`close` ends the document properly.
    """

    def __init__(self, path: str | Path, log_level: LogLevel = LogLevel.INFO) -> None:
        super().__init__(log_level)
        self._file = open(path, "wb")  # closed in close()
        self._xml = XMLGenerator(self._file, encoding="utf-8")
        self._serial: list[tuple[str, dict[str, str]]] = []
        self._depth = 0
        self._closed = False
        self._xml.startDocument()
        self._xml.startElement("logfile", AttributesImpl({}))

    @staticmethod
    def sanitise(message: str) -> str:
        return "".join(ch for ch in message if unicodedata.category(ch)[0] != "C")

    def _line(self, message: str, attrs: dict[str, str]) -> None:
        self._xml.startElement("line", AttributesImpl(attrs))
        self._xml.characters(message)
        self._xml.endElement("line")

    def _drain(self) -> None:
        serial, self._serial = self._serial, []
        for message, attrs in serial:
            self._line(self.sanitise(message), attrs)

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed or not self.wants(record):
            return
        try:
            machine = record_machine(record)
            attrs = {"machine": machine} if machine is not None else {}
            line = serial_line(record)
            if line is not None:
                self._serial.append((line, {**attrs, "type": "serial"}))
                return
            kind = nested_kind(record)
            if kind == "start":
                extra = getattr(record, ATTRS, None) or {}
                attrs.update({str(k): str(v) for k, v in extra.items()})
                self._xml.startElement("nest", AttributesImpl({}))
                self._xml.startElement("head", AttributesImpl(attrs))
                self._xml.characters(record.getMessage())
                self._xml.endElement("head")
                self._depth += 1
                self._drain()
            elif kind == "end" and getattr(record, NESTED, None) == "end" and self._depth:
                self._drain()
                self._line(record.getMessage(), {})
                self._xml.endElement("nest")
                self._depth -= 1
            else:
                self._drain()
                self._line(record.getMessage(), attrs)
            self._file.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if not self._closed:
                self._closed = True
                self._drain()
                for _ in range(self._depth):
                    self._xml.endElement("nest")
                self._xml.endElement("logfile")
                self._xml.endDocument()
                self._file.close()
        super().close()


@dataclass
class _Case:
    stdout: str = ""
    stderr: str = ""
    failure: bool = False
    started: float = 0.0
    total: float = 0.0
    nested: float = 0.0


class JUnitHandler(NixpkgsHandler):
    """JUnit XML as nixpkgs writes it: suite "NixOS integration test", one case per subtest.

    A case holds its subtest's log lines (``system-out``) and errors (``system-err``; any error
    marks it failed, "test case failed"). Its time excludes nested subtests. A synthetic ``main``
    case holds the whole run only when there are no subtests. Written by :meth:`close`.
    """

    def __init__(self, path: str | Path, log_level: LogLevel = LogLevel.INFO) -> None:
        super().__init__(log_level)
        self.path = Path(path)
        self.suite = _Case(started=time.monotonic())
        self.cases: dict[str, _Case] = {}
        self._stack: list[str] = []
        self._closed = False

    def _targets(self) -> list[_Case]:
        return [self.suite] + ([self.cases[self._stack[-1]]] if self._stack else [])

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:
            return
        try:
            subtest = getattr(record, SUBTEST, None)
            kind = nested_kind(record)
            if subtest is not None and kind == "end":
                self._end_subtest(str(subtest))
                return
            if subtest is not None and kind == "start":  # the header is not in nixpkgs' JUnit
                self.cases.setdefault(str(subtest), _Case()).started = time.monotonic()
                self._stack.append(str(subtest))
                return
            if not self.wants(record) or kind == "end":  # no "(finished: ...)" lines either
                return
            line = serial_line(record)
            text = f"{record_machine(record)} # {line}" if line is not None else record.getMessage()
            text = XMLLogHandler.sanitise(text)  # escape sequences are not valid XML
            if record.levelno >= logging.ERROR or is_test_error(record):
                for case in self._targets():
                    case.stderr += text + "\n"
                    case.failure = True
            else:
                for case in self._targets():
                    case.stdout += text + "\n"
        except Exception:
            self.handleError(record)

    def _end_subtest(self, name: str) -> None:
        if not self._stack or self._stack[-1] != name:
            return
        self._stack.pop()
        case = self.cases[name]
        elapsed = time.monotonic() - case.started
        case.total += elapsed
        if self._stack:
            self.cases[self._stack[-1]].nested += elapsed

    def write(self) -> None:
        from junitparser import Failure, JUnitXml, TestCase, TestSuite

        cases = dict(self.cases)
        if not cases:
            main = _Case(
                stdout=self.suite.stdout,
                stderr=self.suite.stderr,
                failure=self.suite.failure,
                total=time.monotonic() - self.suite.started,
            )
            cases["main"] = main
        suite = TestSuite("NixOS integration test")
        for name, state in cases.items():
            case = TestCase(name)
            case.time = round(max(state.total - state.nested, 0.0), 3)
            if state.failure:
                case.result = [Failure("test case failed")]
            if state.stdout:
                case.system_out = state.stdout
            if state.stderr:
                case.system_err = state.stderr
            suite.add_testcase(case)
        xml = JUnitXml()
        xml.add_testsuite(suite)
        xml.update_statistics()  # type: ignore[no-untyped-call]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        xml.write(str(self.path), pretty=True)

    def close(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if not self._closed:
                self._closed = True
                while self._stack:  # a run cut short (timeout): close the open subtests
                    self._end_subtest(self._stack[-1])
                self.write()
        super().close()


# -- attaching -------------------------------------------------------------------------------


def nixpkgs_handlers() -> list[NixpkgsHandler]:
    """The nixpkgs-shaped handlers attached to the ``nixos_repl`` logger."""
    return [h for h in logging.getLogger(ROOT_LOGGER).handlers if isinstance(h, NixpkgsHandler)]


@contextlib.contextmanager
def attach(handlers: Sequence[logging.Handler]) -> Iterator[None]:
    """Route every ``nixos_repl`` record (serial lines included) to ``handlers`` only.

    On exit the handlers are detached and closed (JUnit and XML files are written then).
    """
    root = logging.getLogger(ROOT_LOGGER)
    saved = (root.level, root.propagate)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved[0])
        root.propagate = saved[1]


# -- the ``log`` object of test scripts ------------------------------------------------------


class AbstractLogger(ABC):
    """nixpkgs' logger interface (``test_driver.logger.AbstractLogger``)."""

    @abstractmethod
    def log(self, message: str, attributes: dict[str, str] | None = None) -> None: ...

    @abstractmethod
    def subtest(
        self, name: str, attributes: dict[str, str] | None = None
    ) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def nested(
        self, message: str, attributes: dict[str, str] | None = None
    ) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def debug(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def info(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def warning(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def error(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def log_test_error(self, *args: Any, **kwargs: Any) -> None: ...

    @abstractmethod
    def log_serial(self, message: str, machine: str) -> None: ...

    @abstractmethod
    def print_serial_logs(self, enable: bool) -> None: ...

    @abstractmethod
    def set_log_level(self, level: LogLevel) -> None: ...


class DriverLogger(AbstractLogger):
    """nixpkgs' ``log`` for test scripts, over :mod:`logging` (logger ``nixos_repl.driver``).

    ``log``, ``nested`` and ``subtest`` lines always show; ``info``, ``warning`` and ``debug``
    follow the ``--log-level``; ``error`` logs and then ends the run with exit status 1 (as
    nixpkgs' composite logger does); ``log_test_error`` writes a ``!!!`` line.
    """

    def __init__(self, name: str = DRIVER_LOGGER) -> None:
        self.logger = logging.getLogger(name)

    @staticmethod
    def _extra(attributes: dict[str, str] | None, **more: object) -> dict[str, object]:
        extra: dict[str, object] = dict(more)
        if attributes and "machine" in attributes:
            extra[MACHINE] = attributes["machine"]
        return extra

    def log(self, message: str, attributes: dict[str, str] | None = None) -> None:
        self.logger.info("%s", message, extra=self._extra(attributes))

    @contextlib.contextmanager
    def nested(self, message: str, attributes: dict[str, str] | None = None) -> Iterator[None]:
        with self._nested(message, attributes, {}):
            yield

    @contextlib.contextmanager
    def _nested(
        self, message: str, attributes: dict[str, str] | None, more: dict[str, object]
    ) -> Iterator[None]:
        start = self._extra(attributes, **more, **{NESTED: "start", NESTED_MSG: message})
        self.logger.info("%s", message, extra=start)
        tic = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - tic
            end = self._extra(
                attributes, **more, **{NESTED: "end", NESTED_MSG: message, ELAPSED: elapsed}
            )
            self.logger.info(FINISHED, message, elapsed, extra=end)

    @contextlib.contextmanager
    def subtest(self, name: str, attributes: dict[str, str] | None = None) -> Iterator[None]:
        with self._nested(f"subtest: {name}", attributes, {SUBTEST: name}):
            yield

    def _leveled(self, level: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        message = str(args[0]) if args else ""
        extra = self._extra(kwargs, **{LEVEL: level})
        py_level = {"debug": logging.DEBUG, "warning": logging.WARNING}.get(level, logging.INFO)
        self.logger.log(py_level, "%s", message, extra=extra)

    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._leveled("debug", args, kwargs)

    def info(self, *args: Any, **kwargs: Any) -> None:
        self._leveled("info", args, kwargs)

    def warning(self, *args: Any, **kwargs: Any) -> None:
        self._leveled("warning", args, kwargs)

    def error(self, *args: Any, **kwargs: Any) -> None:
        message = str(args[0]) if args else ""
        self.logger.error("%s", message, extra=self._extra(kwargs))
        sys.exit(1)

    def log_test_error(self, *args: Any, **kwargs: Any) -> None:
        message = str(args[0]) if args else ""
        self.logger.error("%s", message, extra=self._extra(kwargs, **{TEST_ERROR: True}))

    def log_serial(self, message: str, machine: str) -> None:
        extra = {MACHINE: machine, SERIAL: message}
        logging.getLogger(f"{_MACHINE_PREFIX}{machine}.serial").debug(
            "%s # %s", machine, message, extra=extra
        )

    def print_serial_logs(self, enable: bool) -> None:
        for handler in nixpkgs_handlers():
            handler.print_serial = enable

    def set_log_level(self, level: LogLevel) -> None:
        for handler in nixpkgs_handlers():
            handler.log_level = level
