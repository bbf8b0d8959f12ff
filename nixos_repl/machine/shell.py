"""The backdoor shell protocol: nixpkgs' guest contract, a faster framing, and no desync.

The guest side is NixOS's: a bash reading script lines from /dev/hvc0, stderr on the serial
console. Everything below is plain bash sent over that channel; nothing is installed in the guest.

Fast framing, used when the guest sees the two extra virtio-serial ports the driver adds
(``org.nixos-repl.out`` and ``org.nixos-repl.ctl``). After the banner one setup script defines a
few functions and starts a small reader; then, per command:

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
  reader kills every process holding the out port, with their descendants. A ``K`` that arrives
  late (a guest frozen for a while) cannot hit a later command;
* long command text does not go through hvc0, which bash reads a byte at a time: the host sends
  ``__nr_big <nonce> <length>``, the guest answers ``G<nonce>``, reads ``<text><nonce>`` from
  the out port with ``head -c``, answers ``T<nonce>`` and runs it; a text that does not arrive
  whole is refused, never run. The host never interrupts that read, so no part of a text can
  stay behind in the port;
* a watcher started by the setup holds a pipe from the backdoor shell; when the shell dies (for
  instance of ``kill -9 $$``) it prints ``D<token>`` on hvc0, and every command fails at once
  with a MachineError instead of waiting out its timeout.

Compatible framing (a guest without those ports): nixpkgs' ``bash -c ... | (base64 -w 0; echo)``
wrapped in nonce markers, so a cut command's late reply is still recognised and skipped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import shlex
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from ..errors import MachineError

__all__ = ["BANNER", "OutDemux", "ShellChannel", "abbreviate"]

BANNER = b"Spawning backdoor root shell..."
# After this long with the command finished but its stdout still held open, say why we wait.
STDOUT_GRACE = 5.0
# How long an interrupted or timed-out command may take to die before the channel gives up on it.
KILL_GRACE = 2.0
OUT_CHARDEV = "nixos-repl-out"
# Command text longer than this goes over the out port instead of hvc0.
BIG_COMMAND = 2048
# Commands longer than this are quoted in messages by their start and their size.
QUOTE_LIMIT = 200
# What the backdoor writes on the out port before a command's output.
OUT_MARK: Final = b"\x00nixos-repl:"
NONCE_BYTES: Final = 8  # 16 hex digits


def abbreviate(command: str, limit: int = QUOTE_LIMIT) -> str:
    """``command`` for a message: as it is when short, else its start and its size."""
    if len(command) <= limit:
        return command
    return f"{command[:limit]}... ({len(command.encode())} bytes)"


SETUP = r"""if [[ -z ${__nr_ready-} ]]; then
  __nr_out= __nr_ctl= __nr_fd= __nr_last=0 __nr_child= __nr_sig= __nr_pend=
  __nr_pidf=/proc/sys/kernel/ns_last_pid
  [ -r "$__nr_pidf" ] || __nr_pidf=/dev/null
  exec < /dev/null
  for __nr_p in /sys/class/virtio-ports/*; do
    read -r __nr_n 2>/dev/null < "$__nr_p/name" || continue
    case "$__nr_n" in
      org.nixos-repl.out) __nr_out=/dev/${__nr_p##*/} ;;
      org.nixos-repl.ctl) __nr_ctl=/dev/${__nr_p##*/} ;;
    esac
  done
  __nr_cur=/run/nixos-repl.cmd
  { : > "$__nr_cur"; } 2>/dev/null || __nr_cur=/tmp/.nixos-repl.cmd
  exec {__nr_w}> >(read -r __nr_x; printf '\nD%s\n' @TOKEN@)
  __nr_open() {
    [[ -n $__nr_fd ]] || { exec {__nr_fd}<> "$__nr_out"; } 2>/dev/null || { __nr_fd=; return 1; }
  }
  __nr_run() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    printf '\0nixos-repl:%s\n' "$1" >&$__nr_fd
    __nr_c=$2
    __nr_go "$1"
  }
  __nr_q() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    __nr_c=$2
    __nr_go "$1"
  }
  __nr_big() {
    if ! __nr_open; then printf 'E%s busy\n' "$1"; return; fi
    printf %s "$1" > "$__nr_cur"
    printf 'G%s\n' "$1"
    __nr_c=$(exec {__nr_w}>&-; head -c "$2" <&$__nr_fd)
    printf 'T%s\n' "$1"
    if [[ ${__nr_c: -16} != "$1" ]]; then __nr_c=; printf 'E%s garbled\n' "$1"; return; fi
    __nr_c=${__nr_c:0:-16}
    printf '\0nixos-repl:%s\n' "$1" >&$__nr_fd
    __nr_go "$1"
  }
  __nr_go() {
    __nr_child=- __nr_pend=
    ( set --; trap : INT QUIT; trap - INT QUIT; __nr_me=$BASHPID; set -euo pipefail; eval "$__nr_c"
    ) >&$__nr_fd {__nr_fd}>&- {__nr_w}>&- &
    __nr_child=$! __nr_sig= __nr_c=
    # A signal that came before $! was known (the command may run first) is passed on now.
    [[ -z $__nr_pend ]] || kill -s "$__nr_pend" "$__nr_child" 2>/dev/null
    wait "$__nr_child"; __nr_s=$?
    while [[ -n $__nr_sig ]]; do __nr_sig=; wait "$__nr_child"; __nr_s=$?; done
    __nr_child= __nr_h=0
    read -r __nr_pid < "$__nr_pidf"
    if (( __nr_pid != __nr_last + 1 )); then
      exec {__nr_fd}>&-
      if ! { exec {__nr_fd}<> "$__nr_out"; } 2>/dev/null; then __nr_h=1 __nr_fd=; fi
    fi
    __nr_last=$__nr_pid
    printf 'E%s %s %s\n' "$1" "$__nr_s" "$__nr_h"
  }
  __nr_pass() {
    if [[ $__nr_child == - ]]; then __nr_pend=$1
    elif [[ -n $__nr_child ]]; then __nr_sig=1; kill -s "$1" "$__nr_child" 2>/dev/null
    else trap - "$1"; kill -s "$1" $$; fi
  }
  # In a command, `kill $$` signals the command itself (as in nixpkgs' `bash -c`), at once.
  kill() {
    local __nr_a=() __nr_x
    for __nr_x; do
      [[ -n ${__nr_me-} && $__nr_x == "$$" ]] && __nr_x=$__nr_me
      __nr_a+=("$__nr_x")
    done
    builtin kill "${__nr_a[@]}"
  }
  trap '__nr_pass TERM' TERM
  trap '__nr_pass INT' INT
  __nr_kill() {
    local p kids=()
    kill -STOP "$1" 2>/dev/null || return 0
    read -r -a kids 2>/dev/null < "/proc/$1/task/$1/children"
    for p in "${kids[@]}"; do __nr_kill "$p"; done
    kill -KILL "$1" 2>/dev/null
    kill -CONT "$1" 2>/dev/null
  }
  __nr_holders() {
    local f p
    for f in /proc/[0-9]*/fd/*; do
      p=${f#/proc/}; p=${p%%/*}
      if [ "$p" != $$ ] && [[ $f -ef $__nr_out ]]; then __nr_kill "$p"; fi
    done
  }
  if [ -c "$__nr_out" ] && [ -c "$__nr_ctl" ]; then
    ( exec 3< "$__nr_ctl" < /dev/null > /dev/null {__nr_w}>&-
      while read -r -u 3 __nr_cmd __nr_arg; do
        read -r __nr_now < "$__nr_cur"
        case "$__nr_cmd" in
          K) if [[ $__nr_arg == '*' || $__nr_arg == "$__nr_now" ]]; then __nr_holders; fi ;;
        esac
      done ) &
  fi
  __nr_ready=1
fi
printf 'R%s %s %s\n' @NONCE@ "${__nr_out:-none}" "${__nr_ctl:-none}"
"""


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


@dataclass
class _Command:
    text: str
    nonce: str = ""
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None  # once its E marker arrived
    held: bool = False  # something it started still holds its stdout
    sent: bool = True  # its text has gone whole (long texts go after the guest's go-ahead)
    received: bool = True  # the guest has read all of its text
    clean: bool = False  # it ended with nothing else holding the out port


class ShellChannel:
    """The backdoor connection of one machine (hvc0), plus the output and control ports.

    ``port_open`` is an async callable asking QEMU whether the guest holds the out port open.
    """

    def __init__(
        self,
        name: str,
        shell: socket.socket,
        out: socket.socket | None,
        ctl: socket.socket | None,
        port_open: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self._shell = shell
        self._out = out
        self._ctl = ctl
        self._port_open = port_open
        self._buf = bytearray()
        self._readable = asyncio.Event()
        self._eof = False
        self._lock = asyncio.Lock()
        self.fast = False
        self.dead = False  # the backdoor shell died (and the guest did not reboot)
        # Nothing but the backdoor holds the out port and nothing stale is in flight: the next
        # command's output needs no mark.
        self._clean = False
        self._death = b"\nD" + secrets.token_hex(NONCE_BYTES).encode() + b"\n"
        self._demux = OutDemux()
        self._banner: bytes | None = None
        self._cmd: _Command | None = None
        self._unsent: _Command | None = None  # a long text the guest is still waiting for
        self._rebooted: _Command | None = None  # the command a reboot cut short
        self._detached: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        loop.add_reader(shell.fileno(), self._on_shell)
        if out is not None:
            loop.add_reader(out.fileno(), self._on_out)

    # -- raw I/O -------------------------------------------------------------------------------

    def _on_shell(self) -> None:
        try:
            while data := self._shell.recv(1 << 20):
                self._buf += data
            self._eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._eof = True
        if self._eof:
            asyncio.get_running_loop().remove_reader(self._shell.fileno())
        self._readable.set()

    def _on_out(self) -> None:
        assert self._out is not None
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

    def _note_stray(self, data: bytes) -> None:
        if data:
            self.log.debug("dropping %d stray bytes: %r", len(data), data[:200])

    async def _send(self, data: bytes, sock: socket.socket | None = None) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(sock or self._shell, data)
        except OSError as e:
            raise MachineError(f"{self.name}: the backdoor shell connection is closed ({e})") from e

    async def _send_ctl(self, line: str) -> None:
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self._ctl, line.encode())

    def _died(self) -> MachineError:
        self.dead = True
        return MachineError(
            f"{self.name}: the backdoor shell in the guest died (did a command kill it, e.g. "
            "`kill -9 $$`?); commands cannot run until the machine reboots: call "
            f"{self.name}.crash() then {self.name}.start(), or {self.name}.reboot()"
        )

    async def _read_marker(self, marker: bytes) -> tuple[bytes, bytes]:
        """Wait for ``marker`` and the end of its line on hvc0.

        Returns what came before the marker and the rest of the marker's line, and consumes both
        (the newline too). The search resumes where it stopped, so long outputs stay linear.
        """
        _, before, rest = await self._read_first((marker,))
        return before, rest

    async def _read_first(self, markers: tuple[bytes, ...]) -> tuple[int, bytes, bytes]:
        """``_read_marker`` for whichever of ``markers`` comes first; returns its index too."""
        scanned = 0
        longest = max(len(m) for m in markers)
        while True:
            found = [
                (at, i) for i, m in enumerate(markers) if (at := self._buf.find(m, scanned)) >= 0
            ]
            if found:
                at, i = min(found)
                end = self._buf.find(b"\n", at + len(markers[i]))
                if end >= 0:
                    before = bytes(self._buf[:at])
                    rest = bytes(self._buf[at + len(markers[i]) : end])
                    del self._buf[: end + 1]
                    return i, before, rest
            else:
                scanned = max(0, len(self._buf) - longest + 1)
            if self.fast and self._death in self._buf:
                raise self._died()
            if self._eof:
                raise MachineError(
                    f"{self.name}: the backdoor shell disconnected (did the machine power off?)"
                )
            if self._rebooted is not None and self._rebooted is self._cmd:
                self._rebooted = None
                raise MachineError(f"{self.name}: the guest rebooted while running a command")
            self._readable.clear()
            await self._readable.wait()

    async def _reply(self, cmd: _Command, wanted: bytes) -> tuple[str, bytes]:
        """The next reply line about ``cmd`` whose kind is in ``wanted`` (G, T or E).

        A ``T`` (the guest has the whole text) is noted on the way; other lines are stray.
        """
        nonce = cmd.nonce.encode()
        kinds = b"GTE"
        markers = (b"G" + nonce, b"T" + nonce, b"E" + nonce + b" ")
        while True:
            i, stray, rest = await self._read_first(markers)
            self._note_stray(stray)
            kind = kinds[i : i + 1]
            if kind == b"T":
                cmd.received = True
            if kind in wanted:
                return kind.decode(), rest

    # -- connection ----------------------------------------------------------------------------

    async def wait_for_banner(self) -> bytes:
        """Wait for ``Spawning backdoor root shell...``, accumulating across reads.

        Once seen, it is not waited for again until ``new_boot()`` (a connect cut short by an
        interrupt resumes where it stopped).
        """
        if self._banner is None:
            before, _ = await self._read_marker(BANNER)
            self._banner = before + BANNER
        return self._banner

    def new_boot(self) -> None:
        """The guest reboots in the same QEMU: a new backdoor shell, set up from scratch.

        A command still waiting for its reply fails: the shell that ran it is gone.
        """
        self._banner = None
        self.fast = False
        self.dead = False
        self._clean = False
        self._unsent = None
        self._rebooted = self._cmd
        self._readable.set()

    async def setup(self) -> None:
        """Switch to the fast framing when the guest has the extra ports, else stay compatible."""
        nonce = secrets.token_hex(NONCE_BYTES)
        script = SETUP.replace("@NONCE@", nonce).replace("@TOKEN@", self._death[2:-1].decode())
        async with self._lock:
            await self._send(script.encode())
            _, rest = await self._read_marker(b"R" + nonce.encode() + b" ")
        out_dev, _, ctl_dev = rest.decode(errors="replace").partition(" ")
        self.fast = "none" not in (out_dev, ctl_dev) and self._out is not None
        self._clean = self.fast
        if self.fast:
            self.log.debug("fast shell framing: output on %s, control on %s", out_dev, ctl_dev)
        else:
            self.log.info("the guest has no nixos-repl ports: using nixpkgs' shell framing")

    @contextlib.asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """No command runs on the channel while in this block (a running one is waited for)."""
        async with self._lock:
            yield

    def forget_pending(self) -> None:
        """The guest was rewound (a snapshot was loaded): drop what arrived from the abandoned
        timeline, and mark the next command's output so nothing stale can pass for it."""
        self._buf.clear()
        self._demux = OutDemux()
        self._clean = False

    # -- commands ------------------------------------------------------------------------------

    async def execute(
        self, command: str, timeout: float | None = None, wait: bool = True
    ) -> tuple[int, bytes]:
        """Run ``command`` in a fresh shell with ``set -euo pipefail``; returns (status, stdout).

        ``timeout`` is enforced host-side (status 124, like GNU timeout). ``wait=False`` only
        sends the command (nixpkgs' ``check_output=False``); it still stops at ``timeout``, and
        the next command waits for it. Cancellation kills the command in the guest and leaves
        the channel in sync.
        """
        if self.dead:
            raise self._died()
        await self._lock.acquire()
        cmd = _Command(command)
        try:
            await self._settle()
            await self._submit(cmd, timeout)
        except BaseException:
            self._lock.release()
            raise
        if not wait:
            task = asyncio.get_running_loop().create_task(self._finish_detached(cmd, timeout))
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)
            return -2, b""
        try:
            return await self._finish(cmd, timeout)
        finally:
            self._cmd = None
            self._lock.release()

    async def _settle(self) -> None:
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

    async def _hand_over(self, cmd: _Command) -> None:
        """Send a long command's text on the out port (the guest said it is ready for it).

        Shielded: once begun, the text goes whole, even if the caller is interrupted.
        """
        assert self._out is not None
        text = cmd.text.encode() + cmd.nonce.encode()
        sending = asyncio.ensure_future(self._send(text, self._out))
        cmd.sent = True
        self._unsent = None
        await asyncio.shield(sending)

    async def _submit(self, cmd: _Command, timeout: float | None) -> None:
        """Send ``cmd`` under a fresh nonce. Never cut half-way: the guest would read the rest
        of a line as part of the next command."""
        if self._out is not None:
            self._on_out()  # whatever is still in the out socket is not this command's
        cmd.nonce = secrets.token_hex(NONCE_BYTES)
        self._cmd = cmd
        if self.fast:
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
        else:
            timeout_str = f"timeout {timeout} " if timeout is not None else ""
            inner = shlex.quote(f"set -euo pipefail; {cmd.text}")
            line = (
                f"printf 'S%s\\n' {cmd.nonce}; {timeout_str}bash -c {inner} </dev/null"
                f" | (base64 -w 0; echo); printf 'E%s %s\\n' {cmd.nonce} \"${{PIPESTATUS[0]}}\"\n"
            )
        await asyncio.shield(self._send(line.encode()))

    async def _finish_detached(self, cmd: _Command, timeout: float | None) -> None:
        try:
            await self._finish(cmd, timeout)
        except Exception as e:  # the caller asked not to hear about it
            self.log.debug("detached command `%s`: %s", abbreviate(cmd.text), e)
        finally:
            self._cmd = None
            self._lock.release()

    async def _finish(self, cmd: _Command, timeout: float | None) -> tuple[int, bytes]:
        # Without the fast framing, the guest-side `timeout` enforces the limit.
        try:
            async with asyncio.timeout(timeout if self.fast else None):
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

    async def _collect(self, cmd: _Command) -> tuple[int, bytes]:
        if not self.fast:
            return await self._collect_compat(cmd)
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
                await self._submit(cmd, None)
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
        if self._out is not None:
            self._on_out()  # what the guest wrote before closing is in the socket by now
            if cmd.clean and self._demux.owner == cmd.nonce:
                cmd.output += self._demux.flush()  # nothing else can write: no mark follows
        return cmd.status, bytes(cmd.output)

    async def _await_stdout_closed(self, cmd: _Command) -> None:
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

    async def _collect_compat(self, cmd: _Command) -> tuple[int, bytes]:
        nonce = cmd.nonce.encode()
        stray, _ = await self._read_marker(b"S" + nonce)
        self._note_stray(stray)
        encoded, rest = await self._read_marker(b"\nE" + nonce + b" ")
        try:
            output = base64.b64decode(encoded)
        except binascii.Error as e:
            raise MachineError(f"{self.name}: garbled command output ({e})") from e
        cmd.output[:] = output
        return int(rest), output

    async def _abort(self, cmd: _Command) -> None:
        """Kill a running command in the guest and wait until the channel is idle again."""
        if not self.fast or self._eof or self.dead:
            if not self._eof and not self.dead:
                self.log.warning(
                    "this guest's shell cannot interrupt a command; its reply will be skipped"
                )
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
            "command `%s` did not die within %s s; later commands will skip its output",
            abbreviate(cmd.text), KILL_GRACE,
        )  # fmt: skip

    # -- raw access (benchmarks, shutdown) ------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the backdoor shell with no framing (nixpkgs' ``shutdown`` does this)."""
        async with self._lock:
            await self._send(data)

    async def roundtrip_raw(self, line: bytes) -> bytes:
        """Send raw bytes and return the next newline-terminated line the shell prints."""
        async with self._lock:
            await self._send(line)
            _, reply = await self._read_marker(b"")
            return reply

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in (self._shell, self._out, self._ctl):
            if sock is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._eof = True
        self._readable.set()
