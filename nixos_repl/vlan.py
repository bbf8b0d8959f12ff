"""One ``vde_switch`` per VLAN, as nixpkgs runs it, exported as ``QEMU_VDE_SOCKET_<N>``.

When containers are in the run, each switch also gets nixpkgs' ``vde_plug2tap -s <sock>
vde-tap<N>``: a tap interface in the driver's network namespace carrying the VLAN's frames. A
container's start script (``run-<name>-nspawn``) puts that tap on the bridge ``br<N>`` it shares
with the other containers of the VLAN, so containers and VMs are on one Ethernet segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from pathlib import Path

from .errors import MachineError
from .loop import run_sync
from .machine.process import die_with_parent

__all__ = ["VLan"]

log = logging.getLogger(__name__)
START_TIMEOUT = 5.0
TAP_TIMEOUT = 5.0  # seconds for vde_plug2tap's interface to appear


def link_exists(name: str) -> bool:
    """Whether this network namespace has a link ``name`` (asked of the kernel: /sys/class/net
    may be another namespace's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


async def _spawn(
    argv: list[str], why: str, *, stdin: int, stdout: int, stderr: int
) -> asyncio.subprocess.Process:
    """Start a vde2 program that dies with the I/O thread; a missing one says what to install."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=stderr, preexec_fn=die_with_parent
        )
    except FileNotFoundError:
        raise MachineError(f"{argv[0]} not found: {why} (Debian: apt-get install vde2)") from None


class VLan:
    """A hub (``--hub``, so 802.1Q frames pass) whose control socket directory QEMU joins.

    As nixpkgs' ``VLan``: ``nr``, ``socket_dir``, ``pid``, ``process``, and a blocking
    ``stop()`` a test script may call (``vlan1.stop()``); the coroutines are ``vlan1.aio.start()``
    and ``vlan1.aio.stop()``, as for machines. With ``tap`` (containers are in the run) it also
    runs ``vde_plug2tap`` (``plug_process``) for the tap ``tap_name`` (``vde-tap<N>``).
    """

    def __init__(self, nr: int, tmp_dir: Path, tap: bool = False) -> None:
        self.nr = nr
        self.socket_dir = tmp_dir / f"vde{nr}.ctl"
        self.tap_name = f"vde-tap{nr}"
        self.tap = tap
        self.proc: asyncio.subprocess.Process | None = None
        self.plug_process: asyncio.subprocess.Process | None = None
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
        self.proc = await _spawn(
            ["vde_switch", "--sock", str(self.socket_dir), "--dirmode", "0700", "--hub"],
            "VLANs need it",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
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
        if self.tap:
            try:
                await self._start_tap()
            except BaseException:
                await self._stop()
                raise
        log.info("running vlan (pid %d; ctl %s)", self.proc.pid, self.socket_dir)

    async def _start_tap(self) -> None:
        """nixpkgs' ``vde_plug2tap -s <sock> vde-tap<N>``; waits until the tap exists, so that a
        container started next finds it (a tap that cannot be made is a warning, as in nixpkgs:
        the containers of this VLAN are then cut off from its VMs)."""
        if self.plug_process is not None and self.plug_process.returncode is None:
            return
        self.tap = True
        log.info("creating tap interface %s", self.tap_name)
        if link_exists(self.tap_name):
            raise MachineError(
                f"the tap interface {self.tap_name} exists already (another test driver with "
                f"VLAN {self.nr} and containers runs in this network namespace); stop it, or "
                "run this one in a network namespace of its own (unshare --net)"
            )
        plug = await _spawn(
            ["vde_plug2tap", "-s", str(self.socket_dir), self.tap_name],
            "containers on VLANs need it",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.plug_process = plug
        deadline = time.monotonic() + TAP_TIMEOUT
        while not link_exists(self.tap_name):
            if plug.returncode is not None or time.monotonic() > deadline:
                await self._stop_tap()
                assert plug.stderr is not None
                why = (await plug.stderr.read()).decode(errors="replace").strip()
                log.warning(
                    "vde_plug2tap made no tap %s (%s): containers on VLAN %d cannot reach its VMs; "
                    "it needs /dev/net/tun and CAP_NET_ADMIN",
                    self.tap_name,
                    why or f"status {plug.returncode}",
                    self.nr,
                )
                return
            await asyncio.sleep(0.01)

    async def _stop_tap(self) -> None:
        plug = self.plug_process
        if plug is None or plug.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            plug.terminate()
        try:
            await asyncio.wait_for(plug.wait(), 5)
        except TimeoutError:
            plug.kill()
            await plug.wait()

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.read(4096):
            pass

    async def _stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        log.info("kill vlan (pid %d)", self.proc.pid)
        await self._stop_tap()
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
        """Stop the switch (and its tap plug)."""
        await self._vlan._stop()

    async def start_tap(self) -> None:
        """Plug the tap ``vde-tap<N>`` in (containers joined the run after the switch started)."""
        await self._vlan._start_tap()
