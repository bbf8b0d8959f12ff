"""One ``vde_switch`` per VLAN, as nixpkgs runs it, exported as ``QEMU_VDE_SOCKET_<N>``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
from pathlib import Path

from .errors import MachineError
from .loop import run_sync
from .machine.process import die_with_parent

__all__ = ["VLan"]

log = logging.getLogger(__name__)
START_TIMEOUT = 5.0


class VLan:
    """A hub (``--hub``, so 802.1Q frames pass) whose control socket directory QEMU joins.

    As nixpkgs' ``VLan``: ``nr``, ``socket_dir``, ``pid``, ``process``, and a blocking
    ``stop()`` a test script may call (``vlan1.stop()``); the coroutines are ``vlan1.aio.start()``
    and ``vlan1.aio.stop()``, as for machines.
    """

    def __init__(self, nr: int, tmp_dir: Path) -> None:
        self.nr = nr
        self.socket_dir = tmp_dir / f"vde{nr}.ctl"
        self.proc: asyncio.subprocess.Process | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.aio = AsyncVLan(self)

    def __repr__(self) -> str:
        return f"<VLan {self.nr}>"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The ``vde_switch`` process (nixpkgs' name)."""
        return self.proc

    def start(self) -> None:
        """Start the switch and wait until its control socket exists."""
        run_sync(self.aio.start())

    def stop(self) -> None:
        """Stop the switch (``kill vlan (pid N)``); machines on it lose the link."""
        run_sync(self.aio.stop())

    def _clear_stale_socket(self) -> None:
        """Remove a switch directory left by a process that died; refuse one still in use."""
        ctl = self.socket_dir / "ctl"
        if not self.socket_dir.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(ctl))
        except OSError:
            log.info("removing stale VLAN switch directory %s", self.socket_dir)
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            return
        finally:
            probe.close()
        raise MachineError(
            f"VLAN {self.nr} is in use by another switch ({self.socket_dir}); give this run "
            "its own directory with XDG_RUNTIME_DIR=<a private dir>"
        )

    async def _start(self) -> None:
        log.info("start vlan %d", self.nr)
        self._clear_stale_socket()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "vde_switch", "--sock", str(self.socket_dir), "--dirmode", "0700", "--hub",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        except FileNotFoundError:
            raise MachineError(
                "vde_switch not found: VLANs need it (Debian: apt-get install vde2)"
            ) from None
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"showinfo\n")
        seen: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise MachineError(f"vde_switch for vlan {self.nr} exited: {seen}")
                    seen.append(line.decode(errors="replace").strip())
                    if b"1000 Success" in line:
                        break
        except TimeoutError:
            await self._stop()
            raise MachineError(f"vde_switch for vlan {self.nr} did not start: {seen}") from None
        if not (self.socket_dir / "ctl").exists():
            await self._stop()
            raise MachineError(f"vde_switch for vlan {self.nr} made no socket in {self.socket_dir}")
        # Keep reading its console so it never blocks on a full pipe.
        self._drainer = asyncio.get_running_loop().create_task(self._drain())
        log.info("running vlan (pid %d; ctl %s)", self.proc.pid, self.socket_dir)

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.read(4096):
            pass

    async def _stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        log.info("kill vlan (pid %d)", self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class AsyncVLan:
    """The coroutines of a :class:`VLan`, for the I/O loop and async callers."""

    def __init__(self, vlan: VLan) -> None:
        self._vlan = vlan

    async def start(self) -> None:
        """Start the switch and wait until its control socket exists."""
        await self._vlan._start()

    async def stop(self) -> None:
        """Stop the switch."""
        await self._vlan._stop()
