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
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import DriverConfig, check_config
from .driver import Debug, DebugAbstract, DebugNop, Driver, get_tmp_dir
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
from .machine.process import SOCKETS
from .replay import CellScript, CellSyntaxError, is_cell_script

__all__ = ["pause", "run"]

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
    prompt: Callable[[Driver], None] | None = None,
) -> int:
    """Run ``config``'s test script (or a prompt with ``interactive``); returns the exit status.

    ``logfile`` defaults to ``$LOGFILE`` (nixpkgs' XML log); ``junit_xml`` is relative to
    ``out_dir``. ``prompt`` opens a prompt over the driver (the front end's REPL): for
    ``interactive``, and at a failure with ``pause_on_failure``; nothing here imports it. Raises
    ConfigError, before starting anything, for a configuration that cannot run.
    """
    if (interactive or pause_on_failure) and prompt is None:
        raise ConfigError("a prompt is needed for --interactive and --pause-on-failure")
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
        private: Path | None = None
        try:
            if not interactive and not keep_machine_state:
                private = private_tmp_dir(config)
            driver = Driver(
                config, out_dir, logger, keep_machine_state, interactive, debug=debug,
                tmp_dir=private,
            )  # fmt: skip
            if private is not None:
                driver.on_terminate.append(lambda: shutil.rmtree(private, ignore_errors=True))
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
                    assert prompt is not None
                    prompt(driver)
                else:
                    tic = time.monotonic()
                    try:
                        driver.run_tests()
                    except (SystemExit, Exception) as e:
                        failed = not isinstance(e, SystemExit) or e.code not in (0, None)
                        if pause_on_failure and failed:
                            assert prompt is not None
                            pause(driver, prompt)
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
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
    return 0


# A UNIX socket path holds at most 107 bytes (sun_path is 108 with its NUL).
SOCKET_PATH_MAX = 107
# The longest socket name in a machine's state directory, and mkdtemp's name length (prefix "").
LONGEST_SOCKET = max(len(name) for name in (*SOCKETS, "qmp", "tty"))
PRIVATE_NAME = 8


def private_tmp_dir(config: DriverConfig) -> Path | None:
    """A directory of this run's own for its machine state and VLAN switches, so that parallel
    runs on one host never meet, whatever their machine names (kept state, -K, and the prompt use
    nixpkgs' shared places instead).

    None, with a warning, when the extra path component would push a socket path past the UNIX
    limit: the shared directory is used then, as nixpkgs does.
    """
    base = get_tmp_dir()
    longest = max(
        (len(os.fsencode(f"vm-state-{name}")) for name in [*config.vms, *config.containers]),
        default=0,
    )
    length = len(os.fsencode(base)) + 1 + PRIVATE_NAME + 1 + longest + 1 + LONGEST_SOCKET
    if length > SOCKET_PATH_MAX:
        log.warning(
            "machine state goes to the shared %s: a directory of this run's own there would make "
            "socket paths longer than %d bytes; set XDG_RUNTIME_DIR to a shorter directory so "
            "that parallel runs cannot collide",
            base,
            SOCKET_PATH_MAX,
        )
        return None
    private = Path(tempfile.mkdtemp(prefix="", dir=base))
    log.debug("machine state in %s", private)
    return private


def pause(driver: Driver, prompt: Callable[[Driver], None]) -> None:
    """``--pause-on-failure``: the prompt at the failure, machines up, namespace loaded."""
    driver.race_timer.cancel()  # the person at the prompt takes the time they need
    running = ", ".join(m.name for m in driver.machines if m.booted) or "none"
    print(
        f"\npaused at the failure (--pause-on-failure): machines up: {running}; the script's "
        "names are loaded. Leave with Ctrl-D (the run then exits 1).",
        file=sys.stderr,
        flush=True,
    )
    prompt(driver)
