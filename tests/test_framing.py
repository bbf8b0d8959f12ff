"""The fast shell framing over socket pairs: the test plays the guest, no VM needed.

What is checked is the host's side of the protocol: nonces on hvc0 and on the out port, stray
lines and bytes, replies cut anywhere, interrupts, long commands, and the backdoor's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pytest

from nixos_repl.errors import MachineError
from nixos_repl.loop import run_sync
from nixos_repl.machine.shell import OUT_MARK, OutDemux, ShellChannel
from nixos_repl.machine.shell import fast as fast_framing


def mark(nonce: str) -> bytes:
    return OUT_MARK + nonce.encode() + b"\n"


NONCE_A, NONCE_B = "a" * 16, "b" * 16


# -- the out stream demultiplexer -------------------------------------------------------------


def test_demux_gives_each_command_its_segment() -> None:
    stream = b"stale" + mark(NONCE_A) + b"out-a" + mark(NONCE_B) + b"out-b\n"
    for cut in range(len(stream) + 1):  # cut anywhere, marks included
        demux = OutDemux()
        segments = demux.feed(stream[:cut]) + demux.feed(stream[cut:])
        joined: dict[str | None, bytes] = {}
        for owner, data in segments:
            joined[owner] = joined.get(owner, b"") + data
        assert joined == {None: b"stale", NONCE_A: b"out-a", NONCE_B: b"out-b\n"}, cut


def test_demux_releases_a_held_back_tail_that_is_no_mark() -> None:
    demux = OutDemux()
    assert demux.feed(mark(NONCE_A) + b"x\x00nix") == [(NONCE_A, b"x")]
    assert demux.feed(b"os") == []  # still the start of a mark
    assert demux.feed(b"!") == [(NONCE_A, b"\x00nixos!")]
    assert demux.feed(b"\x00") == []
    assert demux.feed(b"y") == [(NONCE_A, b"\x00y")]


# -- a channel against a scripted guest --------------------------------------------------------


@dataclass
class Guest:
    """The guest ends of the three sockets, and what the host wrote on ctl."""

    shell: socket.socket
    out: socket.socket
    ctl: socket.socket

    async def line(self) -> str:
        """The next line the host sent to the backdoor shell."""
        loop = asyncio.get_running_loop()
        data = b""
        while not data.endswith(b"\n"):
            data += await loop.sock_recv(self.shell, 1)
        return data.decode()

    async def command(self) -> tuple[str, str]:
        """The next ``__nr_run NONCE 'text'``: (nonce, text)."""
        words = shlex.split(await self.line())
        assert words[0] in ("__nr_run", "__nr_q"), words
        return words[1], words[2]

    async def say(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.shell, data)

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.out, data)

    async def ctl_line(self) -> str:
        loop = asyncio.get_running_loop()
        data = b""
        while not data.endswith(b"\n"):
            data += await loop.sock_recv(self.ctl, 1)
        return data.decode()


@contextlib.asynccontextmanager
async def channel() -> AsyncIterator[tuple[ShellChannel, Guest]]:
    pairs = [socket.socketpair() for _ in range(3)]
    for host, guest in pairs:
        host.setblocking(False)
        guest.setblocking(False)

    async def port_open() -> bool:
        return False

    chan = ShellChannel("fake", pairs[0][0], pairs[1][0], pairs[2][0], port_open)
    chan.fast = True
    try:
        yield chan, Guest(pairs[0][1], pairs[1][1], pairs[2][1])
    finally:
        chan.close()
        for _, guest in pairs:
            guest.close()


def run(scenario: Callable[[ShellChannel, Guest], Awaitable[None]]) -> None:
    async def main() -> None:
        async with channel() as (chan, guest):
            await asyncio.wait_for(scenario(chan, guest), 20)

    run_sync(main())


def test_a_reply_and_its_output() -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        task = asyncio.ensure_future(chan.execute("echo hi"))
        nonce, text = await guest.command()
        assert text == "echo hi"
        await guest.write(mark(nonce) + b"hi\n")
        await guest.say(b"noise on the console\nE" + b"0" * 16 + b" 0 0\n")  # not its nonce
        for piece in (b"E", nonce.encode()[:5], nonce.encode()[5:] + b" 0", b" 0\n"):
            await guest.say(piece)
            await asyncio.sleep(0.01)
        assert await task == (0, b"hi\n")

    run(scenario)


def test_late_output_of_a_timed_out_command_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_framing, "KILL_GRACE", 0.5)

    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        # The guest is "frozen": the first command gets no reply within its timeout.
        first = asyncio.ensure_future(chan.execute("sleep 1; echo STALE", timeout=0.2))
        stale, _ = await guest.command()
        assert await first == (124, b"")
        assert (await guest.ctl_line()) == f"K {stale}\n"
        second = asyncio.ensure_future(chan.execute("echo mine"))
        # The guest thaws: the stale command's output and reply come first.
        await guest.write(mark(stale) + b"STALE\n")
        await guest.say(f"E{stale} 0 0\n".encode())
        nonce, _ = await guest.command()
        await guest.write(mark(nonce) + b"mine\n")
        await guest.say(f"E{nonce} 0 0\n".encode())
        assert await second == (0, b"mine\n")

    run(scenario)


def test_cancelling_kills_the_command_and_waits_for_its_reply() -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        task = asyncio.ensure_future(chan.execute("sleep 100"))
        nonce, _ = await guest.command()
        await guest.write(mark(nonce) + b"partial ")
        task.cancel()
        assert (await guest.ctl_line()) == f"K {nonce}\n"
        await guest.say(f"E{nonce} 137 0\n".encode())
        with pytest.raises(asyncio.CancelledError):
            await task
        after = asyncio.ensure_future(chan.execute("echo next"))
        nonce, _ = await guest.command()
        await guest.write(mark(nonce) + b"next\n")
        await guest.say(f"E{nonce} 0 0\n".encode())
        assert await after == (0, b"next\n")

    run(scenario)


def test_a_long_command_goes_over_the_out_port() -> None:
    text = "echo " + "x" * 100_000

    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        task = asyncio.ensure_future(chan.execute(text))
        match = re.fullmatch(r"__nr_big (\w+) (\d+)\n", await guest.line())
        assert match is not None, "long text does not go through hvc0"
        nonce, length = match.group(1), int(match.group(2))
        await guest.say(f"G{nonce}\n".encode())
        loop = asyncio.get_running_loop()
        received = b""
        while len(received) < length:
            received += await loop.sock_recv(guest.out, length - len(received))
        assert received == text.encode() + nonce.encode()
        await guest.say(f"T{nonce}\n".encode())
        await guest.write(mark(nonce) + b"done\n")
        await guest.say(f"E{nonce} 0 0\n".encode())
        assert await task == (0, b"done\n")

    run(scenario)


def test_a_dead_backdoor_fails_every_command_at_once() -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        task = asyncio.ensure_future(chan.execute("kill -9 $$", timeout=600))
        await guest.command()
        await guest.say(chan._death)
        with pytest.raises(MachineError, match="backdoor shell in the guest died"):
            await task
        with pytest.raises(MachineError, match="backdoor shell in the guest died"):
            await chan.execute("true")
        chan.new_boot()  # a reboot brings a new backdoor
        assert not chan.dead

    run(scenario)


# -- the hvc0 reader and nixpkgs' framing ----------------------------------------------------


class CountingBuffer(bytearray):
    """A bytearray that counts the bytes its ``find`` calls look at."""

    scanned = 0

    def find(self, sub: Any, start: Any = 0, *args: Any) -> int:
        self.scanned += len(self) - (start or 0)
        return super().find(sub, start, *args)


def test_a_long_line_arriving_in_pieces_is_scanned_once() -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        buf = chan.backdoor.buf = CountingBuffer()
        reading = asyncio.ensure_future(chan.backdoor.read_marker(b""))
        piece = b"x" * 10_000
        for _ in range(200):
            await guest.say(piece)
            await asyncio.sleep(0.001)  # every piece wakes the reader
        await guest.say(b"\n")
        _, line = await reading
        assert len(line) == 200 * len(piece)
        assert buf.scanned < 3 * len(line), "no rescan of the line at every wake-up"

    run(scenario)


def nixpkgs_reply(
    reply: bytes,
) -> Callable[[ShellChannel, Guest], Coroutine[Any, Any, tuple[int, bytes]]]:
    """A scenario: ``echo hi; echo hi`` over nixpkgs' framing, answered with ``reply``."""

    async def scenario(chan: ShellChannel, guest: Guest) -> tuple[int, bytes]:
        chan.fast = False
        task = asyncio.ensure_future(chan.execute("echo hi; echo hi"))
        match = re.match(r"printf 'S%s\\n' (\w+);", await guest.line())
        assert match is not None
        nonce = match.group(1).encode()
        await guest.say(b"S" + nonce + b"\n" + reply + b"\nE" + nonce + b" 0\n")
        return await task

    return scenario


def test_nixpkgs_framing_returns_whole_output() -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        assert await nixpkgs_reply(b"aGkKaGkK 8")(chan, guest) == (0, b"hi\nhi\n")

    run(scenario)


@pytest.mark.parametrize(
    "reply",
    [
        b"aGkK 8",  # a whole buffer lost: what is left is valid base64, but short
        b"aGkKaGkK",  # the count lost
        b"aGk=aGkK 8",
        b"aGkK= 5",
        b"aGkKaGk 7",
        b"aGk\x00aGkK 8",
    ],
)
def test_nixpkgs_framing_refuses_output_that_is_not_whole(reply: bytes) -> None:
    async def scenario(chan: ShellChannel, guest: Guest) -> None:
        with pytest.raises(MachineError, match="arrived incomplete"):
            await nixpkgs_reply(reply)(chan, guest)

    run(scenario)


def test_the_guest_side_setup_passes_shellcheck() -> None:
    script = resources.files(fast_framing.__package__).joinpath("setup.sh")
    with resources.as_file(script) as path:
        result = subprocess.run(
            ["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True
        )
    assert result.returncode == 0, result.stdout
    assert b"@NONCE@" not in fast_framing.setup_script("n" * 16, "t" * 16)
