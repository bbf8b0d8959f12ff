"""nixos-repl's fast framing, over two extra virtio-serial ports the driver adds.

It is used when the guest sees those ports (``org.nixos-repl.out`` and ``org.nixos-repl.ctl``).
After the banner one setup script (``setup.sh``) defines a few functions and starts a small
reader; then, per command:

* the command runs in a forked subshell, ``( set -euo pipefail; eval '<cmd>' ) &``, which the
  backdoor waits for: one fork, no ``bash -c``, no ``base64``, no guest-side ``timeout``. A
  signal the command sends to the backdoor shell (``kill $$``) is passed on to the command, so
  it ends the command (status 143), as it ends ``bash -c`` in nixpkgs. Its stdin is /dev/null;
  its stdout is the out port, which the backdoor shell opened beforehand;
* before the command's first byte, the backdoor writes ``\\0nixos-repl:<nonce>\\n`` on the out
  port. The host gives a command only the bytes after its own marker, so nothing an earlier,
  abandoned command wrote can reach a later one, whatever the timing. After a command that
  ended cleanly (nothing else held the port, no interrupt, no timeout) nothing stale can come,
  so the host sends ``__nr_q`` instead of ``__nr_run`` and the mark is left out: a port write
  costs about half a millisecond of guest CPU under TCG;
* a virtio-serial port can be open only once at a time. When the subshell has exited, the shell
  closes its own copy and opens the port again for the next command: if that fails, a process the
  command started still holds its stdout. That check costs two virtio control messages, so it is
  skipped when the kernel's last allocated pid (``/proc/sys/kernel/ns_last_pid``) is exactly one
  more than after the previous command: then the subshell was the only process created, and
  nothing else can hold the port. The reply on hvc0 is ``E<nonce> <status> <held>``; anything
  else there is skipped;
* while ``held``, the host waits for stdout to close, as nixpkgs does (base64 waits for EOF),
  asking QEMU whether the port is still open (``query-chardev``; the VSERPORT_CHANGE event is
  rate-limited to one a second, so it cannot mark the end of each command), and says why it
  waits after a grace period;
* to interrupt, or at a host-side deadline, the host writes ``K <nonce>`` on the ctl port: if
  that command is still the current one (the backdoor notes its nonce in a file on tmpfs), the
  reader kills the command's whole process tree (the backdoor's child), whatever it did with its
  output (``exec sleep 20 > /dev/null``), and every process holding the out port, with their
  descendants; the nonce is checked again once the pids are gathered. A ``K`` that arrives
  late (a guest frozen for a while) cannot hit a later command;
* long command text does not go through hvc0, which bash reads a byte at a time: the host sends
  ``__nr_big <nonce> <length>``, the guest answers ``G<nonce>``, reads ``<text><nonce>`` from
  the out port with ``head -c``, answers ``T<nonce>`` and runs it; a text that does not arrive
  whole is refused, never run. The host never interrupts that read, so no part of a text can
  stay behind in the port;
* a watcher started by the setup holds a pipe from the backdoor shell; when the shell dies (for
  instance of ``kill -9 $$``) it prints ``D<token>`` on hvc0, and every command fails at once
  with a MachineError instead of waiting out its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shlex
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Final

from ...errors import MachineError
from .link import NONCE_BYTES, Backdoor, Command, abbreviate

__all__ = ["OUT_CHARDEV", "OUT_MARK", "FastFraming", "OutDemux", "setup_script"]

# After this long with the command finished but its stdout still held open, say why we wait.
STDOUT_GRACE = 5.0
# How long an interrupted or timed-out command may take to die before the channel gives up on it.
KILL_GRACE = 2.0
OUT_CHARDEV = "nixos-repl-out"
# Command text longer than this goes over the out port instead of hvc0.
BIG_COMMAND = 2048
# What the backdoor writes on the out port before a command's output.
OUT_MARK: Final = b"\x00nixos-repl:"


def setup_script(nonce: str, token: str) -> bytes:
    """The setup (``setup.sh``) that switches a backdoor shell to this framing.

    It answers ``R<nonce> <out port> <ctl port>`` (``none`` for a port the guest lacks); a watcher
    prints ``D<token>`` on hvc0 when the backdoor shell dies.
    """
    script = resources.files(__package__).joinpath("setup.sh").read_text()
    return script.replace("@NONCE@", nonce).replace("@TOKEN@", token).encode()


class OutDemux:
    """Splits the out port's byte stream into the segments of each command.

    Every command's output starts with ``OUT_MARK + nonce + b"\\n"``; ``feed`` returns the
    bytes it can attribute, as ``(nonce, data)`` pairs (``nonce`` is None before the first
    mark). A mark cut between two chunks is held back until it is whole.
    """

    MARK_LEN: Final = len(OUT_MARK) + 2 * NONCE_BYTES + 1

    def __init__(self) -> None:
        self.owner: str | None = None
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[str | None, bytes]]:
        buf = self._pending + data
        segments: list[tuple[str | None, bytes]] = []
        start = 0
        while (at := buf.find(OUT_MARK, start)) >= 0:
            end = at + self.MARK_LEN
            if end > len(buf):  # the mark is not whole yet
                break
            if at > start:
                segments.append((self.owner, buf[start:at]))
            self.owner = buf[at + len(OUT_MARK) : end - 1].decode("ascii", "replace")
            start = end
        else:
            at = len(buf)
            # Hold back a tail that could be the beginning of a mark.
            for keep in range(min(len(OUT_MARK) - 1, len(buf) - start), 0, -1):
                if OUT_MARK.startswith(buf[len(buf) - keep :]):
                    at = len(buf) - keep
                    break
        if at > start:
            segments.append((self.owner, buf[start:at]))
        self._pending = buf[at:]
        return segments

    def flush(self) -> bytes:
        """The held-back tail: no mark can follow it any more (its command has ended)."""
        pending, self._pending = self._pending, b""
        return pending

    def start(self, owner: str) -> None:
        """Attribute what comes next to ``owner`` without a mark (nothing stale can come)."""
        self._pending = b""
        self.owner = owner


class FastFraming:
    """Commands over the fast framing (see the module's documentation).

    ``port_open`` is an async callable asking QEMU whether the guest holds the out port open.
    """

    fast = True

    def __init__(
        self,
        name: str,
        backdoor: Backdoor,
        out: socket.socket,
        ctl: socket.socket | None,
        port_open: Callable[[], Awaitable[bool]] | None,
    ) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.backdoor = backdoor
        self._out = out
        self._ctl = ctl
        self._port_open = port_open
        # Nothing but the backdoor holds the out port and nothing stale is in flight: the next
        # command's output needs no mark.
        self._clean = True
        self._demux = OutDemux()
        self._unsent: Command | None = None  # a long text the guest is still waiting for
        asyncio.get_running_loop().add_reader(out.fileno(), self._on_out)

    @property
    def _cmd(self) -> Command | None:
        return self.backdoor.current

    @_cmd.setter
    def _cmd(self, cmd: Command | None) -> None:
        self.backdoor.current = cmd

    def rewound(self) -> None:
        # Mark the next command's output: nothing stale may pass for it.
        self._demux = OutDemux()
        self._clean = False
        self._unsent = None

    def _note_stray(self, data: bytes) -> None:
        if data:
            self.log.debug("dropping %d stray bytes: %r", len(data), data[:200])

    async def _reply(self, cmd: Command, wanted: bytes) -> tuple[str, bytes]:
        """The next reply line about ``cmd`` whose kind is in ``wanted`` (G, T or E).

        A ``T`` (the guest has the whole text) is noted on the way; other lines are stray.
        """
        nonce = cmd.nonce.encode()
        kinds = b"GTE"
        markers = (b"G" + nonce, b"T" + nonce, b"E" + nonce + b" ")
        while True:
            i, stray, rest = await self.backdoor.read_first(markers)
            self._note_stray(stray)
            kind = kinds[i : i + 1]
            if kind == b"T":
                cmd.received = True
            if kind in wanted:
                return kind.decode(), rest

    def _on_out(self) -> None:
        try:
            while data := self._out.recv(1 << 20):
                for owner, segment in self._demux.feed(data):
                    if self._cmd is not None and owner == self._cmd.nonce:
                        self._cmd.output += segment
                    else:
                        self._note_stray(segment)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        asyncio.get_running_loop().remove_reader(self._out.fileno())

    async def _send_ctl(self, line: str) -> None:
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self._ctl, line.encode())

    async def settle(self) -> None:
        """Hand over the text of a long command an interrupt left half-way (the guest waits
        for it), then kill that command as soon as it starts."""
        cmd = self._unsent
        if cmd is None:
            return
        self._cmd = cmd
        try:
            async with asyncio.timeout(KILL_GRACE):
                kind, _ = await self._reply(cmd, b"GE")
                if kind == "G":
                    await self._hand_over(cmd)
                    await self._reply(cmd, b"T")
        except TimeoutError:
            raise MachineError(
                f"{self.name}: the guest has not taken an earlier command yet (is it frozen?); "
                "try again"
            ) from None
        finally:
            self._cmd = None
        self._unsent = None
        if kind == "G":
            self._cmd = cmd
            await self._abort(cmd)
            self._cmd = None

    async def _hand_over(self, cmd: Command) -> None:
        """Send a long command's text on the out port (the guest said it is ready for it).

        Shielded: once begun, the text goes whole, even if the caller is interrupted.
        """
        text = cmd.text.encode() + cmd.nonce.encode()
        sending = asyncio.ensure_future(self.backdoor.send(text, self._out))
        cmd.sent = True
        self._unsent = None
        await asyncio.shield(sending)

    async def submit(self, cmd: Command, timeout: float | None) -> None:
        """Send ``cmd`` under a fresh nonce. Never cut half-way: the guest would read the rest
        of a line as part of the next command."""
        self._on_out()  # whatever is still in the out socket is not this command's
        cmd.nonce = secrets.token_hex(NONCE_BYTES)
        self._cmd = cmd
        if len(cmd.text) > BIG_COMMAND:
            cmd.sent = cmd.received = False
            line = f"__nr_big {cmd.nonce} {len(cmd.text.encode()) + 2 * NONCE_BYTES}\n"
        elif self._clean:
            # The previous command ended cleanly: no mark needed (one port write less).
            self._demux.start(cmd.nonce)
            line = f"__nr_q {cmd.nonce} {shlex.quote(cmd.text)}\n"
        else:
            line = f"__nr_run {cmd.nonce} {shlex.quote(cmd.text)}\n"
        self._clean = False
        await asyncio.shield(self.backdoor.send(line.encode()))

    async def finish(self, cmd: Command, timeout: float | None) -> tuple[int, bytes]:
        """The command's status and output; at ``timeout`` the host kills it (status 124)."""
        try:
            async with asyncio.timeout(timeout):
                result = await self._collect(cmd)
            self._clean = cmd.clean
            return result
        except TimeoutError:
            self.log.info("command timed out after %s s: %s", timeout, abbreviate(cmd.text))
            await self._abort(cmd)
            return 124, bytes(cmd.output)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(cmd))
            raise

    async def _collect(self, cmd: Command) -> tuple[int, bytes]:
        while cmd.status is None:
            if not cmd.sent:
                self._unsent = cmd  # until the guest is ready for the text
                kind, rest = await self._reply(cmd, b"GE")
                if kind == "G":
                    await self._hand_over(cmd)
                    continue
            else:
                _, rest = await self._reply(cmd, b"E")
            self._unsent = None
            if rest == b"busy":
                # A process from an earlier, interrupted command still holds the out port; the
                # command did not run: free the port and send it again.
                await self._free_port()
                await self.submit(cmd, None)
                continue
            if rest == b"garbled":
                raise MachineError(
                    f"{self.name}: the guest did not receive the whole command text; it did "
                    "not run. Run it again."
                )
            status, _, held = rest.partition(b" ")
            cmd.status, cmd.held = int(status), held == b"1"
            cmd.clean = not cmd.held
        if cmd.held:
            await self._await_stdout_closed(cmd)
            cmd.held = False
        self._on_out()  # what the guest wrote before closing is in the socket by now
        if cmd.clean and self._demux.owner == cmd.nonce:
            cmd.output += self._demux.flush()  # nothing else can write: no mark follows
        return cmd.status, bytes(cmd.output)

    async def _await_stdout_closed(self, cmd: Command) -> None:
        """The command exited but something it started holds its stdout: wait for the close."""
        assert self._port_open is not None
        start, delay, warned = time.monotonic(), 0.02, False
        while await self._port_open():
            if not warned and time.monotonic() - start > STDOUT_GRACE:
                warned = True
                self.log.warning(
                    "command `%s` has exited, but a process it started in the background still "
                    "holds its stdout open; waiting for it to close, as nixpkgs does. To not "
                    "wait, redirect that process's output (e.g. `cmd >/dev/null 2>&1 &`).",
                    abbreviate(cmd.text),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _free_port(self) -> None:
        assert self._port_open is not None
        end = time.monotonic() + KILL_GRACE
        while await self._port_open():
            if time.monotonic() > end:
                raise MachineError(
                    f"{self.name}: a guest process holds the command output port and does not "
                    "die; restart the machine"
                )
            await self._send_ctl("K *\n")  # the command did not run: any holder is stale
            await asyncio.sleep(0.1)

    async def _abort(self, cmd: Command) -> None:
        """Kill a running command in the guest and wait until the channel is idle again."""
        if self.backdoor.eof or self.backdoor.token_seen:
            return
        end = time.monotonic() + KILL_GRACE
        if self._unsent is cmd:
            self.log.warning(
                "command `%s` was interrupted before the guest took its text; the next command "
                "hands it over and kills it first",
                abbreviate(cmd.text),
            )
            return
        if not cmd.received:  # killing `head` would leave part of the text in the port
            with contextlib.suppress(TimeoutError, MachineError):
                async with asyncio.timeout(KILL_GRACE):
                    await self._reply(cmd, b"T")
            if not cmd.received:
                self.log.warning(
                    "the guest has not read the text of `%s` yet; it will run, and later "
                    "commands will skip its output",
                    abbreviate(cmd.text),
                )
                return
        while time.monotonic() < end:
            await self._send_ctl(f"K {cmd.nonce}\n")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await self._collect(cmd)
                    return
        self.log.warning(
            "command `%s` did not die within %s s (is the guest frozen?); the next command "
            "runs once it has ended, and its output is skipped",
            abbreviate(cmd.text), KILL_GRACE,
        )  # fmt: skip
