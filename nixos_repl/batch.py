"""Run a testScript as nixpkgs' ``nixos-test-driver`` does, non-interactively or at a prompt.

:func:`run` is what ``nixos-repl --batch`` and the ``nixos-test-driver`` drop-in call once the
command line is parsed: it attaches the nixpkgs-shaped log handlers, builds the :class:`Driver`
and returns the exit status (0 success, 1 a failed test or machine error; the global timeout
ends the process with SIGTERM). Configuration errors are raised as ConfigError before anything
starts; the command line turns them into exit status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import DriverConfig, check_config
from .driver import Debug, DebugAbstract, DebugNop, Driver
from .errors import ConfigError
from .export import ExportError
from .logs import (
    DriverLogger,
    JUnitHandler,
    LogLevel,
    NixpkgsHandler,
    TerminalHandler,
    XMLLogHandler,
    attach,
)
from .replay import CellScript, CellSyntaxError, is_cell_script

__all__ = ["interact", "pause", "run"]

log = logging.getLogger("nixos_repl.driver")


def run(
    config: DriverConfig,
    *,
    out_dir: Path,
    junit_xml: Path | None = None,
    log_level: LogLevel = LogLevel.INFO,
    keep_machine_state: bool = False,
    interactive: bool = False,
    debug_hook_attach: str | None = None,
    logfile: str | None = None,
    pause_on_failure: bool = False,
) -> int:
    """Run ``config``'s test script (or a prompt with ``interactive``); returns the exit status.

    ``logfile`` defaults to ``$LOGFILE`` (nixpkgs' XML log); ``junit_xml`` is relative to
    ``out_dir``. Raises ConfigError, before starting anything, for a configuration that cannot
    run.
    """
    check_config(config, need_test_script=not interactive)
    cells: CellScript | None = None
    if not interactive and is_cell_script(config.test_script):
        assert config.test_script is not None
        try:
            cells = CellScript.read(config.test_script)
        except ExportError as e:  # unreadable, or no code: a bad input, nothing started
            raise ConfigError(str(e)) from None
    out_dir = out_dir.resolve()
    if logfile is None:
        logfile = os.environ.get("LOGFILE")
    handlers: list[NixpkgsHandler] = [TerminalHandler(log_level=log_level)]
    if logfile:
        handlers.append(XMLLogHandler(logfile, log_level=log_level))
    if junit_xml is not None:
        handlers.append(JUnitHandler(out_dir / junit_xml, log_level=log_level))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the global timeout's way out

    logger = DriverLogger()
    with attach(handlers):
        if not keep_machine_state:
            logger.info("Machine state will be reset. To keep it, pass --keep-machine-state")
        debug: DebugAbstract = (
            Debug(logger, debug_hook_attach) if debug_hook_attach is not None else DebugNop()
        )
        try:
            driver = Driver(config, out_dir, logger, keep_machine_state, interactive, debug=debug)
            if cells is not None:
                try:
                    cells.compile()
                except CellSyntaxError as e:
                    for line in str(e).splitlines():
                        logger.log_test_error(line)
                    return 1
                script = cells
                setattr(driver, "test_script", lambda: script.run(driver))  # noqa: B010
            elif not interactive:
                try:
                    driver.compile_script()
                except SyntaxError as e:
                    driver.log_syntax_error(e)
                    return 1
            driver.on_terminate.extend(h.close for h in handlers)
            with driver:
                driver.dump_machine_ssh()
                if interactive:
                    interact(driver)
                else:
                    tic = time.monotonic()
                    try:
                        driver.run_tests()
                    except (SystemExit, Exception) as e:
                        failed = not isinstance(e, SystemExit) or e.code not in (0, None)
                        if pause_on_failure and failed:
                            pause(driver, cells)
                            return 1
                        raise
                    logger.info(f"test script finished in {time.monotonic() - tic:.2f}s")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:
            log.error("interrupted")
            return 130
        except Exception:
            log.exception("the test script failed with an unexpected error")
            return 1
    return 0


def pause(driver: Driver, cells: CellScript | None = None) -> None:
    """``--pause-on-failure``: the terminal REPL at the failure, machines up, namespace loaded."""
    driver.race_timer.cancel()  # the person at the prompt takes the time they need
    if cells is not None:
        cells.close()
    running = ", ".join(m.name for m in driver.machines if m.booted) or "none"
    print(
        f"\npaused at the failure (--pause-on-failure): machines up: {running}; the script's "
        "names are loaded. Leave with Ctrl-D (the run then exits 1).",
        file=sys.stderr,
        flush=True,
    )
    interact(driver)


def interact(driver: Driver) -> None:
    """nixpkgs' interactive mode: nixos-repl's terminal REPL (ptpython in IPython mode, the
    magics) over the test namespace. History goes to ``./.nixos-test-history``, as in nixpkgs.
    """
    from .interactive.repl import interact as repl

    repl(driver)
