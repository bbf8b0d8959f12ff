"""The session log: every machine action of a session, one JSON object per line.

A :class:`SessionLog` observes a driver's machines (``Registry.observers``) and appends one line
per finished action, flushed at once, so a killed process loses nothing it had done. A front end
tells it which cell runs (:meth:`SessionLog.begin_cell`, :meth:`SessionLog.end_cell`); each
cell's source is written once, when it starts, and each action names its cell. Commands' output
is never written, only its size and the exit status, unless ``outputs`` is on.

The lines (``kind`` tells them apart)::

    {"kind": "session", "version": 1, "time": ..., "machines": {"vm1": "/.../run-vm1-vm"},
     "containers": [], ...}
    {"kind": "cell", "cell": 3, "time": ..., "source": "%succeed vm1 true"}
    {"kind": "action", "cell": 3, "machine": "vm1", "action": "succeed", "args": ["true"],
     "kwargs": {}, "ok": true, "status": 0, "output_size": 0, "duration": 0.0061, "time": ...}
    {"kind": "cell_end", "cell": 3, "ok": false, "error": "...", "line": 1}

:mod:`nixos_repl.export` turns such a log into a testScript.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .machine.actions import Action

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["LOG_VERSION", "SessionLog", "decode_value", "encode_value", "session_log_name"]

LOG_VERSION = 1
log = logging.getLogger(__name__)

_EXIT_CODE = re.compile(r"\(exit code (-?\d+)\)")


def session_log_name(now: dt.datetime | None = None) -> str:
    """``session-20260102-150405-1234.jsonl``: the time and the process."""
    now = now or dt.datetime.now()
    return f"session-{now:%Y%m%d-%H%M%S}-{os.getpid()}.jsonl"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def encode_value(value: Any) -> Any:
    """An argument as JSON: plain values as they are, a timedelta as ``{"timedelta": s}``,
    a path as its string, anything else as ``{"repr": ...}``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.timedelta):
        return {"timedelta": value.total_seconds()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    return {"repr": repr(value)}


def decode_value(value: Any) -> Any:
    """The inverse of :func:`encode_value` where there is one (``repr`` stays a dict)."""
    if isinstance(value, dict) and set(value) == {"timedelta"}:
        return dt.timedelta(seconds=float(value["timedelta"]))
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message`` (``interrupted`` for Ctrl-C and cancellation)."""
    if isinstance(error, KeyboardInterrupt | asyncio.CancelledError):
        return "interrupted"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class SessionLog:
    """Appends a session's records to ``path`` (created on the first record)."""

    def __init__(
        self,
        path: Path,
        *,
        machines: dict[str, str] | None = None,
        vlans: list[int] | None = None,
        outputs: bool = False,
        containers: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.outputs = outputs
        self.enabled = True
        self.cell: int | None = None
        self.actions = 0
        self._machines = dict(machines or {})
        self._vlans = list(vlans or [])
        self._containers = list(containers or [])
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._observed: list[Any] | None = None

    # -- attaching -----------------------------------------------------------------------------

    @classmethod
    def for_driver(cls, driver: Driver, *, outputs: bool = False) -> SessionLog:
        """A log in the driver's output directory that observes its machines."""
        machines = {m.name: m.start_command for m in driver.machines}
        session = cls(
            driver.out_dir / session_log_name(),
            machines=machines,
            vlans=list(driver.config.vlans),
            outputs=outputs,
            containers=[m.name for m in driver.machines_nspawn],
        )
        session.attach(driver.registry.observers)
        return session

    def attach(self, observers: list[Any]) -> None:
        observers.append(self.observe)
        self._observed = observers

    def detach(self) -> None:
        if self._observed is not None and self.observe in self._observed:
            self._observed.remove(self.observe)
        self._observed = None

    def close(self) -> None:
        self.detach()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- writing -------------------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to the operating system."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
                header = {
                    "kind": "session",
                    "version": LOG_VERSION,
                    "time": _now(),
                    "pid": os.getpid(),
                    "machines": self._machines,
                    "containers": self._containers,
                    "vlans": self._vlans,
                }
                self._file.write(json.dumps(header, separators=(",", ":")) + "\n")
            self._file.write(line)
            self._file.flush()

    def begin_cell(self, number: int, source: str) -> None:
        self.cell = number
        if self.enabled:
            self.write({"kind": "cell", "cell": number, "time": _now(), "source": source})

    def end_cell(self, ok: bool, error: str | None = None, line: int | None = None) -> None:
        if self.enabled and self.cell is not None:
            record: dict[str, Any] = {"kind": "cell_end", "cell": self.cell, "ok": ok}
            if error is not None:
                record["error"] = error
            if line is not None:
                record["line"] = line
            self.write(record)
        self.cell = None

    def observe(self, action: Action) -> None:
        """The observer: one ``action`` record."""
        if not self.enabled:
            return
        self.write(self.action_record(action))
        self.actions += 1

    def action_record(self, action: Action) -> dict[str, Any]:
        record: dict[str, Any] = {
            "kind": "action",
            "cell": self.cell,
            "machine": action.machine,
            "action": action.action,
            "args": encode_value(list(action.args)),
            "kwargs": {k: encode_value(v) for k, v in action.kwargs.items()},
            "ok": action.error is None,
            "duration": round(action.duration, 6),
            "time": dt.datetime.fromtimestamp(action.started, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
        }
        result, error = action.result, action.error
        if error is not None:
            record["error"] = describe_error(error)
            match = _EXIT_CODE.search(str(error))
            if match:
                record["status"] = int(match.group(1))
            elif action.action == "fail" and "unexpectedly succeeded" in str(error):
                record["status"] = 0
        elif (  # execute, systemctl, start_job...: (status, output)
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[0], int)
            and isinstance(result[1], str)
        ):
            record["status"] = result[0]
            self._output(record, result[1])
        elif action.action == "succeed":
            record["status"] = 0
            self._output(record, result)
        elif isinstance(result, str):
            self._output(record, result)
        elif action.action == "screenshot" and result is not None:
            path = getattr(result, "path", None)
            if path is not None:
                record["file"] = str(path)
        return record

    def _output(self, record: dict[str, Any], output: object) -> None:
        if not isinstance(output, str):
            return
        record["output_size"] = len(output.encode(errors="replace"))
        if self.outputs:
            record["output"] = output
