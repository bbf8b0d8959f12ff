"""The backdoor shell protocol: nixpkgs' guest contract, a faster framing, and no desync.

The guest side is NixOS's: a bash reading script lines from /dev/hvc0, stderr on the serial
console. Everything below is plain bash sent over that channel; nothing is installed in the guest.

Fast framing, used when the guest sees the two extra virtio-serial ports the driver adds
(``org.nixos-repl.out`` and ``org.nixos-repl.ctl``). After the banner one setup script defines a
function and starts a small reader; then, per command:

* the command runs in a forked subshell, ``( set -euo pipefail; eval '<cmd>' )``: one fork, no
  ``bash -c``, no ``base64``, no guest-side ``timeout``. Its stdout is the out port, which the
  backdoor shell opened beforehand; the bytes arrive raw on the out socket. Its stdin is
  /dev/null: the setup points the backdoor shell's own stdin there (the shell reads its script
  from another descriptor), so a command cannot swallow the next one;
* a virtio-serial port can be open only once at a time. When the subshell has exited, the shell
  closes its own copy and opens the port again for the next command: if that fails, a process the
  command started still holds its stdout. That check costs two virtio control messages, so it is
  skipped when the kernel's last allocated pid (``/proc/sys/kernel/ns_last_pid``) is exactly one
  more than after the previous command: then the subshell was the only process created, and
  nothing else can hold the port. Without that file the check always runs. The reply on hvc0 is
  ``E<nonce> <status> <held>``; anything else there is skipped;
* while ``held``, the host waits for stdout to close, as nixpkgs does (base64 waits for EOF),
  asking QEMU whether the port is still open (``query-chardev``; the VSERPORT_CHANGE event is
  rate-limited to one a second, so it cannot mark the end of each command), and says why it
  waits after a grace period;
* to interrupt, or at a host-side deadline, the host writes ``K`` on the ctl port: the reader
  stops and kills every process holding the out port, with their descendants.

``$$`` inside a command is the backdoor shell's pid, as in any subshell; everything else a
command sees is what ``bash -c`` would give it.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import MachineError

__all__ = ["BANNER", "ShellChannel", "abbreviate"]

BANNER = b"Spawning backdoor root shell..."
# After this long with the command finished but its stdout still held open, say why we wait.
STDOUT_GRACE = 5.0
# How long an interrupted or timed-out command may take to die before the channel gives up on it.
KILL_GRACE = 2.0
OUT_CHARDEV = "nixos-repl-out"
# Commands longer than this are quoted in messages by their start and their size.
QUOTE_LIMIT = 200


def abbreviate(command: str, limit: int = QUOTE_LIMIT) -> str:
    """``command`` for a message: as it is when short, else its start and its size."""
    if len(command) <= limit:
        return command
    return f"{command[:limit]}... ({len(command.encode())} bytes)"


SETUP = r"""if [[ -z ${__nr_ready-} ]]; then
  __nr_out= __nr_ctl= __nr_fd= __nr_last=0
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
  __nr_run() {
    if [[ -z $__nr_fd ]] && ! { exec {__nr_fd}> "$__nr_out"; } 2>/dev/null; then
      __nr_fd=; printf 'E%s busy\n' "$1"; return
    fi
    ( __nr_c=$2; set --; set -euo pipefail; eval "$__nr_c" ) >&$__nr_fd {__nr_fd}>&-
    __nr_s=$? __nr_h=0
    read -r __nr_pid < "$__nr_pidf"
    if (( __nr_pid != __nr_last + 1 )); then
      exec {__nr_fd}>&-
      if ! { exec {__nr_fd}> "$__nr_out"; } 2>/dev/null; then __nr_h=1 __nr_fd=; fi
    fi
    __nr_last=$__nr_pid
    printf 'E%s %s %s\n' "$1" "$__nr_s" "$__nr_h"
  }
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
    ( exec 3< "$__nr_ctl" < /dev/null > /dev/null
      while read -r -u 3 __nr_cmd; do
        case "$__nr_cmd" in K) __nr_holders ;; esac
      done ) &
  fi
  __nr_ready=1
