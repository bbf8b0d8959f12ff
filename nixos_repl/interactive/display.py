"""Values the front ends show: each renders itself (``_repr_pretty_``, ``_repr_html_``, PNG).

IPython picks the richest form a front end supports: Jupyter shows the HTML table and the PNG,
the terminal the text. Nothing here prints; the magics return these values and the shell's
display machinery does the rest.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ..machine.screenshot import PNG_SIGNATURE, Screenshot

if TYPE_CHECKING:
    from pathlib import Path

    from ..machine import BaseMachine

__all__ = [
    "PNG_SIGNATURE",
    "Execution",
    "MachineRow",
    "MachineTable",
    "Output",
    "Screenshot",
    "StatusLine",
    "format_duration",
]


def format_duration(seconds: float | None) -> str:
    """``4.2 s``, ``3 min 05 s``, ``2 h 01 min``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Output(str):
    """A command's standard output: a ``str`` that shows as the text itself, not its repr."""

    __slots__ = ()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.removesuffix("\n"))


class Execution(NamedTuple):
    """What ``execute`` returns, ``(status, output)``, shown as the output and its status."""

    status: int
    output: str

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        text = self.output.removesuffix("\n")
        p.text(f"{text}\n[exit status {self.status}]" if text else f"[exit status {self.status}]")


@dataclass(frozen=True)
class MachineRow:
    name: str
    kind: str  # vm or container
    state: str
    uptime: float | None
    pid: int | None
    console: str

    @classmethod
    def of(cls, machine: BaseMachine) -> MachineRow:
        tail = machine.console.tail(1)
        return cls(
            machine.name,
            machine.lifecycle.kind.lower(),
            str(machine.state),
            machine.uptime(),
            machine.pid,
            tail[0] if tail else "",
        )


_HEADERS = ("machine", "kind", "state", "uptime", "pid", "last console line")
_CONSOLE_WIDTH = 60


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


class MachineTable:
    """The machines at one moment: name, kind (vm, container), state, uptime, pid and last
    console line (a container's: its journal's)."""

    def __init__(self, rows: Sequence[MachineRow], out_dir: Path | None = None) -> None:
        self.rows = list(rows)
        self.out_dir = out_dir

    @classmethod
    def of(cls, machines: Iterable[BaseMachine], out_dir: Path | None = None) -> MachineTable:
        return cls([MachineRow.of(m) for m in machines], out_dir)

    def footer(self) -> str:
        """Where the session's files go: ``output: DIR (screenshots, session log)``."""
        if self.out_dir is None:
            return ""
        return f"output: {self.out_dir} (screenshots, session log)"

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (
                r.name,
                r.kind,
                r.state,
                format_duration(r.uptime),
                str(r.pid) if r.pid is not None else "-",
                _clip(r.console, _CONSOLE_WIDTH),
            )
            for r in self.rows
        ]

    def text(self) -> str:
        return "\n".join(t for t in (self._table(), self.footer()) if t)

    def _table(self) -> str:
        if not self.rows:
            return "no machines (define one with %machines add NAME START_SCRIPT)"
        cells = [_HEADERS, *self._cells()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(_HEADERS) - 1)]
        lines = []
        for row in cells:
            head = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))
            lines.append(f"{head}  {row[-1]}".rstrip())
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def _repr_html_(self) -> str:
        footer = f"<p>{html.escape(self.footer())}</p>" if self.footer() else ""
        if not self.rows:
            return f"<p>{html.escape(self._table())}</p>{footer}"
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADERS)
        body = "".join(
            "<tr>"
            + "".join(
                f'<td style="text-align:left"><code>{html.escape(c)}</code></td>'
                if i == len(cells) - 1
                else f'<td style="text-align:left">{html.escape(c)}</td>'
                for i, c in enumerate(cells)
            )
            + "</tr>"
            for cells in self._cells()
        )
        return f'<table class="nixos-repl-machines"><tr>{head}</tr>{body}</table>{footer}'

    def __repr__(self) -> str:
        return self.text()


class StatusLine:
    """A live status line: what each busy machine waits for, for how long, its last console
    line. Empty when nothing waits (an update to an empty line makes it disappear)."""

    def __init__(self, text: str = "") -> None:
        self.text = text

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        if not self.text:
            return {"text/plain": "", "text/html": ""}
        return {
            "text/plain": self.text,
            "text/html": '<pre class="nixos-repl-status" style="margin:0;opacity:0.7">'
            f"{html.escape(self.text)}</pre>",
        }

    def __repr__(self) -> str:
        return self.text


@dataclass
class Step:
    """One machine's long step in progress (a nested log step of the machine layer)."""

    machine: str
    text: str
    started: float

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started
