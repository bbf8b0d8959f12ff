"""The Jupyter kernel: ipykernel's IPythonKernel with the nixos-repl extension preloaded.

The subclass sets its identity, makes a kernel interrupt end an awaited cell at once (see
``_cancel_on_sigint``), and stops the machines as soon as a shutdown or restart is asked for
(see ``do_shutdown``); the kernel app loads the extension, which builds the
session from ``NIXOS_REPL_CONFIG`` (a driverConfiguration.json; without it the kernel starts
with no machines). Everything else is ipykernel's: top-level ``await`` of the async twins, a
kernel interrupt delivered as SIGINT (which stops the running guest command as Ctrl-C does),
and shutdown or restart ending the process. SIGTERM ends the process at once, and its machines
with it (QEMU dies with its parent).

The kernelspec lives in ``kernel/nixos-repl/`` (kernel.json and logos); its argv follows
ipykernel's ``make_ipkernel_cmd``: ``python -m nixos_repl.interactive.kernel -f
{connection_file}``. :func:`install` installs it with the absolute path of this Python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ipykernel.ipkernel import IPythonKernel

from ..version import __version__

__all__ = ["KERNEL_NAME", "NixosReplKernel", "install", "kernel_argv", "kernelspec_dir", "main"]

KERNEL_NAME = "nixos-repl"
# After a shutdown request has stopped the machines, how long the process has to end by itself
# before a cell that still runs is interrupted, and then before the process is ended.
SHUTDOWN_GRACE = 3.0

log = logging.getLogger(__name__)


class NixosReplKernel(IPythonKernel):
    """IPythonKernel that names itself nixos-repl (the extension does the rest)."""

    implementation = "nixos-repl"
    implementation_version = __version__
    banner = (
        "nixos-repl: NixOS VM tests in Jupyter. %machines, %start --all, %succeed vm1 CMD, "
        "%screenshot vm1; %magic? for help"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        # Set while no request is being handled on the main thread (between ipykernel's
        # pre_handler_hook and post_handler_hook, a cell runs).
        self._not_busy = threading.Event()
        self._not_busy.set()

    def pre_handler_hook(self) -> None:
        self._not_busy.clear()
        super().pre_handler_hook()  # type: ignore[no-untyped-call]

    def post_handler_hook(self) -> None:
        super().post_handler_hook()  # type: ignore[no-untyped-call]
        self._not_busy.set()

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """A shutdown or restart request (on the control thread): stop the machines now.

        ipykernel only asks the main thread to stop once its cell is done, and a cell can wait
        on a machine for minutes (a guest command, a boot, a ``%watch``'s screen): with the
        machines gone, that cell fails at once. The reply waits for it, so that the cell's own
        reply goes out before the sockets close. A cell still running after
        ``SHUTDOWN_GRACE`` seconds is interrupted; a process still there after as long again
        ends regardless (its machines are gone already).
        """
        from .session import current

        session = current()
        if session is not None:
            try:
                await asyncio.to_thread(session.close)
            except Exception:
                log.exception("stopping the machines at shutdown failed")
        if not await asyncio.to_thread(self._not_busy.wait, SHUTDOWN_GRACE):
            log.warning("a cell still runs %.0f s after the shutdown request: interrupting it",
                        SHUTDOWN_GRACE)  # fmt: skip
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.to_thread(self._not_busy.wait, SHUTDOWN_GRACE)
        threading.Thread(target=_exit_later, name="nixos-repl-shutdown", daemon=True).start()
        reply: dict[str, Any] = super().do_shutdown(restart)  # type: ignore[no-untyped-call]
        return reply

    @contextmanager
    def _cancel_on_sigint(self, future: asyncio.Future[Any]) -> Iterator[None]:
        """While an awaited cell runs, a kernel interrupt cancels it, and the loop wakes up.

        ipykernel's own version schedules the cancellation with a callback that does not wake
        the event loop (7.4): the interrupted cell got its reply only when the next request
        arrived, and that request was then aborted. ``call_soon_threadsafe`` wakes the loop.
        """
        loop = asyncio.get_running_loop()

        def cancel() -> None:
            if not future.done():
                future.cancel()

        def on_sigint(_signum: int, _frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(cancel)

        saved = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, saved)


def _exit_later(grace: float = 2 * SHUTDOWN_GRACE) -> None:
    """The process should be ending (a daemon thread: it ends with it); if not, end it."""
    time.sleep(grace)
    log.warning("the kernel did not end %.0f s after the shutdown request: exiting", grace)
    os._exit(1)


def kernel_argv(python: str = "python3") -> list[str]:
    return [python, "-m", "nixos_repl.interactive.kernel", "-f", "{connection_file}"]


def kernelspec_dir() -> Path | None:
    """The kernelspec folder shipped with nixos-repl (the source tree's, or the installed one)."""
    candidates = [
        Path(__file__).resolve().parents[2] / "kernel" / KERNEL_NAME,
        Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME,
    ]
    for path in candidates:
        if (path / "kernel.json").is_file():
            return path
    return None


def write_kernelspec(target: Path) -> Path:
    """The kernelspec in ``target`` (created): logos copied, argv with this Python's path."""
    target.mkdir(parents=True, exist_ok=True)
    source = kernelspec_dir()
    spec: dict[str, Any] = {
        "display_name": "nixos-repl",
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }
    if source is not None:
        spec = json.loads((source / "kernel.json").read_text())
        for logo in source.glob("logo-*"):
            shutil.copy(logo, target / logo.name)
    spec["argv"] = kernel_argv(sys.executable)
    (target / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return target


def install(*, user: bool = True, prefix: Path | None = None, sys_prefix: bool = False) -> str:
    """Install the kernelspec (``--user`` by default); returns where it went."""
    from jupyter_client.kernelspec import KernelSpecManager

    if sys_prefix:
        prefix, user = Path(sys.prefix), False
    elif prefix is not None:
        user = False
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_kernelspec(Path(tmp) / KERNEL_NAME)
        dest: str = KernelSpecManager().install_kernel_spec(
            str(spec), KERNEL_NAME, user=user, prefix=str(prefix) if prefix else None
        )
    return dest


def main(argv: list[str] | None = None) -> None:
    """Run the kernel (what the kernelspec's argv starts)."""
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(argv=argv, kernel_class=NixosReplKernel, extensions=["nixos_repl"])


if __name__ == "__main__":
    main()
