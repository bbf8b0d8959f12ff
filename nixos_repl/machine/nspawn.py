"""A systemd-nspawn container: nixpkgs' ``NspawnMachine`` (NixOS's ``containers.<name>``).

The container is started from its ``run-<name>-nspawn`` script with nothing in its environment
but ``RUN_NSPAWN_ROOT_DIR`` (the state directory), ``RUN_NSPAWN_SHARED_DIR`` and
``NOTIFY_SOCKET``, a datagram socket the driver binds and drains for the container's whole life
(its systemd re-sends ``READY=1`` on every daemon-reexec). Commands wait for ``READY=1`` and
``X_NSPAWN_LEADER_PID=``, then run through ``nsenter`` into the leader's namespaces with
nixpkgs' shell prelude; the journal (``<state>/var/log/journal``) is followed into the console
log, line by line, as the serial console of a VM is.

``NspawnLifecycle.connect()`` returns an ``NspawnChannel`` whose ``execute`` has the backdoor
shell's signature, so every shell-based coroutine of ``AsyncMachine`` works unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ..errors import MachineError
from ..loop import run_sync
from .api import AsyncMachine
from .base import BaseMachine
from .console import Console
from .lifecycle import MachineState, RunState
from .process import die_with_parent
from .timing import DEFAULT_TIMEOUT, Duration, nested, seconds

if TYPE_CHECKING:
    from .actions import ActionObserver
    from .api import MachineParts

__all__ = [
    "AsyncNspawnMachine",
    "HostView",
    "NspawnChannel",
    "NspawnLifecycle",
    "NspawnMachine",
    "container_name_from_start_command",
    "in_nix_sandbox",
    "nix_sandbox_preparation",
    "prepare_nix_sandbox",
    "processes_in",
    "x11_key_name",
]

# nixpkgs' prelude of every command run in a container.
PRELUDE = (
    "set -eo pipefail; export USER=root HOME=/root DISPLAY=:0.0; source /etc/profile; set -u; "
)
NSENTER_NAMESPACES = ("--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup")
READY_TIMEOUT = 300.0  # seconds for READY=1 after the start (a VM's backdoor gets as long)
RELEASE_GRACE = 30.0  # nixpkgs: SIGTERM, then SIGKILL after 30 s
OUTPUT_LINES = 20  # lines of the start script's output kept for error messages


# nixpkgs' translation of the driver's key names (QEMU's) to X11's, for ``xdotool key``.
X11_KEY_ALIASES = {
    "\n": "Return",
    "alt": "Alt_L",
    "alt_r": "Alt_R",
    "backspace": "BackSpace",
    "delete": "Delete",
    "down": "Down",
    "esc": "Escape",
    "kp_enter": "KP_Enter",
    "left": "Left",
    "meta_l": "Super_L",
    "meta_r": "Super_R",
    "ret": "Return",
    "right": "Right",
    "shift": "Shift_L",
    "spc": "space",
    "tab": "Tab",
    "up": "Up",
}
X11_MODIFIER_ALIASES = {
    "alt": "alt",
    "ctrl": "ctrl",
    "meta_l": "super",
    "meta_r": "super",
    "shift": "shift",
}


def x11_key_name(key: str) -> str:
    """A key or chord of the driver's vocabulary (``ctrl-alt-f1``) as an X11 chord
    (``ctrl+alt+F1``), as nixpkgs translates it."""
    parts = key.split("-")
    modifiers = []
    while len(parts) > 1 and parts[0] in X11_MODIFIER_ALIASES:
        modifiers.append(X11_MODIFIER_ALIASES[parts.pop(0)])
    base = "-".join(parts)
    base = X11_KEY_ALIASES.get(base, base)
    if re.fullmatch(r"f\d+", base):
        base = base.upper()
    return "+".join([*modifiers, base])


def container_name_from_start_command(start_command: str) -> str:
    match = re.search("run-(.+)-nspawn", os.path.basename(start_command))
    if match is None:
        raise MachineError(
            f"cannot tell the container's name from {start_command!r}: name the start script "
            "run-<name>-nspawn, or pass name="
        )
    return match.group(1)


# -- the Nix sandbox ---------------------------------------------------------------------------


def in_nix_sandbox(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the driver runs in a Nix build (``NIX_BUILD_TOP``), not in a ``nix-shell``
    (``IN_NIX_SHELL``), which sets it too."""
    return "NIX_BUILD_TOP" in environ and "IN_NIX_SHELL" not in environ


