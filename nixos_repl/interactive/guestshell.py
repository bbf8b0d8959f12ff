"""``%shell NAME``: a root login shell on a real tty of the guest, attached to this terminal.

The driver gives every machine one more virtconsole port, ``org.nixos-repl.tty``, whose QEMU
side listens on ``<state dir>/tty``. In the guest that port is a tty (``/dev/hvc1`` when the
backdoor is ``/dev/hvc0``), so bash there has job control, Ctrl-C reaches the foreground job and
full-screen programs work. The login shell is started once, through the backdoor, with nothing
but bash and ``setsid`` (util-linux or busybox); it keeps running between attachments.

Attaching needs no backdoor, only the socket: ``nixos-repl shell NAME --state-dir DIR`` attaches
from any terminal. The terminal is in raw mode while attached; Ctrl-] detaches.

A container has no tty port: its shell is a new root login shell in the container's namespaces
(``nsenter`` into its leader, as its commands run), on a pty of this process. Ctrl-D (the shell
exits) or Ctrl-] ends it, and every process it started goes with it (they share one session).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import MachineError
from ..machine.nspawn import NSENTER_NAMESPACES

if TYPE_CHECKING:
    from ..machine import BaseMachine, Machine

__all__ = [
    "ESCAPE",
    "PORT_NAME",
    "ContainerShell",
    "ShellHint",
    "attach",
    "connect",
    "container_shell_argv",
    "hint",
    "resize_script",
    "start_script",
    "tty_socket",
]

PORT_NAME = "org.nixos-repl.tty"
ESCAPE = b"\x1d"  # Ctrl-]
_TERMS = ("xterm", "xterm-256color", "screen", "screen-256color", "tmux-256color", "linux")


def tty_socket(state_dir: Path) -> Path:
    """Where QEMU listens for the guest tty of the machine with this state directory."""
    return state_dir / "tty"


def _guest_term() -> str:
    term = os.environ.get("TERM", "")
    return term if term in _TERMS else "xterm-256color"


def start_script(rows: int, cols: int, term: str | None = None) -> str:
    """Bash for the backdoor: start the login shell on the tty port unless it runs, set the
    tty's size (a change of size makes a waiting readline draw its prompt again), and print the
    tty's path."""
    term = term or _guest_term()
    inner = (
        'echo $$ > "$1"; export TERM="$2"; cd /root 2>/dev/null || cd /; '
        'exec bash -l <>"$3" >&0 2>&1'
    )
    return f"""
port=
for p in /sys/class/virtio-ports/*; do
  read -r n 2>/dev/null < "$p/name" || continue
  if [ "$n" = {PORT_NAME} ]; then port=${{p##*/}}; fi
done
if [ -z "$port" ]; then
  echo "this machine has no {PORT_NAME} port: it was started by an older nixos-repl" >&2
  exit 3
fi
dev=/dev/hvc${{port##*p}}
pidf=/run/nixos-repl-tty.pid
[ -w /run ] || pidf=/tmp/nixos-repl-tty.pid
if ! {{ read -r pid < "$pidf" && kill -0 "$pid"; }} 2>/dev/null; then
  # Job control on: a background job of a script would ignore SIGINT (and so would
  # everything the shell runs), and Ctrl-C would not reach the guest's foreground job.
  set -m
  setsid bash -c {shlex.quote(inner)} login "$pidf" {shlex.quote(term)} "$dev" \\
    </dev/null >/dev/null 2>&1 &
  set +m
fi
{resize_script(rows, cols, "$dev")}
echo "$dev"
"""


def resize_script(rows: int, cols: int, dev: str) -> str:
    """Bash: give the tty a size, changing it twice so that the shell always notices."""
    return (
        f"stty -F {dev} rows {max(rows - 1, 1)} cols {cols} 2>/dev/null || true\n"
        f"stty -F {dev} rows {rows} cols {cols} 2>/dev/null || true"
    )


