"""Redeploying changed machines into a running session: ``rebuild(cmd)``.

nixpkgs' ``driverInteractive`` has ``rebuild("nix-build ... -A driverInteractive")``: run the
build, then bring the running test up to date and print ``finished: updating machines``. Here
:func:`rebuild`:

1. runs ``cmd`` in a shell (its output goes to the driver's log, line by line); a failure
   raises :class:`~nixos_repl.errors.RebuildError` and changes nothing;
2. re-reads the machine configuration (``Driver.config_source``: the ``--config`` file, the
   start scripts, or ``NIXOS_REPL_CONFIG``; without one, the current machines' start scripts);
   a configuration that does not load or check raises ConfigError and changes nothing;
3. compares it with what runs. A machine's start script has *changed* when the path it names
   resolves to another file or the file's bytes differ (``result/bin/run-vm1-vm`` after a new
   ``nix-build`` does both). Changed machines are stopped and defined again from the new
   script (a fresh state directory unless ``--keep-machine-state``), and started again if they
   were running; new machines are defined (they boot on first use, as in nixpkgs); removed
   machines are stopped and dropped. VLANs that left the set are stopped, new ones started;
4. rebinds the test namespace (``vm1``, ``machines``, ``vlan<N>``: removed names are deleted),
   and logs ``finished: updating machines``.

Returns a :class:`Redeploy` that says what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DriverConfig, MachineConfig, check_config, load_driver_configuration
from .errors import RebuildError
from .loop import run_sync

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["Redeploy", "fingerprint", "rebuild", "start_scripts_source"]

FINISHED = "finished: updating machines"
# Lines of the build's output kept for the error message.
TAIL = 20


def fingerprint(start_command: str) -> str:
    """What identifies a start script: the file it resolves to and its bytes (a command that is
    not a file is its own fingerprint)."""
    words = shlex.split(start_command) if start_command.strip() else [start_command]
    path = Path(words[0])
    try:
        real = path.resolve(strict=True)
        digest = hashlib.sha256(real.read_bytes()).hexdigest()
    except OSError:
        return f"command:{start_command}"
    return f"{real}:{digest}:{' '.join(words[1:])}"


@dataclasses.dataclass
class Redeploy:
    """What a rebuild changed."""

    restarted: list[str] = dataclasses.field(default_factory=list)
    redefined: list[str] = dataclasses.field(default_factory=list)  # changed, were not running
    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    vlans_added: list[int] = dataclasses.field(default_factory=list)
    vlans_removed: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("restarted", self.restarted),
            ("redefined", self.redefined),
            ("added", self.added),
            ("removed", self.removed),
            ("unchanged", self.unchanged),
        ):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        if self.vlans_added:
            parts.append(f"new VLANs {', '.join(map(str, self.vlans_added))}")
        if self.vlans_removed:
            parts.append(f"removed VLANs {', '.join(map(str, self.vlans_removed))}")
        return "; ".join(parts) if parts else "nothing changed"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


def start_scripts_source(driver: Driver) -> Callable[[], DriverConfig]:
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


def _run_build(driver: Driver, cmd: str) -> None:
    logger = driver.logger
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


def rebuild(driver: Driver, cmd: str, config: str | os.PathLike[str] | None = None) -> Redeploy:
    """Run ``cmd``, then redeploy what changed in the configuration (see the module's doc).

    ``config`` names a driverConfiguration.json to read instead of the session's own source.
    """
    if not isinstance(cmd, str) or not cmd.strip():
        raise RebuildError(
            'rebuild needs the build command, e.g. rebuild("nix-build -A driverInteractive")'
        )
    registry = driver.registry
    # What runs now, fingerprinted before the build can touch the files.
    before = {m.name: driver.deployed.get(m.name) or fingerprint(m.start_command)
              for m in registry.machines}  # fmt: skip
    _run_build(driver, cmd)
    if config is not None:
        source = config_file_source(config)
    elif driver.config_source is not None:
        source = driver.config_source
    else:
        source = start_scripts_source(driver)
    new = source()
    check_config(new, need_test_script=False)
    return _apply(driver, new, before)


def _apply(driver: Driver, new: DriverConfig, before: dict[str, str]) -> Redeploy:
    from .driver import pythonize_name

    registry = driver.registry
    result = Redeploy()
    wanted: dict[str, MachineConfig] = dict(new.vms)
    scripts = {n: str(m.start_script.absolute()) for n, m in wanted.items()}
    prints = {n: fingerprint(s) for n, s in scripts.items()}
    removed = [n for n in before if n not in wanted]
    changed = [n for n in before if n in wanted and prints[n] != before[n]]
    added = [n for n in wanted if n not in before]
    result.unchanged = [n for n in before if n in wanted and n not in changed]
    old_vlans = set(registry.vlan_numbers)
    new_vlans = set(new.vlans)
    result.vlans_added = sorted(new_vlans - old_vlans)
    result.vlans_removed = sorted(old_vlans - new_vlans)

    with driver.logger.nested("updating machines"):
        # Stop what goes away or changes, all at once.
        going = [registry[n] for n in (*removed, *changed)]
        was_running = {m.name for m in going if m.booted}

        async def stop_all() -> None:
            await asyncio.gather(*(m.aio.release() for m in going), return_exceptions=True)

        run_sync(stop_all())
        symbols = driver._symbols
        for name in (*removed, *changed):
            registry.remove(name)
            driver.deployed.pop(name, None)
            if symbols is not None:
                symbols.pop(pythonize_name(name), None)
        result.removed = removed

        # VLANs: stop those that left, start the new ones, give every machine the new set.
        for vlan in [v for v in registry.vlans if v.nr in result.vlans_removed]:
            run_sync(vlan.stop())
            registry.vlans.remove(vlan)
            if symbols is not None:
                symbols.pop(f"vlan{vlan.nr}", None)
        registry.vlan_numbers = sorted(new_vlans)
        registry.start_vlans()
        for machine in registry.machines:
            for nr in result.vlans_removed:
                machine.lifecycle.extra_env.pop(f"QEMU_VDE_SOCKET_{nr}", None)

        # Define the changed and the new machines from their new scripts.
        for name in (*changed, *added):
            driver.create_machine(scripts[name], name=name)
            driver.deployed[name] = prints[name]
        result.added = added
        result.restarted = [n for n in changed if n in was_running]
        result.redefined = [n for n in changed if n not in was_running]
        for name in result.unchanged:
            driver.deployed[name] = prints[name]
        driver.config = dataclasses.replace(
            driver.config, vms=dict(wanted), vlans=sorted(new_vlans)
        )

        if result.restarted:
            restart = [registry[n] for n in result.restarted]

            async def start_all() -> None:
                await asyncio.gather(*(m.aio.start() for m in restart))

            run_sync(start_all())

        # The namespace: the machines, the VLANs, `machine` for a lone machine.
        if symbols is not None:
            symbols.pop("machine", None)
            # test_symbols() prints nixpkgs' banner; the summary below says what changed.
            with contextlib.redirect_stdout(io.StringIO()):
                driver.test_symbols()
        driver.logger.log(result.summary())
    driver.logger.log(FINISHED)
    return result
