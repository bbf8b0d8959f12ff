"""``nixos-repl console --existing [CONNECTION_FILE]``: a terminal on a running kernel.

The Jupyter project's own terminal front end (jupyter_console, over jupyter_client) attached to
a kernel that a notebook started: the same machines, the same namespace, the magics, tab
completion from the kernel. Two things differ from ``jupyter console --existing``:

* Leaving never ends the kernel: ``exit``, ``quit`` and Ctrl-D detach, and the notebook keeps
  its kernel and its machines.
* Ctrl-C during a command interrupts it (an ``interrupt_request`` on the control channel,
  which ipykernel turns into SIGINT: the guest command is stopped as in the notebook), where
  jupyter_console can only interrupt kernels it started itself.

Before the console starts, the connection file is checked and the kernel must answer a
``kernel_info_request`` within a few seconds: a missing file, a file that is not a connection
file, or a kernel that is gone is one line saying so, and status 1.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import NixosReplError

__all__ = ["ConsoleError", "find_kernel", "run_console"]

log = logging.getLogger(__name__)

# How long a kernel may take to answer before the console says it is gone.
PROBE_TIMEOUT = 10.0


class ConsoleError(NixosReplError):
    """The console cannot attach: no such kernel, or it does not answer."""


def find_kernel(connection_file: str | None) -> Path:
    """The connection file to use: the one given (a path, or a name in Jupyter's runtime
    directory), else the newest kernel's."""
    from jupyter_client.connect import find_connection_file
    from jupyter_core.paths import jupyter_runtime_dir

    runtime = jupyter_runtime_dir()
    if connection_file is None:
        try:
            return Path(find_connection_file())
        except OSError:
            raise ConsoleError(
                f"no running kernel found in {runtime}: pass the kernel's connection file "
                "(a notebook cell shows it with %connect_info)"
            ) from None
    try:
        return Path(find_connection_file(connection_file))
    except OSError:
        raise ConsoleError(
            f"no connection file {connection_file!r} (looked in . and {runtime}); a notebook "
            "cell shows its kernel's with %connect_info"
        ) from None


def _check_file(path: Path) -> None:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConsoleError(f"{path} is not a kernel connection file: {e}") from None
    needed = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port", "key")
    if not isinstance(info, dict) or any(k not in info for k in needed):
        raise ConsoleError(f"{path} is not a kernel connection file (it needs {', '.join(needed)})")


def probe(path: Path, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """The kernel's ``kernel_info_reply`` content; ConsoleError if it does not answer."""
    from jupyter_client.blocking.client import BlockingKernelClient

    _check_file(path)
    client = BlockingKernelClient(connection_file=str(path))
    client.load_connection_file()
    client.start_channels()
    try:
        msg_id = client.kernel_info()
        while True:
            try:
                reply = client.get_shell_msg(timeout=timeout)
            except Exception:
                raise ConsoleError(
                    f"the kernel of {path} does not answer (within {timeout:.0f} s): is the "
                    "notebook's kernel still running?"
                ) from None
            if reply["parent_header"].get("msg_id") == msg_id:
                content: dict[str, Any] = reply["content"]
                return content
    finally:
        client.stop_channels()


# Typed at the console, these detach instead of reaching the kernel (where ``exit`` would end
# the notebook's kernel and its machines).
_LEAVE = frozenset({"exit", "quit", "exit()", "quit()", "%exit", "%quit"})


def _app_class() -> Any:
    import signal

    from jupyter_client.consoleapp import JupyterConsoleApp
    from jupyter_console.app import ZMQTerminalIPythonApp
    from jupyter_console.ptshell import ZMQTerminalInteractiveShell

    class AttachedShell(ZMQTerminalInteractiveShell):  # type: ignore[misc]
        """Leaving detaches: the notebook's kernel (and machines) keep running."""

        def run_cell(self, cell: str, store_history: bool = True) -> Any:
            if cell.strip() in _LEAVE:
                self.ask_exit()
                return None
            return super().run_cell(cell, store_history)

        def ask_exit(self) -> None:
            super().ask_exit()
            if not self.own_kernel:
                self.keepkernel = True

    class ConsoleApp(ZMQTerminalIPythonApp):  # type: ignore[misc]
        name = "nixos-repl-console"

        def init_shell(self) -> None:
            # jupyter_console's own init_shell, with the shell that only detaches.
            JupyterConsoleApp.initialize(self)
            signal.signal(signal.SIGINT, self.handle_sigint)
            self.shell = AttachedShell.instance(
                parent=self,
                manager=self.kernel_manager,
                client=self.kernel_client,
                confirm_exit=self.confirm_exit,
            )
            self.shell.own_kernel = not self.existing

        def handle_sigint(self, *args: Any) -> None:
            if self.shell._executing and self.kernel_manager is None:
                client = self.kernel_client
                client.control_channel.send(client.session.msg("interrupt_request", {}))
                return
            super().handle_sigint(*args)

    return ConsoleApp


def run_console(connection_file: str | None, extra: list[str] | None = None) -> int:
    """Attach a terminal to the kernel of ``connection_file`` (default: the newest kernel)."""
    path = find_kernel(connection_file)
    info = probe(path)
    if info.get("implementation") != "nixos-repl":
        log.warning(
            "%s is a %s kernel, not nixos-repl's: the magics may be missing",
            path,
            info.get("implementation", "unknown"),
        )
    app = _app_class()
    argv = ["--existing", str(path), "--no-confirm-exit"]
    app.launch_instance(argv=[*argv, *(extra or [])])
    app.clear_instance()
    sys.stdout.flush()
    return 0