def terminal_size() -> tuple[int, int]:
    """The size of this process's terminal (rows, columns), from the terminal itself (``LINES``
    and ``COLUMNS`` may be stale), else as ``shutil`` finds it."""
    for stream in (sys.__stdout__, sys.__stdin__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream is not None:
                size = os.get_terminal_size(stream.fileno())
                return size.lines, size.columns
    fallback = shutil.get_terminal_size((80, 24))
    return fallback.lines, fallback.columns


def start(machine: Machine) -> str:
    """Start the guest's login shell if it does not run (booting the machine if needed), size
    its tty like this terminal; returns the tty's path in the guest."""
    rows, cols = terminal_size()
    return machine.succeed(start_script(rows, cols)).strip()


def connect(path: Path) -> socket.socket:
    """A connection to QEMU's side of the tty port; MachineError if nothing listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise MachineError(
            f"cannot attach to the guest tty at {path}: {e.strerror or e} "
            "(is the machine running, and was it started by this nixos-repl?)"
        ) from None
    return sock


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal in raw mode (every key goes to the guest), restored afterwards."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(
    sock: socket.socket | PtyEnd,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    on_resize: Callable[[int, int], None] | None = None,
    ended: int | None = None,
) -> str:
    """Pass bytes between this terminal and the guest tty until Ctrl-] (returns ``"detached"``)
    or until QEMU closes the port, or ``ended`` (a pidfd) becomes readable (``"closed"``)."""
    in_fd = sys.stdin.fileno() if stdin is None else stdin
    out_fd = sys.stdout.fileno() if stdout is None else stdout
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    previous = None
    if on_resize is not None and os.isatty(in_fd):
        previous = signal.signal(signal.SIGWINCH, lambda *_: _poke(wake_w))
    selector = selectors.DefaultSelector()
    selector.register(in_fd, selectors.EVENT_READ, "in")
    selector.register(sock, selectors.EVENT_READ, "guest")
    selector.register(wake_r, selectors.EVENT_READ, "resize")
    if ended is not None:
        selector.register(ended, selectors.EVENT_READ, "ended")
    try:
        with raw_terminal(in_fd) if os.isatty(in_fd) else contextlib.nullcontext():
            while True:
                for key, _ in selector.select():
                    if key.data == "guest":
                        data = sock.recv(65536)
                        if not data:
                            return "closed"
                        _write_all(out_fd, data)
                    elif key.data == "ended":
                        _drain(sock, out_fd)
                        return "closed"
                    elif key.data == "resize":
                        os.read(wake_r, 512)
                        if on_resize is not None:
                            rows, cols = terminal_size()
                            with contextlib.suppress(Exception):
                                on_resize(rows, cols)
                    else:
                        data = os.read(in_fd, 4096)
                        if not data:
                            return "detached"
                        before, escape, _ = data.partition(ESCAPE)
                        if before:
                            sock.sendall(before)
                        if escape:
                            return "detached"
    finally:
        selector.close()
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        os.close(wake_r)
        os.close(wake_w)


def _drain(end: socket.socket | PtyEnd, out_fd: int) -> None:
    """Show what the guest end still holds (the shell's last words)."""
    if not isinstance(end, PtyEnd):
        return
    while data := end.recv(65536, wait=False):
        _write_all(out_fd, data)


def _poke(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"x")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(frozen=True)
class ShellHint:
    """Where a machine's guest shell runs and how to attach to it from a terminal."""

    machine: str
    tty: str
    state_dir: Path

    def command(self) -> str:
        return f"nixos-repl shell {self.machine} --state-dir {shlex.quote(str(self.state_dir))}"

    def text(self) -> str:
        return (
            f"{self.machine}: a root login shell runs on the guest's {self.tty}; "
            f"attach from a terminal with\n    {self.command()}\n(Ctrl-] detaches)"
        )

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())


def attach_here(machine: BaseMachine) -> None:
    """``%shell`` in a terminal: start the guest shell if needed and attach this terminal (a
    container: a new login shell in it, ended when it ends)."""
    if machine.lifecycle.kind == "container":
        attach_container(machine)
        return
    attach_vm(cast("Machine", machine))


def attach_vm(machine: Machine) -> None:
    """Attach this terminal to the VM's guest tty (the login shell there keeps running)."""
    machine.connect()
    with connect(tty_socket(machine.state_dir)) as sock:
        dev = start(machine)  # after connecting: the new shell's first prompt comes through
        print(f"[{machine.name}: root shell on {dev}; Ctrl-] returns]", flush=True)

        def resize(rows: int, cols: int) -> None:
            machine.succeed(resize_script(rows, cols, dev))

        how = attach(sock, on_resize=resize)
    if how == "closed":
        print(f"\r\n[{machine.name}: the tty was closed (the machine stopped)]", flush=True)
    else:
        print(f"\r\n[detached; {machine.name}'s shell keeps running]", flush=True)


def attach_standalone(name: str, state_dir: Path) -> int:
    """``nixos-repl shell NAME --state-dir DIR``: attach this terminal to a running guest shell
    (started by ``%shell NAME`` in the REPL or a notebook)."""
    path = tty_socket(state_dir)
    try:
        sock = connect(path)
    except MachineError as e:
        print(f"nixos-repl shell: {e}", file=sys.stderr)
        return 1
    with sock:
        print(
            f"[{name}: attached to the guest tty; Ctrl-] detaches. No prompt? Press Enter, or "
            f"run %shell {name} in the REPL or notebook first to start the shell]",
            flush=True,
        )
        how = attach(sock)
    print(f"\r\n[{'closed' if how == 'closed' else 'detached'}]", flush=True)
    return 0


