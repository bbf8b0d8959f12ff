"""Redeploying changed machines into a running session: ``rebuild(cmd)``.

nixpkgs' ``driverInteractive`` has ``rebuild("nix-build ... -A driverInteractive")``: run the
build, then bring the running test up to date and print ``finished: updating machines``. Here
:func:`rebuild`:

1. runs ``cmd`` in a shell (its output goes to the driver's log, line by line); a failure
   raises :class:`~nixos_repl.errors.RebuildError` and changes nothing;
2. re-reads the machine configuration (``Driver.config_source``: the ``--config`` file, the
   start scripts, or ``NIXOS_REPL_CONFIG``; without one, the current machines' start scripts);
   a configuration that does not load or check raises ConfigError and changes nothing;
3. hands it to :meth:`Registry.redeploy <nixos_repl.registry.Registry.redeploy>`, which
   compares it with what runs. A machine's start script has *changed* when the path it names
   resolves to another file or the file's bytes differ (``result/bin/run-vm1-vm`` after a new
   ``nix-build`` does both). Changed machines are stopped and defined again from the new
   script (a fresh state directory unless ``--keep-machine-state``), and started again if they
   were running; new machines are defined (they boot on first use, as in nixpkgs); removed
   machines are stopped and dropped. VLANs that left the set are stopped, new ones started;
4. rebinds the test namespace (``Driver.rebind``: ``vm1``, ``machines``, ``vlan<N>``; removed
   names are deleted), and logs ``finished: updating machines``.

Returns a :class:`Redeploy` that says what changed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import DriverConfig, MachineConfig, check_config, load_driver_configuration
from .errors import RebuildError
from .logs import AbstractLogger
from .registry import Redeploy, Registry, fingerprint

__all__ = ["Redeploy", "fingerprint", "rebuild", "start_scripts_source"]

FINISHED = "finished: updating machines"
# Lines of the build's output kept for the error message.
TAIL = 20


class Redeployable(Protocol):
    """What :func:`rebuild` uses of the driver."""

    registry: Registry
    config: DriverConfig
    logger: AbstractLogger
    # Where the configuration is re-read from (None: the same start scripts).
    config_source: Callable[[], DriverConfig] | None

    def rebind(self) -> dict[str, Any]: ...


def start_scripts_source(driver: Redeployable) -> Callable[[], DriverConfig]:
    """Re-read the start scripts of the machines the driver has (``create_machine`` ones
    included) and keep its VLANs: the fallback when the session has no configuration file."""

    def read() -> DriverConfig:
        vms = {
            m.name: MachineConfig(m.name, Path(m.start_command)) for m in driver.registry.machines
        }
        return dataclasses.replace(driver.config, vms=vms, vlans=list(driver.registry.vlan_numbers))

    return read


def config_file_source(path: str | os.PathLike[str]) -> Callable[[], DriverConfig]:
    """Re-read a driverConfiguration.json (the path is resolved anew each time)."""

    def read() -> DriverConfig:
        return load_driver_configuration(path)

    return read


def _run_build(logger: AbstractLogger, cmd: str) -> None:
    tail: list[str] = []
    with logger.nested(f"rebuild: running {cmd}"):
        try:
            process = subprocess.Popen(
                cmd,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as e:
            raise RebuildError(f"rebuild: cannot run {cmd!r}: {e}") from None
        assert process.stdout is not None
        try:
            for line in process.stdout:
                line = line.rstrip("\n")
                logger.log(line)
                tail = [*tail[-(TAIL - 1) :], line]
            status = process.wait()
        except BaseException:  # Ctrl-C: the build stops, nothing is redeployed
            process.kill()
            process.wait()
            raise
    if status != 0:
        shown = "\n".join(tail)
        raise RebuildError(
            f"rebuild: the build command failed (exit code {status}): {cmd}\n"
            + (f"{shown}\n" if shown else "")
            + "the machines were left as they were"
        )


def rebuild(
    driver: Redeployable, cmd: str, config: str | os.PathLike[str] | None = None
) -> Redeploy:
    """Run ``cmd``, then redeploy what changed in the configuration (see the module's doc).

    ``config`` names a driverConfiguration.json to read instead of the session's own source.
    """
    if not isinstance(cmd, str) or not cmd.strip():
        raise RebuildError(
            'rebuild needs the build command, e.g. rebuild("nix-build -A driverInteractive")'
        )
    registry = driver.registry
    registry.note_deployed()  # what runs now, before the build can touch the files
    _run_build(driver.logger, cmd)
    if config is not None:
        source = config_file_source(config)
    elif driver.config_source is not None:
        source = driver.config_source
    else:
        source = start_scripts_source(driver)
    new = source()
    check_config(new, need_test_script=False)
    with driver.logger.nested("updating machines"):
        result = registry.redeploy(new)
        driver.config = dataclasses.replace(
            driver.config, vms=dict(new.vms), vlans=list(registry.vlan_numbers)
        )
        driver.rebind()
        driver.logger.log(result.summary())
    driver.logger.log(FINISHED)
    return result
