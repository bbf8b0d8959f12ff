"""The Jupyter kernel: ipykernel's IPythonKernel with the nixos-repl extension preloaded.

The subclass sets its identity and makes a kernel interrupt end an awaited cell at once (see
``_cancel_on_sigint``); the kernel app loads the extension, which builds the
session from ``NIXOS_REPL_CONFIG`` (a driverConfiguration.json; without it the kernel starts
with no machines). Everything else is ipykernel's: top-level ``await`` of the async twins, a
kernel interrupt delivered as SIGINT (which stops the running guest command as Ctrl-C does),
and shutdown or restart ending the process, which stops its machines.

The kernelspec lives in ``kernel/nixos-repl/`` (kernel.json and logos); its argv follows
ipykernel's ``make_ipkernel_cmd``: ``python -m nixos_repl.interactive.kernel -f
{connection_file}``. :func:`install` installs it with the absolute path of this Python.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ipykernel.ipkernel import IPythonKernel

from ..version import __version__

__all__ = ["KERNEL_NAME", "NixosReplKernel", "install", "kernel_argv", "kernelspec_dir", "main"]

KERNEL_NAME = "nixos-repl"


class NixosReplKernel(IPythonKernel):
    """IPythonKernel that names itself nixos-repl (the extension does the rest)."""

    implementation = "nixos-repl"
    implementation_version = __version__
    banner = (
        "nixos-repl: NixOS VM tests in Jupyter. %machines, %start --all, %succeed vm1 CMD, "
        "%screenshot vm1; %magic? for help"
    )

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
