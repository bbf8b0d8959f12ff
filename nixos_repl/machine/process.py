"""The QEMU process: start command, environment, state dir, sockets, and the exit watch.

The start script runs as nixpkgs runs it: cwd ``vm-state-<name>`` (mode 0700), ``TMPDIR`` set to
that directory, ``USE_TMPDIR=1``, ``SHARED_DIR`` set to the shared exchange directory, the
inherited environment, and the driver's QEMU options appended. The driver listens on the
``shell`` and ``monitor`` sockets; QEMU listens on ``qmp``.

No QEMU outlives the Python process: the child gets ``PR_SET_PDEATHSIG`` (SIGKILL when the I/O
thread that forked it dies, which is when the process dies, SIGKILL included), and every live
process is killed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from ..errors import MachineError

__all__ = ["SOCKETS", "QemuProcess", "die_with_parent"]

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_live: weakref.WeakSet[QemuProcess] = weakref.WeakSet()

# Driver-side listening sockets (QEMU connects to them) in the state directory.
SOCKETS = ("shell", "monitor", "nixos-repl-out", "nixos-repl-ctl")


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the forking thread (the I/O loop) dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        proc.kill_now()


def driver_qemu_options(state_dir: Path, allow_reboot: bool, graphical: bool) -> list[str]:
    """What the driver appends to the start script, as nixpkgs does, plus nixos-repl's channel.

    Two extra virtio-serial ports (on their own bus, so the backdoor stays /dev/hvc0) carry command
    output (whose guest-side close QEMU reports as a QMP event) and interrupt requests.
    """
    opts = [
        "-qmp", f"unix:{state_dir / 'qmp'},server=on,wait=off",
        "-monitor", f"unix:{state_dir / 'monitor'}",
        "-chardev", f"socket,id=shell,path={state_dir / 'shell'}",
        "-device", "virtio-serial",
        "-device", "virtconsole,chardev=shell",
        "-device", "virtio-rng-pci",
        "-serial", "stdio",
    ]  # fmt: skip
    if not allow_reboot:
        opts.append("-no-reboot")
    for port in ("out", "ctl"):
        opts += ["-chardev", f"socket,id=nixos-repl-{port},path={state_dir / f'nixos-repl-{port}'}"]
    opts += ["-device", "virtio-serial,id=nixos-repl-serial"]
    for nr, port in enumerate(("out", "ctl"), start=1):
        opts += [
            "-device",
            f"virtserialport,bus=nixos-repl-serial.0,nr={nr},chardev=nixos-repl-{port},"
            f"name=org.nixos-repl.{port},id=nixos-repl-{port}",
        ]
    if not graphical:
        opts.append("-nographic")
    return opts


def graphical_display_available() -> bool:
    return "DISPLAY" in os.environ or "WAYLAND_DISPLAY" in os.environ


class QemuProcess:
    """One run of a start script: the process, its pipes and the driver's accepted sockets."""

    def __init__(self, name: str, start_command: str, state_dir: Path) -> None:
        self.name = name
        self.start_command = start_command
        self.state_dir = state_dir
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self._listeners: dict[str, socket.socket] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self, extra: list[str]) -> list[str]:
        cmd = self.start_command
        argv = [cmd] if os.path.exists(cmd) else shlex.split(cmd)
        if not argv:
            raise MachineError(f"{self.name}: the start command is empty")
        script = Path(argv[0])
        if "/" in argv[0] and not script.exists():
            raise MachineError(
                f"{self.name}: start script {script} does not exist; build the machine first "
                "(for embedded guests: nixos-repl guest build tiny --name NAME --out DIR)"
            )
        if script.exists() and not os.access(script, os.X_OK):
            raise MachineError(
                f"{self.name}: start script {script} is not executable (chmod +x {script})"
            )
        return argv + extra

    def _listen(self) -> None:
        for name in SOCKETS:
            path = self.state_dir / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(1)
            sock.setblocking(False)
            self._listeners[name] = sock

    async def spawn(
        self,
        extra_args: list[str],
        env: Mapping[str, str],
        on_stdout: Callable[[bytes], Awaitable[None]],
    ) -> None:
        argv = self.argv(extra_args)
        self._listen()
        self.log.info("starting vm")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.state_dir,
                env=dict(env),
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            self.close_listeners()
            raise MachineError(f"{self.name}: cannot run start script {argv[0]}: {e}") from e
        _live.add(self)
        self._tasks = [
            asyncio.create_task(self._pump(self.proc.stdout, on_stdout, None)),
            asyncio.create_task(self._pump(self.proc.stderr, on_stdout, self.stderr_tail)),
            asyncio.create_task(self._watch()),
        ]
        self.log.info("QEMU running (pid %d)", self.proc.pid)

    async def _pump(
        self,
        stream: asyncio.StreamReader | None,
        sink: Callable[[bytes], Awaitable[None]],
        tail: collections.deque[str] | None,
    ) -> None:
        assert stream is not None
        while True:
            data = await stream.read(65536)
            if tail is not None and data:
                tail.extend(data.decode(errors="replace").splitlines())
            await sink(data)
            if not data:
                return

    async def _watch(self) -> None:
        assert self.proc is not None
        self.returncode = await self.proc.wait()
        # Let the pumps drain what QEMU wrote before exiting, so error messages are complete.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks[:2]), 1.0)
        _live.discard(self)
        self.close_listeners()
        self.exited.set()

    async def accept(self, name: str, timeout: float) -> socket.socket:
        """Accept QEMU's connection on a driver socket, or fail if QEMU exits first."""
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(self._listeners[name]))
        exited = asyncio.ensure_future(self.exited.wait())
        done, _ = await asyncio.wait(
            {accept, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        exited.cancel()
        if accept in done:
            conn, _ = accept.result()
            conn.setblocking(False)
            return conn
        accept.cancel()
        if exited in done:
            raise MachineError(
                f"{self.name}: QEMU exited with code {self.returncode} before connecting to the "
                f"{name} socket.\n{self.describe_exit()}"
            )
        raise MachineError(f"{self.name}: QEMU did not connect to the {name} socket in {timeout} s")

    def describe_exit(self) -> str:
        tail = "\n".join(self.stderr_tail) or "(nothing)"
        return f"QEMU stderr (last lines):\n{tail}"

    def write_stdin(self, data: bytes) -> None:
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise MachineError(f"{self.name}: QEMU is not running")
        self.proc.stdin.write(data)

    def close_listeners(self) -> None:
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()

    def kill_now(self) -> None:
        """SIGKILL from any thread, without waiting (used at interpreter exit)."""
        if self.proc is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    async def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; returns once the process is gone."""
        if self.proc is None or self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            self.kill_now()
            await self.exited.wait()