fi
printf 'R%s %s %s\n' @NONCE@ "${__nr_out:-none}" "${__nr_ctl:-none}"
"""


@dataclass
class _Command:
    text: str
    nonce: str = ""
    output: bytearray = field(default_factory=bytearray)
    status: int | None = None  # once its E marker arrived
    held: bool = False  # something it started still holds its stdout


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
        self._banner: bytes | None = None
        self._cmd: _Command | None = None
        self._rebooted: _Command | None = None  # the command a reboot cut short
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
                if self._cmd is not None:
                    self._cmd.output += data
                else:
                    self._note_stray(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        asyncio.get_running_loop().remove_reader(self._out.fileno())

    def _note_stray(self, data: bytes) -> None:
        if data:
            self.log.debug("dropping %d stray bytes: %r", len(data), data[:200])

    async def _send(self, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self._shell, data)
        except OSError as e:
            raise MachineError(f"{self.name}: the backdoor shell connection is closed ({e})") from e

    async def _send_ctl(self, line: str) -> None:
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self._ctl, line.encode())

    async def _read_marker(self, marker: bytes) -> tuple[bytes, bytes]:
        """Wait for ``marker`` and the end of its line on hvc0.

        Returns what came before the marker and the rest of the marker's line, and consumes both
        (the newline too). The search resumes where it stopped, so long outputs stay linear.
        """
        scanned = 0
        while True:
            at = self._buf.find(marker, scanned)
            if at >= 0:
                end = self._buf.find(b"\n", at + len(marker))
                if end >= 0:
                    before = bytes(self._buf[:at])
                    rest = bytes(self._buf[at + len(marker) : end])
                    del self._buf[: end + 1]
                    return before, rest
            else:
                scanned = max(0, len(self._buf) - len(marker) + 1)
            if self._eof:
                raise MachineError(
                    f"{self.name}: the backdoor shell disconnected (did the machine power off?)"
                )
            if self._rebooted is not None and self._rebooted is self._cmd:
                self._rebooted = None
                raise MachineError(f"{self.name}: the guest rebooted while running a command")
            self._readable.clear()
            await self._readable.wait()

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
        self._rebooted = self._cmd
        self._readable.set()

    async def setup(self) -> None:
        """Switch to the fast framing when the guest has the extra ports, else stay compatible."""
        nonce = secrets.token_hex(8)
        async with self._lock:
            await self._send(SETUP.replace("@NONCE@", nonce).encode())
            _, rest = await self._read_marker(b"R" + nonce.encode() + b" ")
        out_dev, _, ctl_dev = rest.decode(errors="replace").partition(" ")
        self.fast = "none" not in (out_dev, ctl_dev) and self._out is not None
        if self.fast:
            self.log.debug("fast shell framing: output on %s, control on %s", out_dev, ctl_dev)
        else:
            self.log.info("the guest has no nixos-repl ports: using nixpkgs' shell framing")

    # -- commands ------------------------------------------------------------------------------

    async def execute(
        self, command: str, timeout: float | None = None, wait: bool = True
    ) -> tuple[int, bytes]:
        """Run ``command`` in a fresh shell with ``set -euo pipefail``; returns (status, stdout).

        ``timeout`` is enforced host-side (status 124, like GNU timeout). ``wait=False`` only
        sends the command (nixpkgs' ``check_output=False``); the next command waits for it.
        Cancellation kills the command in the guest and leaves the channel in sync.
        """
        await self._lock.acquire()
        cmd = _Command(command)
        try:
            await self._submit(cmd, timeout)
        except BaseException:
            self._lock.release()
            raise
        if not wait:
            asyncio.get_running_loop().create_task(self._finish_detached(cmd))
            return -2, b""
        try:
            return await self._finish(cmd, timeout)
        finally:
            self._cmd = None
            self._lock.release()

    async def _submit(self, cmd: _Command, timeout: float | None) -> None:
        """Send ``cmd`` under a fresh nonce."""
        if self._out is not None:
            self._on_out()  # whatever is still in the out socket is not this command's
        cmd.nonce = secrets.token_hex(8)
        self._cmd = cmd
        if self.fast:
            line = f"__nr_run {cmd.nonce} {shlex.quote(cmd.text)}\n"
        else:
            timeout_str = f"timeout {timeout} " if timeout is not None else ""
            inner = shlex.quote(f"set -euo pipefail; {cmd.text}")
            line = (
                f"printf 'S%s\\n' {cmd.nonce}; {timeout_str}bash -c {inner} </dev/null"
                f" | (base64 -w 0; echo); printf 'E%s %s\\n' {cmd.nonce} \"${{PIPESTATUS[0]}}\"\n"
            )
        await self._send(line.encode())

    async def _finish_detached(self, cmd: _Command) -> None:
        try:
            await self._finish(cmd, None)
        except Exception as e:  # the caller asked not to hear about it
            self.log.debug("detached command %r: %s", cmd.text, e)
        finally:
            self._cmd = None
            self._lock.release()

    async def _finish(self, cmd: _Command, timeout: float | None) -> tuple[int, bytes]:
        # Without the fast framing, the guest-side `timeout` enforces the limit.
        try:
            async with asyncio.timeout(timeout if self.fast else None):
                return await self._collect(cmd)
        except TimeoutError:
            self.log.info("command timed out after %s s: %s", timeout, cmd.text)
            await self._abort(cmd)
            return 124, bytes(cmd.output)
        except asyncio.CancelledError:
            await asyncio.shield(self._abort(cmd))
            raise

    async def _collect(self, cmd: _Command) -> tuple[int, bytes]:
        if not self.fast:
            return await self._collect_compat(cmd)
        while cmd.status is None:
            stray, rest = await self._read_marker(b"E" + cmd.nonce.encode() + b" ")
            self._note_stray(stray)
            if rest == b"busy":
                # A process from an earlier, interrupted command still holds the out port; the
                # command did not run: free the port and send it again.
                await self._free_port()
                await self._submit(cmd, None)
                continue
            status, _, held = rest.partition(b" ")
            cmd.status, cmd.held = int(status), held == b"1"
        if cmd.held:
            await self._await_stdout_closed(cmd)
            cmd.held = False
        if self._out is not None:
            self._on_out()  # what the guest wrote before closing is in the socket by now
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
                    cmd.text,
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
            await self._send_ctl("K\n")
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
        if not self.fast or self._eof:
            if not self._eof:
                self.log.warning(
                    "this guest's shell cannot interrupt a command; its reply will be skipped"
                )
            return
        end = time.monotonic() + KILL_GRACE
        while time.monotonic() < end:
            await self._send_ctl("K\n")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await self._collect(cmd)
                    return
        self.log.warning(
            "command `%s` did not die within %s s; later commands will skip its output",
            cmd.text, KILL_GRACE,
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
