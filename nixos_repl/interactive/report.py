"""Errors shown to a person: the user's own frames, then what the machine said.

A failing command raises ``RequestedAssertionFailed`` (``command `...` failed (exit code N)``)
deep inside the machine layer. At the prompt the interesting parts are the cell line that ran it,
which machine, the command's output and the machine's last console lines; not the frames of
nixos-repl, IPython or asyncio in between. :func:`make_handler` builds the IPython custom
exception handler that shows exactly that. The kernel and the REPL keep running.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any

import IPython

from ..errors import MachineError, NixosReplError, PollingConditionError, QMPAPIError
from ..errors import RequestedAssertionFailed as RequestedAssertionFailed
from .live import clean

__all__ = ["HANDLED", "make_handler", "user_traceback"]

# What the handler formats; anything else keeps IPython's own traceback.
HANDLED: tuple[type[BaseException], ...] = (
    NixosReplError,
    RequestedAssertionFailed,
    PollingConditionError,
    QMPAPIError,
    KeyboardInterrupt,
)
CONSOLE_TAIL = 8

# nixos_repl's own directory (this file's parent's), IPython's and the standard library's.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep
    for f in (os.path.dirname(__file__), IPython.__file__, os.__file__)
)


def _internal(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_INTERNAL)


def user_traceback(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the frames of nixos-repl, IPython and the standard library."""
    kept = []
    while tb is not None:
        if not _internal(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    for this, following in zip(kept, [*kept[1:], None], strict=True):
        this.tb_next = following
    return kept[0] if kept else None


def _magic_only(tb: TracebackType | None) -> bool:
    """Whether the user's frames are one cell line that is a magic (``%succeed vm1 x``)."""
    if tb is None or tb.tb_next is not None:
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return line.strip().startswith(
        ("get_ipython().run_line_magic(", "get_ipython().run_cell_magic(")
    )


def make_handler(
    details: Callable[[BaseException], list[str]],
    before: Callable[[], None] = lambda: None,
) -> Callable[..., list[str]]:
    """An IPython ``set_custom_exc`` handler: the user's frames, the error, then ``details``.

    ``before`` runs first (the front end removes its status line).
    """

    def handler(
        shell: Any,
        etype: type[BaseException],
        value: BaseException,
        tb: TracebackType | None,
        tb_offset: int | None = None,
    ) -> list[str]:
        before()
        user = user_traceback(tb)
        if isinstance(value, KeyboardInterrupt):
            stb = ["KeyboardInterrupt: stopped; the machines keep running"]
        elif _magic_only(user):  # the cell's line is the magic itself: just what went wrong
            stb = [f"{etype.__name__}: {value}", *details(value)]
        else:
            stb = shell.InteractiveTB.structured_traceback(etype, value, user, tb_offset=tb_offset)
            stb = [*stb, *details(value)]
        # Shown the way IPython shows any traceback (a Jupyter kernel sends an error message).
        shell._showtraceback(etype, value, stb)
        return stb

    return handler


def machine_details(
    value: BaseException,
    machine: str | None,
    output: str | None,
    console_tail: list[str],
) -> list[str]:
    """Lines after a machine error: the machine, its last command output, its console."""
    if machine is None:
        return []
    lines = [f"machine: {machine}"]
    if isinstance(value, RequestedAssertionFailed) and output:
        text = output.rstrip("\n")
        lines.append("output:\n" + "\n".join(f"  {line}" for line in text.splitlines()))
    crashed = isinstance(value, MachineError) and "console" in str(value).lower()
    tail = [clean(line) for line in console_tail if clean(line).strip()][-CONSOLE_TAIL:]
    if tail and not crashed:
        shown = "\n".join(f"  {line}" for line in tail)
        lines.append(f"console (last {len(tail)} lines):\n{shown}")
    return lines
