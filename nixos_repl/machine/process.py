"""The QEMU process: start command, environment, state dir, sockets, and the exit watch.

The start script runs as nixpkgs runs it: cwd ``vm-state-<name>`` (mode 0700), ``TMPDIR`` set to
that directory, ``USE_TMPDIR=1``, ``SHARED_DIR`` set to the shared exchange directory, the
inherited environment, and the driver's QEMU options appended. The driver listens on the
``shell`` and ``monitor`` sockets (and its own two ports); QEMU listens on ``qmp``.

No QEMU outlives the Python process, whatever the start script does (``exec`` or not, forking or
not), and the process the driver starts is the start script itself, so its pid is nixpkgs'
``machine.pid``: killing it at any moment kills the VM. The script runs in a session of its own,
so everything it starts is one process group, which a small ``bash`` reaper in that group watches:

* the reaper reads a pipe whose other end only the driver holds; when the driver dies (SIGKILL
  included) the pipe closes, and the reaper SIGKILLs the whole group. It does so too when the
  script has exited and the driver lets go of it, so nothing the script left behind survives;
* the script also gets ``PR_SET_PDEATHSIG`` = SIGKILL for the I/O thread that forked it;
* ``terminate()`` sends SIGTERM to the group (QEMU shuts down cleanly), then SIGKILL;
* every live group is SIGKILLed at interpreter exit;
* being in its own session, QEMU never sees the terminal's Ctrl-C meant for the REPL.

The exit is noticed through a pidfd, not through the pipes, so a process that keeps QEMU's
stdout open cannot hide it. ``pid`` is the script's pid (QEMU's own when the script execs
it, as NixOS's does); once QEMU has connected to the monitor it is QEMU's, read from the socket's
peer credentials, so that a script that forks QEMU is covered too.
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
import struct
import subprocess
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import MachineError

__all__ = [
    "SOCKETS",
    "QemuProcess",
    "check_start_script",
    "die_with_parent",
    "driver_qemu_options",
    "graphical_display_available",
]


PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_live: weakref.WeakSet[QemuProcess] = weakref.WeakSet()

# Driver-side listening sockets (QEMU connects to them) in the state directory.
SOCKETS = ("shell", "monitor", "nixos-repl-out", "nixos-repl-ctl")

# Starts the reaper in the background (fd $1 is the driver's pipe: when it closes, the reaper
# kills the whole process group), then becomes the start script "$@".
LAUNCH = r"""fd=$1
shift
( trap '' TERM INT HUP; read -r -u "$fd" _; kill -KILL 0 ) < /dev/null > /dev/null 2>&1 &
exec {fd}<&- "$@"
"""


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """``preexec_fn``: send ``sig`` to this child when the forking thread (the I/O loop) dies."""
    _libc.prctl(PR_SET_PDEATHSIG, sig)


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        proc.kill_now()


def check_start_script(argv0: str, name: str) -> None:
    """A start script named by a path must exist and be executable; say how to fix it."""
    script = Path(argv0)
    if "/" in argv0 and not script.exists():
        raise MachineError(
            f"{name}: start script {script} does not exist; build the machine first "
            "(for embedded guests: nixos-repl guest build tiny|debian --name NAME --out DIR)"
        )
    if script.is_dir():
        raise MachineError(f"{name}: start script {script} is a directory, not a script")
    if script.exists() and not os.access(script, os.X_OK):
        raise MachineError(f"{name}: start script {script} is not executable (chmod +x {script})")


def driver_qemu_options(state_dir: Path, allow_reboot: bool, graphical: bool) -> list[str]:
    """What the driver appends to the start script, as nixpkgs does, plus nixos-repl's channel.

    Two extra virtio-serial ports (on their own bus, so the backdoor stays /dev/hvc0) carry command
    text and output (``out``) and interrupt requests (``ctl``).
    """
    opts = [
        "-qmp", f"unix:{state_dir / 'qmp'},server=on,wait=off",
        "-monitor", f"unix:{state_dir / 'monitor'}",
        "-chardev", f"socket,id=shell,path={state_dir / 'shell'}",
        "-device", "virtio-serial",
        "-device", "virtconsole,chardev=shell",
        # A guest tty for interactive shells (hvc1); QEMU listens, front ends attach to it.
        "-chardev", f"socket,id=nixos-repl-tty,path={state_dir / 'tty'},server=on,wait=off",
        "-device", "virtconsole,chardev=nixos-repl-tty,name=org.nixos-repl.tty",
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


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a connected UNIX socket."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _, _ = struct.unpack("3i", creds)
    return pid or None


class QemuProcess:
    """One run of a start script: the process group, its pipes and the driver's sockets."""

    def __init__(self, name: str, start_command: str, state_dir: Path) -> None:
        self.name = name
        self.start_command = start_command
        self.state_dir = state_dir
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qemu_pid: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self._listeners: dict[str, socket.socket] = {}
        self._accepted: list[socket.socket] = []  # closed with the listeners, adopted or not
        self._pidfd: int | None = None
        self._pipes: list[int] = []
        self._reaper: int | None = None  # the driver's end of the reaper's pipe
        self._stdout_done = asyncio.Event()
        self._stderr_done = asyncio.Event()
        self._exit_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's pid once it connected to the monitor, else the start script's."""
        if self.qemu_pid is not None:
            return self.qemu_pid
        return self.proc.pid if self.proc is not None else None

    def argv(self, extra: list[str]) -> list[str]:
        cmd = self.start_command
        argv = [cmd] if os.path.exists(cmd) else shlex.split(cmd)
        if not argv:
            raise MachineError(f"{self.name}: the start command is empty")
        check_start_script(argv[0], self.name)
        return argv + extra

    def _listen(self) -> None:
        for name in SOCKETS:
            path = self.state_dir / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listeners[name] = sock
            sock.bind(str(path))
            sock.listen(1)
            sock.setblocking(False)

    def spawn(
        self,
        extra_args: list[str],
        env: Mapping[str, str],
        on_output: Callable[[bytes], None],
    ) -> None:
        """Start the script (synchronously: nothing can interrupt it half-way).

        ``on_output`` gets QEMU's stdout and stderr (the serial console) as they arrive, and
        ``b""`` once at the end of each.
        """
        argv = self.argv(extra_args)
        self._listen()
        self.log.info("starting vm")
        reaper, self._reaper = os.pipe()
        try:
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", LAUNCH, "nixos-repl-start", str(reaper), *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.state_dir,
                env=dict(env),
                start_new_session=True,
                pass_fds=(reaper,),
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            self._release_group()
            self.close_sockets()
            raise MachineError(f"{self.name}: cannot run start script {argv[0]}: {e}") from e
        finally:
            os.close(reaper)
        _live.add(self)
        loop = asyncio.get_running_loop()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, done, tail in (
            (self.proc.stdout, self._stdout_done, None),
            (self.proc.stderr, self._stderr_done, self.stderr_tail),
        ):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self._pipes.append(fd)
            loop.add_reader(fd, self._on_pipe, fd, on_output, done, tail)
        self._pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_pipe(
        self,
        fd: int,
        sink: Callable[[bytes], None],
        done: asyncio.Event,
        tail: collections.deque[str] | None,
    ) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if tail is not None and data:
            tail.extend(data.decode(errors="replace").splitlines())
        sink(data)
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            done.set()

    def _on_exit(self) -> None:
        assert self.proc is not None and self._pidfd is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self.returncode = self.proc.wait()
        _live.discard(self)
        self._exit_task = loop.create_task(self._finish_exit())

    async def _finish_exit(self) -> None:
        # Let QEMU's last words reach the console (unless something else holds the pipes).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._stdout_done.wait()
                await self._stderr_done.wait()
        self._close_pipes()
        self.close_sockets()
        self._release_group()
        self.exited.set()

    def _release_group(self) -> None:
        """Let the reaper go: it kills whatever is left of the process group."""
        if self._reaper is not None:
            os.close(self._reaper)
            self._reaper = None

    def _close_pipes(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._pipes:
            loop.remove_reader(fd)
        self._pipes.clear()
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    async def accept(self, name: str, timeout: float) -> socket.socket:
        """Accept QEMU's connection on a driver socket, or fail if QEMU exits first.

        The connection is recorded before anyone waits for it, so an interrupted start still
        closes it (``close_sockets``).
        """
        loop = asyncio.get_running_loop()
        listener = self._listeners[name]
        fd = listener.fileno()
        connected: asyncio.Future[socket.socket] = loop.create_future()

        def ready() -> None:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                conn = None
                if not connected.done():
                    connected.set_exception(e)
            loop.remove_reader(fd)
            if conn is not None:
                self._accepted.append(conn)
                conn.setblocking(False)
                if not connected.done():
                    connected.set_result(conn)

        loop.add_reader(fd, ready)
        exited = asyncio.ensure_future(self.exited.wait())
        waiting: set[asyncio.Future[Any]] = {connected, exited}
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
            loop.remove_reader(fd)  # also when the listener is closed: fd numbers are reused
        if connected in done:
            conn = connected.result()
            if name == "monitor":
                self.qemu_pid = _peer_pid(conn)
            return conn
        connected.cancel()
        if exited in done:
            raise MachineError(
                f"{self.name}: QEMU exited with code {self.returncode} before connecting to the "
                f"{name} socket.\n{self.describe_exit()}"
            )
        raise MachineError(
            f"{self.name}: QEMU did not connect to the {name} socket within {timeout:g} s. "
            f'Does the start script pass its arguments ("$@") on to QEMU?\n{self.describe_exit()}'
        )

    def describe_exit(self) -> str:
        tail = "\n".join(self.stderr_tail) or "(nothing)"
        return f"QEMU stderr (last lines):\n{tail}"

    def write_stdin(self, data: bytes) -> None:
        if self.proc is None or self.proc.stdin is None or self.exited.is_set():
            raise MachineError(f"{self.name}: QEMU is not running")
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_sockets(self) -> None:
        """Close the driver's listening sockets and every connection accepted on them."""
        loop = asyncio.get_running_loop()
        for sock in self._listeners.values():
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())  # a pending accept() must not outlive it
        for sock in [*self._listeners.values(), *self._accepted]:
            sock.close()
        self._listeners.clear()
        self._accepted.clear()

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill_now(self) -> None:
        """SIGKILL the whole process group, from any thread, without waiting."""
        self._signal_group(signal.SIGKILL)

    async def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM to the group, then SIGKILL after ``timeout``; returns once it is gone."""
        if self.proc is None or self.exited.is_set():
            self.close_sockets()
            return
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            self.kill_now()
            await self.exited.wait()
        # Whatever the script left behind in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