@dataclass(frozen=True)
class HostView:
    """What systemd-nspawn needs of the host that a Nix build sandbox may lack."""

    run_writable: bool  # /run
    var_run_is_run: bool  # /var/run is /run
    cgroup2: bool  # a cgroup2 is mounted on /sys/fs/cgroup
    os_release: bool  # /etc/os-release is a file
    machine_id: bool  # /etc/machine-id is a file, not empty

    @classmethod
    def read(cls) -> HostView:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        machine_id = Path("/etc/machine-id")
        return cls(
            run_writable=os.access("/run", os.W_OK),
            var_run_is_run=os.path.exists("/var/run") and os.path.samefile("/var/run", "/run"),
            cgroup2=any(m[1:3] == ["/sys/fs/cgroup", "cgroup2"] for m in mounts),
            os_release=os.path.isfile("/etc/os-release"),
            machine_id=machine_id.is_file() and machine_id.stat().st_size > 0,
        )


def nix_sandbox_preparation(view: HostView) -> list[list[str]]:
    """The commands nixpkgs' driver runs before containers, for what ``view`` lacks: a tmpfs on
    an unwritable /run (with /run/netns), /var/run a link to /run, cgroup2 on /sys/fs/cgroup
    (systemd-nspawn refuses a host without it), an /etc/os-release (nspawn's check of the
    host) and a machine id."""
    steps = []
    if not view.run_writable:
        steps += [["mkdir", "-p", "/run"], ["mount", "-t", "tmpfs", "none", "/run"]]
        steps += [["mkdir", "-p", "/run/netns"]]
    if not view.var_run_is_run:
        steps += [["mkdir", "-p", "/var"], ["ln", "-s", "/run", "/var/run"]]
    if not view.cgroup2:
        steps += [["mkdir", "-p", "/sys/fs/cgroup"]]
        steps += [["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"]]
    if not view.os_release:
        steps += [["touch", "/etc/os-release"]]
    if not view.machine_id:
        steps += [["systemd-machine-id-setup"]]
    return steps


def prepare_nix_sandbox(
    view: HostView | None = None,
    run: Callable[[list[str]], object] = lambda argv: subprocess.run(argv, check=True),
    euid: int | None = None,
) -> list[list[str]]:
    """Make a Nix build sandbox fit for systemd-nspawn, as nixpkgs' driver does before its
    containers (root only); returns the commands run."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise MachineError(f"systemd-nspawn requires root to work. You are {euid}")
    steps = nix_sandbox_preparation(view if view is not None else HostView.read())
    for argv in steps:
        logging.getLogger(__name__).info("preparing the sandbox for containers: %s", " ".join(argv))
        run(argv)
    return steps


def processes_in(state_dir: Path) -> list[tuple[int, str]]:
    """(pid, name) of the live processes that use ``state_dir``: its start script and
    systemd-nspawn work in it, and the container's own processes (which outlive a
    systemd-nspawn killed outright) have it in their mount namespace (the root or a bind mount
    of it). Holds for nixpkgs' start scripts as for ours."""
    root = os.path.realpath(state_dir)
    own_mounts = os.readlink("/proc/self/ns/mnt")
    namespaces: dict[str, bool] = {}  # mount namespace -> whether it mounts from state_dir
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            mounts = os.readlink(entry / "ns/mnt")
            if mounts != own_mounts and mounts not in namespaces:
                table = (entry / "mountinfo").read_text()
                namespaces[mounts] = f"{root}/" in table or f"{root} " in table
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/") or namespaces.get(mounts, False):
            found.append((int(entry.name), name))
    return found


def _in_other_pid_namespace(pid: int) -> bool:
    """Whether ``pid`` is a live process of another PID namespace than ours (a container's)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        theirs = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and theirs != os.readlink("/proc/self/ns/pid")


class NspawnChannel:
    """Commands in a running container, through ``nsenter`` into its leader's namespaces."""

    def __init__(self, name: str, leader: int) -> None:
        self.name = name
        self.leader = leader
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            raise MachineError("nsenter is missing: install it with `apt-get install util-linux`")
        self.nsenter = nsenter

    async def execute(
        self, command: str, timeout: float | None = None, wait: bool = True
    ) -> tuple[int, bytes]:
        """Run ``command``; returns (status, stdout). As nixpkgs: after ``timeout`` the command
        is killed and ``subprocess.TimeoutExpired`` raised; ``wait`` is ignored. Cancellation
        kills the command and what it started (its process group), then re-raises."""
        argv = [self.nsenter, "--target", str(self.leader), *NSENTER_NAMESPACES]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "/bin/sh",
            "-c",
            PRELUDE + command,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            await _kill_group(proc)
            raise subprocess.TimeoutExpired(command, cast(float, timeout)) from None
        except BaseException:
            await asyncio.shield(_kill_group(proc))
            raise
        assert proc.returncode is not None
        return proc.returncode, out


