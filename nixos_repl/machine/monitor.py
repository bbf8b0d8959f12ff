"""The QEMU human monitor (HMP) on the driver-side ``monitor`` socket, as nixpkgs uses it."""

from __future__ import annotations

import asyncio
import socket

from ..errors import MachineError

__all__ = ["Monitor", "hmp_output", "tcp_port"]

PROMPT = b"(qemu) "


class Monitor:
    """Sends HMP commands and returns their raw text up to the next ``(qemu) `` prompt."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self._sock = sock
        self._lock = asyncio.Lock()

    async def _read_prompt(self) -> str:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while not buf.endswith(PROMPT):
            data = await loop.sock_recv(self._sock, 65536)
            if not data:
                raise MachineError(f"{self.name}: the QEMU monitor connection closed")
            buf += data
        return buf.decode(errors="replace")

    async def greeting(self) -> str:
        async with self._lock:
            return await self._read_prompt()

    async def command(self, command: str) -> str:
        """nixpkgs' ``send_monitor_command``: the echoed command and its output, prompt included."""
        async with self._lock:
            try:
                await asyncio.get_running_loop().sock_sendall(self._sock, (command + "\n").encode())
            except OSError as e:
                raise MachineError(f"{self.name}: the QEMU monitor connection closed ({e})") from e
            return await self._read_prompt()

    def close(self) -> None:
        self._sock.close()


def hmp_output(reply: str) -> str:
    """What an HMP command printed: the reply without the echoed command line and the prompt."""
    _, _, rest = reply.partition("\r\n")
    return rest.removesuffix(PROMPT.decode()).strip()


def tcp_port(value: int, what: str) -> int:
    """``value`` if it is a TCP port number; a ValueError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{what} must be a TCP port number (1-65535), not {value!r}")
    return value
