"""The terminal REPL: ptpython in IPython mode over the test namespace, with the magics.

``nixos-repl [machine options]`` and ``nixos-test-driver --interactive`` open it; history is in
``./.nixos-test-history`` as in nixpkgs. Screenshots are drawn in the terminal (``images.py``)
and their PNG path is printed; ``%shell`` takes the terminal over until Ctrl-]. Leaving (Ctrl-D,
``exit``) stops the machines and says so.

When stdin is not a terminal there is no prompt: the input is run as cells (separated by blank
lines) through the same shell, and the exit status says whether every cell succeeded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from traitlets import default

from ..driver import Driver
from ..logs import ROOT_LOGGER, TerminalHandler
from .live import PlainSink, TerminalSink, suppressed
from .session import Session, current, set_current

__all__ = ["HISTORY_FILE", "interact", "make_shell", "run_cells", "run_repl", "split_cells"]

HISTORY_FILE = ".nixos-test-history"

BANNER = """\
nixos-repl: the nixpkgs testScript API with magics. Machines: {machines}
  %start --all              boot them (a status line follows the boot)
  %succeed vm1 uname -a     run a command (also %fail, %execute, %%sh vm1 for a cell)
  %machines                 kind (vm, container), state, uptime, pid, last console line
  %screenshot vm1           draw the screen here and save the PNG
  %shell vm1                a root shell on a guest tty (Ctrl-] comes back; a container: Ctrl-D)
  vm1.succeed("...")        plain testScript Python works too; %magic? for help
Leave with Ctrl-D: the machines stop.
"""


def _shell_class() -> type[Any]:
    """ptpython's IPython shell, whose display hook also draws images in the terminal."""
    from IPython.terminal.prompts import RichPromptDisplayHook
    from ptpython.ipython import InteractiveShellEmbed

    from .images import render_png

    class ImageDisplayHook(RichPromptDisplayHook):
        """Results with a PNG (screenshots) are drawn, then their text (the saved path)."""

        def start_displayhook(self) -> None:
            session = current()
            if session is not None:
                session.presenter.sync()  # the status line goes before the result shows
            super().start_displayhook()  # type: ignore[no-untyped-call]

        def write_format_data(
            self, format_dict: dict[str, Any], md_dict: dict[Any, Any] | None = None
        ) -> None:
            png = format_dict.get("image/png")
            if isinstance(png, bytes) and render_png(png):
                text = format_dict.get("text/plain")
                if text:
                    print(text)
                return
            super().write_format_data(format_dict, md_dict)

    class ReplShell(InteractiveShellEmbed):
        @default("displayhook_class")
        def _displayhook_class_default(self) -> type[Any]:
            return ImageDisplayHook

    return ReplShell


def make_shell(namespace: dict[str, Any], history: Path) -> Any:
    """The REPL's shell over ``namespace`` (the driver's), with the extension loaded."""
    from IPython.terminal import ipapp

    load_default_config: Any = ipapp.load_default_config

    from .images import render_png

    config = load_default_config()
    config.InteractiveShellEmbed = config.TerminalInteractiveShell

    def configure(repl: Any) -> None:
        repl.confirm_exit = False
        repl.enable_history_search = True

    shell = _shell_class().instance(
        config=config,
        user_ns=namespace,
        history_filename=str(history),
        configure=configure,
    )
    shell.display_formatter.active_types = ["text/plain", "image/png"]
    shell.mime_renderers = {"image/png": lambda data, _md: render_png(data)}
    shell.extension_manager.load_extension("nixos_repl")
    _complete_magics_with_ipython(shell)
    return shell


def plain_shell(namespace: dict[str, Any]) -> Any:
    """A shell without a prompt (input from a pipe), with the extension loaded."""
    from IPython.core.interactiveshell import InteractiveShell

    shell: Any = InteractiveShell.instance(user_ns=namespace)
    if not sys.stdout.isatty():
        shell.colors = "nocolor"
    shell.extension_manager.load_extension("nixos_repl")
    return shell


def _complete_magics_with_ipython(shell: Any) -> None:
    """ptpython completes only the names of magics: let IPython's completer (with the magics'
    matcher) complete the rest of a ``%`` line, as Jupyter does."""
    from IPython.core.completer import provisionalcompleter
    from prompt_toolkit.completion import Completer, Completion

    repl = shell.python_input
    original = repl.completer

    class MagicLineCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Any:
            text = document.text_before_cursor
            line = text.rsplit("\n", 1)[-1]
            if line.lstrip().startswith("%") and " " in line.lstrip():
                with provisionalcompleter():
                    found = list(shell.Completer.completions(line, len(line)))
                for c in found:
                    yield Completion(c.text, start_position=c.start - len(line))
                return
            yield from original.get_completions(document, complete_event)

    repl.completer = MagicLineCompleter()