def _power_off_with_parent() -> None:
    die_with_parent(signal.SIGTERM)  # systemd-nspawn powers the container off on SIGTERM


async def _kill_group(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """Kill the command's process group, and wait until the container has reaped all of it
    (the next command must not see it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        await asyncio.sleep(0.01)


class NspawnLifecycle(RunState):
    """Owns one container's run: the start script's process, the notify socket, the journal."""

    kind = "container"

    def __init__(
        self,
        name: str,
        start_command: str,
        state_dir: Path,
        shared_dir: Path,
        tmp_dir: Path,
        console: Console,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.start_command = start_command
        self.state_dir = state_dir
        self.shared_dir = shared_dir
        self.console = console
        self.sock_path = tmp_dir / f"{name}-nspawn.sock"
        self.log = logging.getLogger(f"nixos_repl.machine.{name}")
        self.state = MachineState.DEFINED
        self.allow_reboot = False
        self.connect_timeout: Duration = READY_TIMEOUT
        self.crash_report: str | None = None
        self.started_at: float | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.leader: int | None = None
        self._ready = False
        self._notified = asyncio.Event()  # a READY=1 or leader pid arrived (or the run ended)
        self._stopped = asyncio.Event()
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._on_change = on_change
        self._start_lock = asyncio.Lock()
        self._channel: NspawnChannel | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.state.running else None

    # -- start ---------------------------------------------------------------------------------

    async def start(self, allow_reboot: bool = False) -> None:
        """Start the container unless it runs; does not wait for it to boot."""
        async with self._start_lock:
            if self.state.running:
                return
            await self._start()

    async def start_if_needed(self) -> None:
        self._check_crashed()
        await self.start()

    async def _start(self) -> None:
        script = os.path.abspath(self.start_command)  # it runs in the state directory
        if not os.path.isfile(script):
            raise MachineError(f"{self.name}: the start script {script} does not exist")
        if not os.access(script, os.X_OK):
            raise MachineError(
                f"{self.name}: the start script {script} is not executable (chmod +x it)"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.shared_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.crash_report = None
        self.leader = None
        self._ready = False
        self._notified = asyncio.Event()
        self._stopped = asyncio.Event()
        self._output.clear()
        self.console.reset(self.state_dir / "console.log")
        self.sock_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.sock_path))
        sock.setblocking(False)
        self._sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._drain_notify_socket)
        try:
            process = await asyncio.create_subprocess_exec(
                script,
                cwd=self.state_dir,
                env={
                    "RUN_NSPAWN_ROOT_DIR": str(self.state_dir),
                    "RUN_NSPAWN_SHARED_DIR": str(self.shared_dir),
                    "NOTIFY_SOCKET": str(self.sock_path),
                },
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Powered off when this process dies, however it dies (a closed terminal, a
                # killed kernel), as QEMU is killed: the scripts exec systemd-nspawn.
                preexec_fn=_power_off_with_parent,
            )
        except BaseException:
            self._close_sock()
            raise
        self.process = process
        self.started_at = time.time()
        self.log.info("systemd-nspawn running (pid %d)", process.pid)
        self._set_state(MachineState.STARTING)
        self._tasks = [
            loop.create_task(self._read_output(process)),
            loop.create_task(self._follow_journal(process)),
            loop.create_task(self._watch_exit(process)),
        ]

    def _drain_notify_socket(self) -> None:
        """Read every datagram queued (READY=1 comes again on each daemon-reexec)."""
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, OSError):
                return
            for line in data.decode(errors="replace").splitlines():
                if line == "READY=1":
                    self._ready = True
                elif line.startswith("X_NSPAWN_LEADER_PID="):
                    with contextlib.suppress(ValueError):
                        self.leader = int(line.partition("=")[2])
            self._notified.set()

    def _close_sock(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self.sock_path.unlink(missing_ok=True)

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            self.log.debug("systemd-nspawn: %s", line)

    async def _follow_journal(self, process: asyncio.subprocess.Process) -> None:
        """``journalctl --follow`` over the container's journal, into the console log."""
        journal = self.state_dir / "var/log/journal"
        seen = 0  # lines already fed: a restarted journalctl prints them again
        while process.returncode is None:
            # journalctl gives up at once while there is no journal file yet.
            if not any(journal.glob("*/*.journal")):
                await asyncio.sleep(0.1)
                continue
            follower = await asyncio.create_subprocess_exec(
                "journalctl",
                "--follow",
                f"--directory={journal}",
                "--lines=all",
                "--output=short-monotonic",
                "--quiet",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert follower.stdout is not None
            lines = 0
            try:
                async for raw in follower.stdout:
                    lines += 1
                    if lines > seen:
                        seen = lines
                        self.console.feed(raw)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    follower.kill()
                await asyncio.shield(follower.wait())
            await asyncio.sleep(1)  # journalctl stopped while the container runs: again

    async def _watch_exit(self, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        await asyncio.gather(self._tasks[0], return_exceptions=True)  # the rest of its output
        # systemd-nspawn exits 0 when the container powered off: asked from inside (nixpkgs'
        # ``succeed("poweroff")`` then ``wait_for_shutdown()``) that is not a crash.
        clean = self.state is MachineState.STOPPING or code == 0
        if not clean:
            tail = "\n".join(f"    {line}" for line in self._output) or "    (nothing)"
            self.crash_report = (
                f"container '{self.name}' crashed: systemd-nspawn (pid {process.pid}) exited "
                f"with status {code}.\nIts last output:\n{tail}\n"
                f"Call {self.name}.start() to start it again."
            )
            self.log.error("%s", self.crash_report)
        await self._teardown()
        self._set_state(MachineState.OFF if clean else MachineState.CRASHED)
        self._stopped.set()
        self._notified.set()

    async def _kill_orphaned_leader(self, grace: float = 5.0) -> None:
        """A systemd-nspawn killed outright leaves its container running (its init is not its
        child's to take down): end it, so that nothing of the container outlives it."""
        leader = self.leader
        if leader is None or not _in_other_pid_namespace(leader):
            return
        self.log.warning(
            "%s: killing the container left by systemd-nspawn (pid %d)", self.name, leader
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader, signal.SIGKILL)  # PID 1 of its namespace: everything in it dies
        deadline = time.monotonic() + grace
        while _in_other_pid_namespace(leader) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _teardown(self) -> None:
        await self._kill_orphaned_leader()
        self._close_sock()
        for task in self._tasks[1:2]:  # the journal follower (output and watcher end alone)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._channel = None
        self.console.close()

    # -- commands ------------------------------------------------------------------------------

    async def connect(self) -> NspawnChannel:
        """Start the container if needed and wait for READY=1 and its leader's pid."""
        await self.start_if_needed()
        if self._channel is not None and self.state is MachineState.UP:
            return self._channel
        limit = seconds(self.connect_timeout)
        deadline = None if limit is None else time.monotonic() + limit
        with nested(self.log, "waiting for the container to finish booting"):
            while not (self._ready and self.leader is not None):
                self._check_crashed()
                if not self.state.running:
                    raise MachineError(f"container '{self.name}' is {self.state}")
                self._notified.clear()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    await self.release()
                    raise MachineError(
                        f"container '{self.name}' sent no READY=1 on its notify socket within "
                        f"{limit:.0f} s (stopped it); see its journal in {self.state_dir}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._notified.wait(), remaining)
        assert self.leader is not None
        self._channel = NspawnChannel(self.name, self.leader)
        self._set_state(MachineState.UP)
        return self._channel

    # -- stop ----------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """nixpkgs: ``systemctl poweroff`` in the container, then wait for it to exit."""
        if not self.state.running:
            return
        channel = await self.connect()
        self._set_state(MachineState.STOPPING)
        await channel.execute("systemctl poweroff")
        await self.wait_for_shutdown()

    async def release(self) -> None:
        """SIGTERM to systemd-nspawn (the container powers off), SIGKILL after 30 s."""
        process = self.process
        if process is None or not self.state.running:
            return
        self.log.info("kill NspawnMachine (pid %d)", process.pid)
        self._set_state(MachineState.STOPPING)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped.wait()), RELEASE_GRACE)
        except TimeoutError:
            self.log.error(
                "NspawnMachine %s (pid %d) did not exit after SIGTERM; sending SIGKILL",
                self.name,
                process.pid,
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await self._stopped.wait()


class AsyncNspawnMachine(AsyncMachine):
    """A container's coroutines: the shared ones, and the X11 keyboard through ``xdotool`` in
    the container (nixpkgs' ``NspawnMachine``)."""

    async def send_key(
        self,
        key: str,
        delay: Duration | None = dt.timedelta(milliseconds=10),
        log: bool | None = True,
    ) -> None:
        """Press ``key`` on the container's X11 display (``DISPLAY=:0.0``): one printable
        character is typed (``xdotool type``), anything else is a key chord of the driver's
        names (``ctrl-alt-f1``, ``ret``, ``meta_l-l``) sent with ``xdotool key``. Then waits
        ``delay``."""
        if len(key) == 1 and key.isprintable():
            argv = ["xdotool", "type", "--clearmodifiers", "--delay", "0", "--", key]
        else:
            argv = ["xdotool", "key", "--clearmodifiers", x11_key_name(key)]
        with nested(self._m.logger, f"sending key {key!r}") if log else contextlib.nullcontext():
            await self.succeed(shlex.join(argv))
            wait = seconds(delay)
            if wait:
                await asyncio.sleep(wait)

    async def send_chars(
        self, chars: str, delay: Duration | None = dt.timedelta(milliseconds=10)
    ) -> None:
        """Type ``chars`` one key at a time (``\\n`` is Return)."""
        with nested(self._m.logger, f"sending keys {chars!r}"):
            for char in chars:
                await self.send_key(char, delay, log=False)

    async def _x_server_runs(self) -> bool:
        """One try of ``wait_for_x`` in a container, as nixpkgs: ``xwininfo -root`` answers."""
        status, _ = await self.execute("xwininfo -root >/dev/null 2>&1")
        return status == 0


class NspawnMachine(BaseMachine):
    """A systemd-nspawn container started from a ``run-<name>-nspawn`` script (nixpkgs'
    ``NspawnMachine``, root only). ``aio`` has every method as a coroutine."""

    lifecycle: NspawnLifecycle
    aio: AsyncNspawnMachine

    def __init__(
        self,
        start_command: str,
        *,
        tmp_dir: Path,
        out_dir: Path,
        name: str | None = None,
        keep_machine_state: bool = False,
        callbacks: list[Callable[[], None]] | None = None,
        on_state_change: Callable[[NspawnMachine], None] | None = None,
        observers: list[ActionObserver] | None = None,
    ) -> None:
        start_command = str(start_command)
        name = name or container_name_from_start_command(start_command)
        self._init_base(start_command, name, tmp_dir, out_dir, keep_machine_state, callbacks)
        # Told of every API call (the session recording), as a VM's are.
        self.observers = observers if observers is not None else []
        self.lifecycle = NspawnLifecycle(
            self.name,
            self.start_command,
            self.state_dir,
            self.shared_dir,
            self.tmp_dir,
            self.console,
            on_change=(lambda: on_state_change(self)) if on_state_change is not None else None,
        )
        # The coroutines use of a container what both kinds have (commands, log, stop); the
        # QEMU-only ones are not exposed on this class.
        self.aio = AsyncNspawnMachine(cast("MachineParts", self))
        self.shared_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.state_dir.exists() and (users := processes_in(self.state_dir)):
            pid, program = users[0]
            raise MachineError(
                f"{self.name}: the container root {self.state_dir} is in use by a container "
                f"that is still running ({program}, pid {pid}); stop it, or give this run its "
                "own directory with XDG_RUNTIME_DIR=<a private dir>"
            )
        if not keep_machine_state and self.state_dir.exists():
            self.cleanup_statedir()

    def __repr__(self) -> str:
        return f"<NspawnMachine '{self.name}'>"

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self.lifecycle.process

    def is_up(self) -> bool:
        """Whether the container runs (nixpkgs: its process exists)."""
        return self.lifecycle.state.running

    def screenshot(self, filename: str | None = None) -> None:
        raise MachineError(f"Screenshots are not supported by {type(self).__name__}")

    def send_key(
        self,
        key: str,
        delay: Duration | None = dt.timedelta(milliseconds=10),
        log: bool | None = True,
    ) -> None:
        """Press ``key`` on the container's X11 display through ``xdotool``, then wait
        ``delay`` (see ``aio.send_key``)."""
        run_sync(self.aio.send_key(key, delay, log))

    def send_chars(
        self, chars: str, delay: Duration | None = dt.timedelta(milliseconds=10)
    ) -> None:
        """Type ``chars`` on the container's X11 display, one key at a time."""
        run_sync(self.aio.send_chars(chars, delay))

    def wait_for_x(self, timeout: Duration = DEFAULT_TIMEOUT) -> None:
        """Wait until the container's X11 server answers (``xwininfo -root``)."""
        run_sync(self.aio.wait_for_x(timeout))

    def ssh_backdoor_command(self) -> str:
        proxy = f"socat - UNIX-CLIENT:/run/systemd/nspawn/unix-export/{self.name}/ssh"
        return f'ssh -o User=root -o ProxyCommand="{proxy}" bash'
