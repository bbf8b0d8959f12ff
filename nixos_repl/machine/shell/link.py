"""What both framings share: the backdoor connection (hvc0) read as lines, and a command."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from ...errors import MachineError

__all__ = ["BANNER", "NONCE_BYTES", "Backdoor", "Command", "Framing", "abbreviate"]

BANNER = b"Spawning backdoor root shell..."
NONCE_BYTES: Final = 8  # 16 hex digits
# Commands longer than this are quoted in messages by their start and their size.
QUOTE_LIMIT = 200


def abbreviate(command: str, limit: int = QUOTE_LIMIT) -> str:
    """``command`` for a message: as it is when short, else its start and its size."""
    if len(command) <= limit:
        return command
    return f"{command[:limit]}... ({len(command.encode())} bytes)"


@dataclass
class Command:
    text: str
    nonce: str = ""
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None  # once its E marker arrived
    held: bool = False  # something it started still holds its stdout
    sent: bool = True  # its text has gone whole (long texts go after the guest's go-ahead)
    received: bool = True  # the guest has read all of its text
    clean: bool = False  # it ended with nothing else holding the out port


class Framing(Protocol):
    """How commands travel: what ``ShellChannel`` asks of the fast framing and of nixpkgs'.

    The channel holds its lock around ``settle``, ``submit`` and ``finish`` of one command.
    """

    @property
    def fast(self) -> bool:
        """Whether this is nixos-repl's fast framing."""
        ...

    async def settle(self) -> None:
        """Finish what an earlier, interrupted command left half-way, before the next one."""

    async def submit(self, cmd: Command, timeout: float | None) -> None:
        """Send ``cmd`` under a fresh nonce, whole."""

    async def finish(self, cmd: Command, timeout: float | None) -> tuple[int, bytes]:
        """``cmd``'s status and output (status 124 at ``timeout``); a cancellation leaves the
        channel in sync."""
        ...

    def rewound(self) -> None:
        """The guest was rewound to a snapshot: forget what the abandoned timeline left."""


class Backdoor:
    """The backdoor shell's socket (hvc0): drained as soon as bytes arrive, read as lines.

    The socket is read whenever it is readable, whatever the framing waits for: on a console
    port QEMU drops what the host does not take in time. ``check`` runs at every wake-up of a
    reader and may raise (the backdoor died, the guest rebooted).
    """

    def __init__(self, name: str, sock: socket.socket, check: Callable[[], None]) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.current: Command | None = None  # the command whose replies are awaited
        self.token: bytes | None = None  # a line to watch for (see ``token_seen``)
        self.token_seen = False
        self._tail = b""
        self._check = check
        self._readable = asyncio.Event()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.buf += data
                if self.token is not None:  # over the new bytes only
                    window = self._tail + data
                    self.token_seen = self.token_seen or self.token in window
                    self._tail = window[1 - len(self.token) :]
            self.eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.eof = True
        if self.eof:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self._readable.set()

    def wake(self) -> None:
        """Let a waiting reader run its checks again."""
        self._readable.set()

    async def send(self, data: bytes, sock: socket.socket | None = None) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(sock or self.sock, data)
        except OSError as e:
            raise MachineError(f"{self.name}: the backdoor shell connection is closed ({e})") from e

    async def read_marker(self, marker: bytes) -> tuple[bytes, bytes]:
        """Wait for ``marker`` and the end of its line.

        Returns what came before the marker and the rest of the marker's line, and consumes both
        (the newline too).
        """
        _, before, rest = await self.read_first((marker,))
        return before, rest

    async def read_first(self, markers: tuple[bytes, ...]) -> tuple[int, bytes, bytes]:
        """``read_marker`` for whichever of ``markers`` comes first; returns its index too.

        Every byte is scanned once, whatever the size of the line and the number of wake-ups:
        the marker search resumes where it stopped, and so does the newline search after it.
        """
        scanned = 0  # no marker starts before this
        found: tuple[int, int] | None = None  # (position, index) of the first marker
        newline_from = 0
        longest = max(len(m) for m in markers)
        while True:
            if found is None:
                hits = [
                    (at, i) for i, m in enumerate(markers) if (at := self.buf.find(m, scanned)) >= 0
                ]
                if hits:
                    found = min(hits)
                    newline_from = found[0] + len(markers[found[1]])
                else:
                    scanned = max(0, len(self.buf) - longest + 1)
            if found is not None:
                end = self.buf.find(b"\n", newline_from)
                if end >= 0:
                    at, i = found
                    before = bytes(self.buf[:at])
                    rest = bytes(self.buf[at + len(markers[i]) : end])
                    del self.buf[: end + 1]
                    return i, before, rest
                newline_from = len(self.buf)
            self._check()
            if self.eof:
                raise MachineError(
                    f"{self.name}: the backdoor shell disconnected (did the machine power off?)"
                )
            self._readable.clear()
            await self._readable.wait()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
        self.eof = True
        self._readable.set()