def forget_shell() -> None:
    """Drop the REPL's shell (a later REPL in this process gets a new one)."""
    from IPython.core.interactiveshell import InteractiveShell
    from ptpython.ipython import InteractiveShellEmbed

    if InteractiveShell.initialized():
        shell: Any = InteractiveShell.instance()
        shell.extension_manager.unload_extension("nixos_repl")
        shell.history_manager.end_session()
    _shell_class().clear_instance()
    InteractiveShellEmbed.clear_instance()
    InteractiveShell.clear_instance()


def split_cells(text: str) -> list[str]:
    """Cells of a piped script: blocks separated by blank lines."""
    cells, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            cells.append("\n".join(current))
            current = []
    if current:
        cells.append("\n".join(current))
    return cells


def run_cells(shell: Any, cells: Sequence[str], echo: bool = True) -> bool:
    """Run ``cells`` one after the other, as typed at the prompt; True if all succeeded."""
    ok = True
    for cell in cells:
        if echo:
            prompt = f"In [{shell.execution_count}]: "
            print(prompt + cell.replace("\n", "\n" + " " * (len(prompt) - 5) + "...: "))
        result = shell.run_cell(cell, store_history=True)
        ok = ok and bool(result.success)
        print(flush=True)
    return ok


def say_stopped(stopped: list[str]) -> None:
    if stopped:
        print(f"stopped {', '.join(stopped)}: no machine left running", flush=True)
    else:
        print("no machine was running", flush=True)


def run_repl(
    driver: Driver,
    *,
    history: Path | None = None,
    verbose: bool = False,
    banner: str | None = None,
    script: str | None = None,
) -> int:
    """Open the REPL over ``driver`` (entered here, left on exit); returns the exit status.

    Without a terminal on stdin (or with ``script``), runs the cells instead of prompting.
    """
    interactive = script is None and sys.stdin.isatty() and sys.stdout.isatty()
    terminal = TerminalSink()
    session = Session(
        driver,
        terminal if interactive else PlainSink(sys.stdout),
        verbose=verbose,
        color=interactive,
    )
    set_current(session)
    try:
        if not interactive:
            shell = plain_shell(driver.test_symbols())
            source = script if script is not None else sys.stdin.read()
            return 0 if run_cells(shell, split_cells(source)) else 1
        shell = make_shell(driver.test_symbols(), history or Path.cwd() / HISTORY_FILE)
        if interactive:
            from .guestshell import attach_here

            repl = shell.python_input
            terminal.app = lambda: repl.app
            session.attach_shell = attach_here
            names = ", ".join(session.machine_names()) or "none yet (%machines add NAME SCRIPT)"
            shell(header=(banner or BANNER).format(machines=names))
    finally:
        say_stopped(session.close())
        forget_shell()
    return 0


def interact(driver: Driver) -> None:
    """``nixos-test-driver --interactive``: the REPL over a running batch driver.

    nixpkgs' terminal log handler is detached while the prompt is shown (it would print serial
    lines over it); the batch run stops the machines when this returns.
    """
    root = logging.getLogger(ROOT_LOGGER)
    with suppressed(root, TerminalHandler):
        terminal = TerminalSink()
        sink = terminal if sys.stdin.isatty() else PlainSink(sys.stdout)
        session = Session(driver, sink, color=sys.stdout.isatty(), owns_driver=False)
        set_current(session)
        try:
            if not sys.stdin.isatty():
                run_cells(plain_shell(driver.test_symbols()), split_cells(sys.stdin.read()))
                return
            shell = make_shell(driver.test_symbols(), Path(os.getcwd()) / HISTORY_FILE)
            if sys.stdin.isatty():
                from .guestshell import attach_here

                repl = shell.python_input
                terminal.app = lambda: repl.app
                session.attach_shell = attach_here
                names = ", ".join(session.machine_names()) or "none"
                shell(header=BANNER.format(machines=names))
        finally:
            running = session.running()
            session.close()
            if running:
                print(f"leaving: stopping {', '.join(running)}", flush=True)
            forget_shell()
