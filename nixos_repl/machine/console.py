"""Serial console capture: a per-machine log file, recent lines in memory, and waiters.

nixpkgs keeps one shared queue that ``wait_for_console_text`` consumes, so two waiters steal each
other's lines. Here every waiter searches on its own and nothing is consumed. Like nixpkgs, a wait
can match text that arrived before the call, but only text after the line the previous
successful wait matched.

Cost stays proportional to what arrives: a pending wait searches only the new lines, together
with the ``CONTEXT_LINES`` lines before them (so a pattern can match across up to that many
lines: lines are joined with ``\\n``). Memory is bounded: the last ``MEMORY_LINES`` lines are
kept; the log file in the state directory keeps them all, and ``text()`` reads it from there.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["CONTEXT_LINES", "MEMORY_LINES", "Console", "stdin_reader"]

CONTEXT_LINES = 50
MEMORY_LINES = 10_000


@dataclass(eq=False)
class _Waiter:
    pattern: re.Pattern[str]
    cursor: int  # absolute number of the first line it may match
    found: asyncio.Future[str]


class Console:
    """Lines of one machine's serial console since its last start."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}.serial")
        self._lines: collections.deque[str] = collections.deque(maxlen=MEMORY_LINES)
        self._count = 0  # lines since the last reset; the deque holds the last of them
        self._partial = b""
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._offset = 0  # where this boot's lines start in the log file
        self._waiters: set[_Waiter] = set()
        # Where the next wait_for_console_text starts: just after the last matched line.
        self._matched_upto = 0

    def reset(self, log_path: Path | None) -> None:
        """Forget everything (a new boot), and write new lines to ``log_path``."""
        self.close()
        self._lines.clear()
        self._count = 0
        self._partial = b""
        self._matched_upto = 0
        self._path = log_path
        if log_path is not None:
            self._file = open(log_path, "a", encoding="utf-8", errors="replace")
            self._offset = self._file.tell()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def line_count(self) -> int:
        """How many lines arrived since the last start."""
        return self._count

    def feed(self, data: bytes) -> None:
        """Add raw bytes from QEMU's stdout; empty ``data`` means EOF (flushes a partial line)."""
        chunk = self._partial + data
        *complete, self._partial = chunk.split(b"\n")
        if not data and self._partial:
            complete.append(self._partial)
            self._partial = b""
        if not complete:
            return
        first_new = self._count
        for raw in complete:
            line = raw.decode(errors="replace").replace("\r", "").rstrip()
            self._lines.append(line)
            self._count += 1
            self.log.debug("%s # %s", self.name, line)
            if self._file is not None:
                self._file.write(line + "\n")
        if self._file is not None:
            self._file.flush()
        for waiter in list(self._waiters):
            self._search(waiter, max(waiter.cursor, first_new - CONTEXT_LINES))

    def note(self, text: str) -> None:
        """A line of the driver's own in the console log (``restored snapshot L``)."""
        self._lines.append(text)
        self._count += 1
        self.log.debug("%s # %s", self.name, text)
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()

    def _window(self, start: int) -> tuple[int, str]:
        """The lines from absolute number ``start`` (or the oldest kept), joined."""
        oldest = self._count - len(self._lines)
        start = max(start, oldest)
        # deque indexing is cheap near its ends, where a pending wait's window is
        lines = (self._lines[i] for i in range(start - oldest, len(self._lines)))
        return start, "\n".join(lines)

    def _search(self, waiter: _Waiter, start: int) -> None:
        if waiter.found.done():
            self._waiters.discard(waiter)
            return
        start, text = self._window(start)
        match = waiter.pattern.search(text)
        if match is None:
            return
        upto = start + text.count("\n", 0, match.end()) + 1
        self._matched_upto = max(self._matched_upto, upto)
        self._waiters.discard(waiter)
        waiter.found.set_result(match.group(0))

    def text(self) -> str:
        """Everything since the last start (read back from the log file when there is one)."""
        if self._path is None:
            return "\n".join(self._lines)
        with open(self._path, encoding="utf-8", errors="replace") as f:
            f.seek(self._offset)
            return f.read().removesuffix("\n")

    def tail(self, n: int = 20) -> list[str]:
        n = min(max(n, 0), len(self._lines))
        return [self._lines[i] for i in range(len(self._lines) - n, len(self._lines))]

    async def wait_for(self, regex: str) -> str:
        """Wait until ``regex`` matches the lines from the cursor; returns the match. Cancel to
        stop."""
        waiter = _Waiter(
            re.compile(regex), self._matched_upto, asyncio.get_running_loop().create_future()
        )
        self._waiters.add(waiter)
        self._search(waiter, waiter.cursor)
        try:
            return await waiter.found
        finally:
            self._waiters.discard(waiter)


def stdin_reader() -> Callable[[], tuple[str, bool]]:
    """A reader of what is typed on stdin: returns (text, at EOF), as soon as input arrives."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text-only stdin (an embedding front end)

        def read_text() -> tuple[str, bool]:
            text = sys.stdin.read(1)
            return text, not text

        return read_text
    read1 = getattr(buffer, "read1", None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read_bytes() -> tuple[str, bool]:
        data = read1(4096) if read1 is not None else buffer.read(1)
        return decoder.decode(data, final=not data), not data

    return read_bytes
