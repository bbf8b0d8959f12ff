"""Recording an interactive session, and ``%record`` / ``%export``.

The extension starts a :class:`~nixos_repl.record.SessionLog` for an interactive driver (the
terminal REPL, the Jupyter kernel, ``%load_ext``; not ``--batch``, and not with
``NIXOS_REPL_RECORD=0``). It observes every machine action, whether a magic or plain Python
called it, and this module tells it which cell runs: the cell's source when it starts, and how
it ended (the error and the cell's line) when it is done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class

from ..export import ExportError, export_file
from ..magic_table import MAGICS
from ..record import SessionLog, describe_error
from .display import Output
from .magics import magic, parse

if TYPE_CHECKING:
    from .session import Session

__all__ = ["RECORD_ENV", "RecordMagics", "Recording", "failing_line", "install"]

RECORD_ENV = "NIXOS_REPL_RECORD"


def failing_line(ip: Any, error: BaseException | None) -> int | None:
    """The line of the cell where ``error`` came from: its last frame in the cell's code."""
    if isinstance(error, SyntaxError):
        return error.lineno
    line = None
    tb = error.__traceback__ if error is not None else None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals is ip.user_ns and frame.f_code.co_name in ("<module>", "<cell line: 0>"):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class Recording:
    """A session log fed by the shell's cell events."""

    def __init__(self, ip: Any, session: Session, log: SessionLog) -> None:
        self.ip = ip
        self.session = session
        self.log = log

    def before_cell(self, info: Any) -> None:
        source = getattr(info, "raw_cell", None) or ""
        self.log.begin_cell(int(self.ip.execution_count), source)

    def after_cell(self, result: Any) -> None:
        error = result.error_before_exec or result.error_in_exec
        if error is None:
            self.log.end_cell(True)
        else:
            self.log.end_cell(False, describe_error(error), failing_line(self.ip, error))

    def close(self) -> None:
        self.ip.events.unregister("pre_run_cell", self.before_cell)
        self.ip.events.unregister("post_run_cell", self.after_cell)
        self.log.close()


def install(ip: Any, session: Session) -> Recording | None:
    """Start recording ``session`` if its driver is interactive (and recording is not off)."""
    magics = RecordMagics(ip, session)
    ip.register_magics(magics)
    if not session.driver.interactive or os.environ.get(RECORD_ENV, "1") == "0":
        return None
    recording = Recording(ip, session, SessionLog.for_driver(session.driver))
    ip.events.register("pre_run_cell", recording.before_cell)
    ip.events.register("post_run_cell", recording.after_cell)
    magics.recording = recording
    return recording


@magics_class
class RecordMagics(Magics):
    """``%record`` and ``%export``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session
        self.recording: Recording | None = None

    def _log(self) -> SessionLog:
        if self.recording is None:
            raise UsageError(
                "this session is not recorded (a --batch run, or NIXOS_REPL_RECORD=0); "
                "start nixos-repl or the kernel without NIXOS_REPL_RECORD=0 to record"
            )
        return self.recording.log

    @magic("record")
    def record(self, line: str) -> Output:
        """Show where the session is recorded; change what is recorded.

        Every machine action (magics and plain Python alike) is appended to a session log in the
        output directory, one JSON object per line, flushed at once. Commands' output is not
        recorded (only exit status and size) unless ``--outputs`` is on.
        ``%export FILE`` turns the log into a testScript.
        """
        args = parse("record", line)
        if self.recording is None and not self.session.driver.interactive:
            return Output("not recording: a --batch run is not recorded")
        log = self._log()
        if (args.outputs and args.no_outputs) or (args.on and args.off):
            raise UsageError(f"contradictory options\n{MAGICS['record'].usage()}")
        if args.outputs or args.no_outputs:
            log.outputs = bool(args.outputs)
        if args.on or args.off:
            log.enabled = bool(args.on)
        state = "on" if log.enabled else "paused"
        outputs = "with" if log.outputs else "without"
        return Output(
            f"recording {state} ({outputs} command outputs): {log.path} "
            f"({log.actions} actions so far)"
        )

    @magic("export")
    def export(self, line: str) -> Output:
        """Write this session as a nixpkgs testScript (the cells before this one).

        Magics become the calls they wrap, plain Python is kept, failed steps become comments
        (``--keep-failures``: ``succeed`` <-> ``fail``), and the steps a ``%restore`` undid
        are left out (``--keep-undone``: kept as comments). Replay it with
        ``nixos-repl --batch FILE`` on the same machines.
        """
        args = parse("export", line)
        if self.recording is None and not self.session.driver.interactive:
            # a notebook replayed by --batch: the run itself is the test; nothing to export
            return Output(f"not exported: a --batch run is not recorded ({args.file} untouched)")
        log = self._log()
        if not log.path.exists():
            raise UsageError("nothing to export: no cell has run in this session yet")
        target = Path(args.file).expanduser()
        skip = [log.cell] if log.cell is not None else []
        try:
            exported = export_file(
                log.path,
                target,
                keep_failures=args.keep_failures,
                keep_undone=args.keep_undone,
                skip_cells=skip,
            )
        except ExportError as e:
            raise UsageError(str(e)) from None
        note = f", {exported.commented} left as comments" if exported.commented else ""
        return Output(f"wrote {target} ({exported.statements} statements{note})")