def hint(machine: BaseMachine) -> Any:
    """``%shell`` where this terminal cannot be attached (a notebook): a VM's guest shell is
    started and the hint says how to attach; a container's says how to enter it."""
    if machine.lifecycle.kind == "container":
        machine.connect()
        return ContainerShellHint(machine.name, container_shell_argv(_leader(machine)))
    return ShellHint(machine.name, start(cast("Machine", machine)), machine.state_dir)


# -- containers: a login shell through nsenter, on a pty ---------------------------------------

# Where the commands are in a NixOS container and in others; the login shell reads /etc/profile.
CONTAINER_PATH = (
    "/run/current-system/sw/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)
_LOGIN = 'cd "$HOME" 2>/dev/null || cd /; command -v bash >/dev/null && exec bash -l; exec sh -l'


def _leader(machine: BaseMachine) -> int:
    leader = getattr(machine.lifecycle, "leader", None)
    if leader is None:
        raise MachineError(f"{machine.name}: the container has no leader process (is it up?)")
    return int(leader)


def container_shell_argv(leader: int, term: str | None = None) -> list[str]:
    """The command line of a root login shell in the container whose leader is ``leader``: a new
    session whose controlling terminal is stdin, nsenter into the leader's namespaces, and a
    clean root environment."""
    nsenter = shutil.which("nsenter") or "nsenter"
    env = {
        "TERM": term or _guest_term(),
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "PATH": CONTAINER_PATH,
    }
    return [
        "env", "-i", *(f"{k}={v}" for k, v in env.items()),
        shutil.which("setsid") or "setsid", "--ctty",
        nsenter, "--target", str(leader), *NSENTER_NAMESPACES,
        "--", "/bin/sh", "-c", _LOGIN,
    ]  # fmt: skip


@dataclass(frozen=True)
class ContainerShellHint:
    """How to enter a container from a terminal (as root)."""

    machine: str
    argv: list[str]

    def text(self) -> str:
        return (
            f"{self.machine}: a container; open a root login shell in it from a terminal, as "
            f"root, with\n    {shlex.join(self.argv)}\n(or run %shell {self.machine} in the "
            "terminal REPL)"
        )

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())


class PtyEnd:
    """The master side of a pty, with the calls ``attach`` makes on a socket."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self, size: int, wait: bool = True) -> bytes:
        if not wait and not _readable(self.fd):
            return b""
        try:
            return os.read(self.fd, size)
        except OSError:  # EIO: every process holding the other side has closed it
            return b""

    def sendall(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            _write_all(self.fd, data)

    def resize(self, rows: int, cols: int) -> None:
        """Give the pty a size (its foreground job gets SIGWINCH)."""
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _readable(fd: int) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        return bool(selector.select(0))


class ContainerShell:
    """A root login shell in a running container, on a pty; ended by :meth:`close`, which
    leaves no process of it behind (all of them are in the session it started)."""

    def __init__(self, machine: BaseMachine) -> None:
        machine.connect()  # starts the container if needed, waits for READY=1
        self.name = machine.name
        master, slave = os.openpty()
        self.pty = PtyEnd(master)
        self.pty.resize(*terminal_size())
        try:
            self.process = subprocess.Popen(
                container_shell_argv(_leader(machine)),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                close_fds=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.pidfd = os.pidfd_open(self.process.pid)

    def session_processes(self) -> list[int]:
        """Every live process of the shell's session (the shell, its jobs, their children)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == self.process.pid:  # field 6: session
                found.append(int(entry))
        return found

    def close(self, grace: float = 2.0) -> None:
        """Hang up the shell (SIGHUP, then SIGKILL) and every process of its session."""
        for sig in (signal.SIGHUP, signal.SIGKILL):
            for pid in self.session_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.session_processes() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.session_processes():
                break
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()
        os.close(self.pidfd)
        os.close(self.pty.fd)


def attach_container(machine: BaseMachine) -> None:
    """``%shell`` on a container in a terminal: a new login shell until Ctrl-D or Ctrl-]."""
    shell = ContainerShell(machine)
    try:
        print(
            f"[{machine.name}: root shell in the container; Ctrl-D or Ctrl-] returns]", flush=True
        )
        how = attach(shell.pty, on_resize=shell.pty.resize, ended=shell.pidfd)
    finally:
        shell.close()
    what = "the shell exited" if how == "closed" else "ended the shell"
    print(f"\r\n[{machine.name}: {what}; nothing of it is left running]", flush=True)
