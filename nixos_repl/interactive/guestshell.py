"""``%shell NAME``: a root login shell on a real tty of the guest, attached to this terminal.

The driver gives every machine one more virtconsole port, ``org.nixos-repl.tty``, whose QEMU
side listens on ``<state dir>/tty``. In the guest that port is a tty (``/dev/hvc1`` when the
backdoor is ``/dev/hvc0``), so bash there has job control, Ctrl-C reaches the foreground job and
full-screen programs work. The login shell is started once, through the backdoor, with nothing
but bash and ``setsid`` (util-linux or busybox); it keeps running between attachments.

Attaching needs no backdoor, only the socket: ``nixos-repl shell NAME --state-dir DIR`` attaches
from any terminal. The terminal is in raw mode while attached; Ctrl-] detaches.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import signal
import socket
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MachineError

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = [
    "ESCAPE",
    "PORT_NAME",
    "ShellHint",
    "attach",
    "connect",
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
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


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
    sock: socket.socket,
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    on_resize: Callable[[int, int], None] | None = None,
) -> str:
    """Pass bytes between this terminal and the guest tty until Ctrl-] (returns ``"detached"``)
    or until QEMU closes the port (``"closed"``)."""
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
    try:
        with raw_terminal(in_fd) if os.isatty(in_fd) else contextlib.nullcontext():
            while True:
                for key, _ in selector.select():
                    if key.data == "guest":
                        data = sock.recv(65536)
                        if not data:
                            return "closed"
                        _write_all(out_fd, data)
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


def attach_here(machine: Machine) -> None:
    """``%shell`` in a terminal: start the guest shell if needed and attach this terminal."""
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
