"""Serial console capture: a per-machine log file, the lines since start, and waiters with cursors.

nixpkgs keeps one shared queue that ``wait_for_console_text`` consumes, so two waiters steal each
other's lines, and it concatenates lines without separators. Here every line stays in a list; a
waiter searches from its own cursor, so nothing is stolen. Like nixpkgs, a wait can match text that
arrived before the call, but only text after what the previous successful wait matched.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import IO

__all__ = ["Console"]


class Console:
    """Lines of one machine's serial console since its last start."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}.serial")
        self.lines: list[str] = []
        self._partial = b""
        self._changed = asyncio.Condition()
        self._file: IO[str] | None = None
        # Where the next wait_for_console_text starts: just after the last matched line.
        self._matched_upto = 0

    def reset(self, log_path: Path | None) -> None:
        """Forget everything (a new boot), and write new lines to ``log_path``."""
        self.close()
        self.lines = []
        self._partial = b""
        self._matched_upto = 0
        if log_path is not None:
            self._file = open(log_path, "a", encoding="utf-8", errors="replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def feed(self, data: bytes) -> None:
        """Add raw bytes from QEMU's stdout; empty ``data`` means EOF (flushes a partial line)."""
        chunk = self._partial + data
        *complete, self._partial = chunk.split(b"\n")
        if not data and self._partial:
            complete.append(self._partial)
            self._partial = b""
        if not complete:
            return
        for raw in complete:
            line = raw.decode(errors="replace").replace("\r", "").rstrip()
            self.lines.append(line)
            self.log.debug("%s # %s", self.name, line)
            if self._file is not None:
                self._file.write(line + "\n")
        if self._file is not None:
            self._file.flush()
        async with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 20) -> list[str]:
        return self.lines[-n:]

    async def wait_for(self, regex: str, start: int | None = None) -> str:
        """Wait until ``regex`` matches the lines from the waiter's cursor; returns the match.

        Lines are joined with newlines (so ``^``/``$`` work with ``re.M``). Cancel to stop.
        """
        pattern = re.compile(regex)
        cursor = self._matched_upto if start is None else start
        async with self._changed:
            while True:
                window = self.lines[cursor:]
                text = "\n".join(window)
                match = pattern.search(text)
                if match:
                    upto = cursor + text.count("\n", 0, match.end()) + 1
                    self._matched_upto = max(self._matched_upto, upto)
                    return match.group(0)
                await self._changed.wait()
