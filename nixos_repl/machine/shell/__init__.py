"""The backdoor shell channel: nixpkgs' guest contract, a faster framing, and no desync.

The guest side is NixOS's: a bash reading script lines from /dev/hvc0, stderr on the serial
console. Everything sent is plain bash over that channel; nothing is installed in the guest.

``ShellChannel`` is the one interface the machine uses: it reads the backdoor's banner, offers the
guest the fast framing (``fast.py``, over two extra virtio-serial ports the driver adds; its
guest side is ``setup.sh``), and runs each command under one lock through whichever framing the
guest took: the fast one, or nixpkgs' own (``nixpkgs.py``) for a guest without those ports.
Both keep nixpkgs' semantics: ``set -euo pipefail``, a fresh shell per command, stdout only, and
waiting for stdout to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from ...errors import MachineError
from .fast import OUT_CHARDEV, OUT_MARK, FastFraming, OutDemux, setup_script
from .link import BANNER, NONCE_BYTES, Backdoor, Command, Framing, abbreviate
from .nixpkgs import NixpkgsFraming

__all__ = ["BANNER", "OUT_CHARDEV", "OUT_MARK", "OutDemux", "ShellChannel", "abbreviate"]


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
        self.backdoor = Backdoor(name, shell, self._check)
        self._out = out
        self._ctl = ctl
        self._port_open = port_open
        self._lock = asyncio.Lock()
        self.framing: Framing = NixpkgsFraming(name, self.backdoor)
        self.dead = False  # the backdoor shell died (and the guest did not reboot)
        self._death = b"\nD" + secrets.token_hex(NONCE_BYTES).encode() + b"\n"
        self._banner: bytes | None = None
        self._rebooted: Command | None = None  # the command a reboot cut short
        self._detached: set[asyncio.Task[None]] = set()

    @property
    def fast(self) -> bool:
        """Whether the guest took the fast framing."""
        return self.framing.fast

    @fast.setter
    def fast(self, fast: bool) -> None:
        if fast == self.fast:
            return
        if fast and self._out is not None:
            self.backdoor.token = self._death
            self.framing = FastFraming(
                self.name, self.backdoor, self._out, self._ctl, self._port_open
            )
        else:
            self._forget_fast()

    def _forget_fast(self) -> None:
        if self._out is not None and self._out.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self._out.fileno())
        self.backdoor.token, self.backdoor.token_seen = None, False
        self.framing = NixpkgsFraming(self.name, self.backdoor)

    def _check(self) -> None:
        """Run by the hvc0 reader at every wake-up: fail a command that can never complete."""
        if self.backdoor.token_seen:
            raise self._died()
        if self._rebooted is not None and self._rebooted is self.backdoor.current:
            self._rebooted = None
            raise MachineError(f"{self.name}: the guest rebooted while running a command")

    def _died(self) -> MachineError:
        self.dead = True
        return MachineError(
            f"{self.name}: the backdoor shell in the guest died (did a command kill it, e.g. "
            "`kill -9 $$`?); commands cannot run until the machine reboots: call "
            f"{self.name}.crash() then {self.name}.start(), or {self.name}.reboot()"
        )

    # -- connection ----------------------------------------------------------------------------

    async def wait_for_banner(self) -> bytes:
        """Wait for ``Spawning backdoor root shell...``, accumulating across reads.

        Once seen, it is not waited for again until ``new_boot()`` (a connect cut short by an
        interrupt resumes where it stopped).
        """
        if self._banner is None:
            before, _ = await self.backdoor.read_marker(BANNER)
            self._banner = before + BANNER
        return self._banner

    def new_boot(self) -> None:
        """The guest reboots in the same QEMU: a new backdoor shell, set up from scratch.

        A command still waiting for its reply fails: the shell that ran it is gone.
        """
        self._banner = None
        self.dead = False
        self._forget_fast()
        self._rebooted = self.backdoor.current
        self.backdoor.wake()

    async def setup(self) -> None:
        """Switch to the fast framing when the guest has the extra ports, else stay with
        nixpkgs'."""
        nonce = secrets.token_hex(NONCE_BYTES)
        async with self._lock:
            await self.backdoor.send(setup_script(nonce, self._death[2:-1].decode()))
            _, rest = await self.backdoor.read_marker(b"R" + nonce.encode() + b" ")
        out_dev, _, ctl_dev = rest.decode(errors="replace").partition(" ")
        self.fast = "none" not in (out_dev, ctl_dev)
        if self.fast:
            self.backdoor.log.debug(
                "fast shell framing: output on %s, control on %s", out_dev, ctl_dev
            )
        else:
            self.backdoor.log.info(
                "the guest has no nixos-repl ports: using nixpkgs' shell framing"
            )

    # -- snapshots -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """No command runs on the channel while in this block (a running one is waited for)."""
        async with self._lock:
            yield

    def rewound(self) -> None:
        """The guest was rewound (a snapshot was loaded): drop what arrived from the abandoned
        timeline; the next command's reply cannot be taken from it."""
        self.backdoor.buf.clear()
        self.framing.rewound()

    @property
    def death_token(self) -> bytes:
        """The line the guest's backdoor prints when it dies (set up with the fast framing)."""
        return self._death

    def resume(self, death_token: bytes) -> None:
        """A QEMU started from a saved state: its backdoor is up already (no banner comes) and
        was set up with ``death_token``; ``setup()`` then finds its framing again."""
        self._death = death_token
        self._banner = b""

    # -- commands ------------------------------------------------------------------------------

    async def execute(
        self, command: str, timeout: float | None = None, wait: bool = True
    ) -> tuple[int, bytes]:
        """Run ``command`` in a fresh shell with ``set -euo pipefail``; returns (status, stdout).

        ``timeout``: status 124, like GNU timeout (the host kills the command on the fast
        framing; the guest's ``timeout`` does on nixpkgs'). ``wait=False`` only sends the
        command (nixpkgs' ``check_output=False``); it still stops at ``timeout``, and the next
        command waits for it. Cancellation kills the command in the guest (fast framing) and
        leaves the channel in sync.
        """
        if self.dead:
            raise self._died()
        await self._lock.acquire()
        cmd = Command(command)
        framing = self.framing
        try:
            await framing.settle()
            await framing.submit(cmd, timeout)
        except BaseException:
            self._lock.release()
            raise
        if not wait:
            task = asyncio.get_running_loop().create_task(self._finish_detached(cmd, timeout))
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)
            return -2, b""
        try:
            return await framing.finish(cmd, timeout)
        finally:
            self.backdoor.current = None
            self._lock.release()

    async def _finish_detached(self, cmd: Command, timeout: float | None) -> None:
        try:
            await self.framing.finish(cmd, timeout)
        except Exception as e:  # the caller asked not to hear about it
            self.backdoor.log.debug("detached command `%s`: %s", abbreviate(cmd.text), e)
        finally:
            self.backdoor.current = None
            self._lock.release()

    # -- raw access (shutdown) -----------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the backdoor shell with no framing (nixpkgs' ``shutdown`` does this)."""
        async with self._lock:
            await self.backdoor.send(data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        self.backdoor.close()
        for sock in (self._out, self._ctl):
            if sock is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
