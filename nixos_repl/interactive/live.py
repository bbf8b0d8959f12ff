"""Quiet by default, visible on demand: what the front ends show while machines work.

:class:`InteractiveHandler` is the front ends' ``logging`` handler on the ``nixos_repl`` logger.
Serial console lines stay in the per-machine logs unless ``serial_stdout_on()`` is called (it is
a :class:`~nixos_repl.logs.NixpkgsHandler`, so the testScript switch reaches it). A machine's
nested steps (``waiting for unit ...``, ``must succeed: ...``) are not printed as lines: they
feed the :class:`Presenter`, which shows a live status line (machine, what it waits for, elapsed
time, last console line) once a step takes longer than a moment, updates it in place and removes
it when the step ends. Warnings, errors and the test script's own ``log`` lines are printed.

Records arrive on any thread, the I/O thread included; the handler only records them and wakes
the presenter. The presenter's own thread does all the output, through a :class:`Sink`: the
terminal's (``\\r`` redraws; above the prompt while one is shown), Jupyter's (a ``display_id``
that is updated) or a plain stream's.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from ..logs import (
    DRIVER_LOGGER,
    NESTED,
    NESTED_MSG,
    SUBTEST,
    TerminalHandler,
    record_machine,
    serial_line,
)
from .display import StatusLine, Step, format_duration

__all__ = [
    "InteractiveHandler",
    "JupyterSink",
    "PlainSink",
    "Presenter",
    "Sink",
    "TerminalSink",
    "status_text",
]

# A step shows once it has lasted this long (a quick command never flickers a line).
SHOW_AFTER = 0.4
# How often a shown status line is redrawn (elapsed time, console line).
REFRESH = 0.25
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[0-~]|[\x00-\x1f\x7f]")


def clean(text: str) -> str:
    """A console line without escape sequences and control characters."""
    return _CONTROL.sub("", text)


def clip(text: str, width: int) -> str:
    if width <= 1:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def status_text(steps: list[Step], last_line: Callable[[str], str], now: float) -> str:
    """One line for the outermost step of each busy machine."""
    parts = []
    for step in steps:
        line = clean(last_line(step.machine)).strip()
        console = f" · {clip(line, 60)}" if line else ""
        parts.append(
            f"{step.machine}: {step.text} ({format_duration(now - step.started)}){console}"
        )
    return " | ".join(parts)


class Sink(Protocol):
    """Where the presenter's output goes. Called from the presenter's thread only."""

    def show(self, text: str) -> None:
        """Show ``text`` as the status line, replacing the previous one."""

    def hide(self) -> None:
        """Remove the status line."""

    def write(self, line: str) -> None:
        """Print a log line (above the status line and the prompt)."""

    def begin_cell(self) -> None:
        """A cell starts executing (called on the shell's thread)."""

    def end_cell(self) -> None:
        """The cell is done; the next status line belongs to the next cell."""


class PlainSink:
    """A stream that is not a terminal: log lines only, no status line."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def show(self, text: str) -> None:
        pass

    def hide(self) -> None:
        pass

    def write(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def begin_cell(self) -> None:
        pass

    def end_cell(self) -> None:
        pass


class _App(Protocol):
    @property
    def is_running(self) -> bool: ...

    @property
    def loop(self) -> Any: ...


class TerminalSink:
    """A terminal: the status line is redrawn in place with ``\\r``; while a prompt is shown
    (``app()`` returns a running prompt_toolkit application), log lines go above it through
    ``run_in_terminal`` and no status line is drawn."""

    def __init__(
        self, stream: IO[str] | None = None, app: Callable[[], _App | None] = lambda: None
    ):
        self.stream = stream
        self.app = app
        self._shown = False

    def _out(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.__stderr__ or sys.stderr

    def _prompt(self) -> _App | None:
        app = self.app()
        return app if app is not None and app.is_running else None

    def show(self, text: str) -> None:
        if self._prompt() is not None:
            return
        width = shutil.get_terminal_size((100, 24)).columns
        out = self._out()
        out.write(f"\r\x1b[2K\x1b[2m{clip(text, width - 1)}\x1b[0m")
        out.flush()
        self._shown = True

    def hide(self) -> None:
        if self._shown:
            out = self._out()
            out.write("\r\x1b[2K")
            out.flush()
            self._shown = False

    def write(self, line: str) -> None:
        app = self._prompt()
        if app is None:
            self.hide()
            out = self._out()
            out.write(line + "\n")
            out.flush()
            return
        from prompt_toolkit.application import run_in_terminal

        def above_prompt() -> None:
            run_in_terminal(lambda: print(line, file=self._out(), flush=True))

        app.loop.call_soon_threadsafe(above_prompt)

    def begin_cell(self) -> None:
        pass

    def end_cell(self) -> None:
        pass


class JupyterSink:
    """A Jupyter kernel: the status line is one display output of the running cell, updated
    through its ``display_id`` and emptied when done; log lines go to the cell's stderr."""

    def __init__(self) -> None:
        self._context: contextvars.Context | None = None
        self._handle: Any = None
        self._text = ""

    def begin_cell(self) -> None:
        # Outputs must carry the executing cell's parent header, which ipykernel keeps in
        # context variables of the shell's thread.
        self._context = contextvars.copy_context()
        self._handle = None
        self._text = ""

    def end_cell(self) -> None:
        self._context = None
        self._handle = None

    def _run(self, fn: Callable[[], None]) -> None:
        if self._context is None:
            fn()
        else:
            self._context.run(fn)

    def show(self, text: str) -> None:
        if text == self._text:
            return
        self._text = text

        def publish() -> None:
            from IPython import display as ipd

            display: Callable[..., Any] = ipd.display

            if self._handle is None:
                self._handle = display(StatusLine(text), display_id=True)
            else:
                self._handle.update(StatusLine(text))

        self._run(publish)

    def hide(self) -> None:
        if self._handle is not None and self._text:
            self._text = ""
            self._run(lambda: self._handle.update(StatusLine("")))

    def write(self, line: str) -> None:
        def publish() -> None:
            print(line, file=sys.stderr, flush=True)

        self._run(publish)


class Presenter:
    """Owns a thread that turns step events and log lines into the sink's output."""

    def __init__(self, sink: Sink, last_line: Callable[[str], str] = lambda _: "") -> None:
        self.sink = sink
        self.last_line = last_line
        self.show_after = SHOW_AFTER
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._steps: dict[str, list[Step]] = {}
        self._lines: collections.deque[str] = collections.deque()
        self._synced = 0
        self._sync_requests = 0
        self._stopped = False
        self._showing = False
        self._dirty = False
        self._thread = threading.Thread(target=self._run, name="nixos-repl-status", daemon=True)
        self._thread.start()

    # -- events (any thread) -------------------------------------------------------------------

    def step_started(self, machine: str, text: str) -> None:
        with self._lock:
            self._steps.setdefault(machine, []).append(Step(machine, text, time.monotonic()))
            self._dirty = True
            self._wake.notify()

    def step_ended(self, machine: str, text: str) -> None:
        with self._lock:
            stack = self._steps.get(machine)
            if not stack:
                return
            for i in range(len(stack) - 1, -1, -1):
                if stack[i].text == text:
                    del stack[i]
                    break
            if not stack:
                del self._steps[machine]
            self._dirty = True
            self._wake.notify_all()

    def line(self, text: str) -> None:
        with self._lock:
            self._lines.append(text)
            self._wake.notify()

    def busy(self) -> list[Step]:
        """The outermost step of each busy machine."""
        with self._lock:
            return [stack[0] for stack in self._steps.values() if stack]

    def sync(self, timeout: float = 2.0) -> None:
        """Wait until everything reported so far has been shown (or hidden)."""
        if threading.current_thread() is self._thread:
            return
        with self._lock:
            self._sync_requests += 1
            target = self._sync_requests
            self._wake.notify()
            deadline = time.monotonic() + timeout
            while self._synced < target and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._wake.wait(remaining)

    def settle(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until no machine step is running, then until that has been shown.

        An interrupted call returns before its coroutine's cleanup has run on the I/O loop;
        the steps it ends are reported a moment later.
        """
        if threading.current_thread() is not self._thread:
            deadline = time.monotonic() + timeout
            with self._lock:
                while self._steps and not self._stopped:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
        self.sync()

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        self._thread.join(timeout=2)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if not (
                    self._dirty
                    or self._lines
                    or self._stopped
                    or self._synced < self._sync_requests
                ):
                    self._wake.wait(self._timeout())
                self._dirty = False
                lines = list(self._lines)
                self._lines.clear()
                stopped = self._stopped
                steps = [] if stopped else [s[0] for s in self._steps.values() if s]
                sync_target = self._sync_requests
            self._render(lines, steps)
            with self._lock:
                self._synced = sync_target
                self._wake.notify_all()
                if stopped:
                    return

    def _timeout(self) -> float | None:
        """How long the thread may sleep: until a step becomes due, or the next redraw."""
        if self._showing:
            return REFRESH
        if not self._steps:
            return None
        oldest = min(stack[0].started for stack in self._steps.values() if stack)
        return max(oldest + self.show_after - time.monotonic(), 0.01)

    def _render(self, lines: list[str], steps: list[Step]) -> None:
        try:
            now = time.monotonic()
            for line in lines:
                self.sink.write(line)
            visible = [s for s in steps if now - s.started >= self.show_after]
            if visible:
                self.sink.show(status_text(visible, self.last_line, now))
                self._showing = True
            elif self._showing:
                self.sink.hide()
                self._showing = False
        except Exception:  # a broken sink must not kill the thread
            logging.getLogger(__name__).debug("status output failed", exc_info=True)


class InteractiveHandler(TerminalHandler):
    """The front ends' log handler: quiet serial, status lines for steps, the rest printed.

    Printed: warnings and errors; the test script's ``log`` lines and subtest headers; with
    ``verbose``, the machines' informational lines too. ``last_output`` keeps each machine's
    last reported command output (``succeed`` logs it before raising), for error messages.
    """

    def __init__(self, presenter: Presenter, *, color: bool, verbose: bool = False) -> None:
        super().__init__(stream=None, color=color)
        self.presenter = presenter
        self.verbose = verbose
        self.print_serial = False
        self.last_output: dict[str, str] = {}
        # The machine whose step ended last: the one a failure is about.
        self.last_machine: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._emit(record)
        except Exception:
            self.handleError(record)

    def _emit(self, record: logging.LogRecord) -> None:
        if serial_line(record) is not None:
            if self.print_serial:
                self.presenter.line(self.format_record(record))
            return
        phase = getattr(record, NESTED, None)
        machine = record_machine(record)
        if phase is not None:
            if record.name.startswith("nixos_repl.machine.") and machine is not None:
                text = str(getattr(record, NESTED_MSG, record.getMessage()))
                if phase == "start":
                    self.presenter.step_started(machine, text)
                else:
                    self.last_machine = machine
                    self.presenter.step_ended(machine, text)
            elif phase == "start" and getattr(record, SUBTEST, None) is not None:
                self.presenter.line(self.format_record(record))
            return
        if machine is not None and record.msg == "output: %s" and record.args:
            args = record.args
            output = str(args[0] if isinstance(args, tuple) else args)
            self.last_output[machine] = output[-4000:]
        if record.levelno >= logging.WARNING:
            self.presenter.line(self.format_record(record))
        elif record.name == DRIVER_LOGGER or record.name.startswith(DRIVER_LOGGER + "."):
            if self.wants(record):
                self.presenter.line(self.format_record(record))
        elif self.verbose and record.levelno >= logging.INFO:
            self.presenter.line(self.format_record(record))


@contextlib.contextmanager
def suppressed(logger: logging.Logger, *handler_types: type[logging.Handler]) -> Any:
    """Detach ``logger``'s handlers of the given types for the duration (a REPL inside a batch
    run: nixpkgs' terminal log would print over the prompt)."""
    removed = [h for h in logger.handlers if isinstance(h, handler_types)]
    for handler in removed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in removed:
            logger.addHandler(handler)
