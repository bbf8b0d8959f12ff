"""Machine definitions for a driver run: the ``--config`` JSON, the legacy flags, the env fallbacks.

Three generations of nixpkgs' ``nixos-test-driver`` are accepted:

* April 2026 on: ``--config driverConfiguration.json`` (``vms``, ``containers``, ``vlans``,
  ``global_timeout`` in seconds, ``enable_ssh_backdoor``, ``test_script``).
* January to April 2026: ``--vm-names``/``--vm-start-scripts`` (and the container twins),
  ``--vlans``, ``--global-timeout`` and a positional test script.
* Before: ``--start-scripts``, ``--vlans``, ``--global-timeout`` and a positional test script.

Flags left out fall back to the environment variables of nixpkgs' old wrapper (``startScripts``,
``vmNames``, ``vmStartScripts``, ``containerNames``, ``containerStartScripts``, ``vlans``,
``globalTimeout``, ``testScript``); list values are whitespace-separated. Every problem is a
:class:`ConfigError` whose message is one line naming the input and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "DEFAULT_GLOBAL_TIMEOUT",
    "DriverConfig",
    "MachineConfig",
    "check_config",
    "check_machine_name",
    "check_machine_names",
    "config_from_legacy",
    "container_name_from_start_script",
    "load_driver_configuration",
    "machine_name_from_start_script",
    "pythonize_name",
    "resolve_config",
]

# The ``globalTimeout`` default of nixpkgs' test framework.
DEFAULT_GLOBAL_TIMEOUT = dt.timedelta(hours=1)
_REQUIRED_KEYS = (
    "vms",
    "containers",
    "vlans",
    "global_timeout",
    "enable_ssh_backdoor",
    "test_script",
)


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    """One machine: its name and its ``run-<name>-vm`` start script."""

    name: str
    start_script: Path


@dataclasses.dataclass
class DriverConfig:
    """What a driver runs: nixpkgs' ``DriverConfiguration``, with defaults for an empty driver."""

    vms: dict[str, MachineConfig] = dataclasses.field(default_factory=dict)
    containers: dict[str, MachineConfig] = dataclasses.field(default_factory=dict)
    vlans: list[int] = dataclasses.field(default_factory=list)
    global_timeout: dt.timedelta = DEFAULT_GLOBAL_TIMEOUT
    enable_ssh_backdoor: bool = False
    test_script: Path | None = None


def machine_name_from_start_script(script: str | os.PathLike[str]) -> str:
    """nixpkgs' rule: ``run-<name>-vm`` gives ``<name>``, anything else ``machine``."""
    match = re.search("run-(.+)-vm$", Path(script).name)
    return match.group(1) if match else "machine"


def container_name_from_start_script(script: str | os.PathLike[str]) -> str | None:
    """``run-<name>-nspawn`` gives ``<name>`` (a container's script); anything else None."""
    match = re.search("run-(.+)-nspawn$", Path(script).name)
    return match.group(1) if match else None


# -- machine names ----------------------------------------------------------------------------


def pythonize_name(name: str) -> str:
    """A machine name as a Python identifier: ``my-vm`` -> ``my_vm``, ``1st`` -> ``_st``."""
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


def check_machine_name(name: object) -> str:
    """``name`` if it can name a machine: a plain file-name component (its state directory is
    ``vm-state-<name>``), one line. Raises ConfigError otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"a machine name must be a string, not {name!r}")
    if name in ("", ".", "..") or "/" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(
            f"invalid machine name {name!r}: a name is one file-name component "
            "(no '/', not '.' or '..', no control characters), e.g. 'vm1' or 'server-a'"
        )
    return name


def check_machine_names(names: Iterable[object]) -> None:
    """Every name valid (:func:`check_machine_name`), and no two names the same Python name in
    test scripts (``my-vm`` and ``my_vm`` would shadow each other)."""
    seen: dict[str, str] = {}
    for name in names:
        valid = check_machine_name(name)
        symbol = pythonize_name(valid)
        other = seen.setdefault(symbol, valid)
        if other != valid:
            raise ConfigError(
                f"machine names {other!r} and {valid!r} are both {symbol!r} in test scripts: "
                "rename one of them"
            )


# -- the JSON file ----------------------------------------------------------------------------


def _timeout(value: object, what: str) -> dt.timedelta:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            raise ConfigError(f"{what}: expected a number of seconds, got {value!r}") from None
    else:
        raise ConfigError(f"{what}: expected a number of seconds, got {value!r}")
    if seconds <= 0:
        raise ConfigError(f"{what}: must be more than 0 seconds, got {value!r}")
    return dt.timedelta(seconds=seconds)


def _vlans(values: Sequence[object], what: str) -> list[int]:
    vlans = []
    for value in values:
        if isinstance(value, bool):
            raise ConfigError(f"{what}: VLAN numbers are integers, got {value!r}")
        try:
            nr = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: VLAN numbers are integers, got {value!r}") from None
        if nr < 0:
            raise ConfigError(f"{what}: VLAN numbers are not negative, got {nr}")
        vlans.append(nr)
    return vlans


def _machines(value: object, key: str, source: str) -> dict[str, MachineConfig]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: '{key}' must be an object of machines, got {value!r}")
    machines = {}
    for name, entry in value.items():
        where = f"{source}: {key}.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object with 'start_script', got {entry!r}")
        script = entry.get("start_script")
        if not isinstance(script, str) or not script:
            raise ConfigError(f"{where}: missing key 'start_script' (the run-<name>-vm path)")
        declared = entry.get("name", name)
        if not isinstance(declared, str):
            raise ConfigError(f"{where}.name must be a string, got {declared!r}")
        machines[name] = MachineConfig(name=name, start_script=Path(script).absolute())
    return machines


def load_driver_configuration(path: str | os.PathLike[str]) -> DriverConfig:
    """Parse nixpkgs' ``driverConfiguration.json`` (nothing is checked on disk yet)."""
    source = f"config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a JSON file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise ConfigError(f"{source}: missing key '{key}'")
    vlans = data["vlans"]
    if not isinstance(vlans, list):
        raise ConfigError(f"{source}: 'vlans' must be a list of integers, got {vlans!r}")
    backdoor = data["enable_ssh_backdoor"]
    if not isinstance(backdoor, bool):
        raise ConfigError(
            f"{source}: 'enable_ssh_backdoor' must be true or false, got {backdoor!r}"
        )
    script = data["test_script"]
    if not isinstance(script, str) or not script:
        raise ConfigError(f"{source}: 'test_script' must be a path, got {script!r}")
    return DriverConfig(
        vms=_machines(data["vms"], "vms", source),
        containers=_machines(data["containers"], "containers", source),
        vlans=_vlans(vlans, f"{source}: vlans"),
        global_timeout=_timeout(data["global_timeout"], f"{source}: global_timeout"),
        enable_ssh_backdoor=backdoor,
        test_script=Path(script),
    )


# -- the legacy flags and environment --------------------------------------------------------


def _env_list(environ: Mapping[str, str], name: str) -> list[str] | None:
    value = environ.get(name)
    return value.split() if value is not None else None


def _named(
    names: Sequence[str] | None, scripts: Sequence[str], what: str, flags: str
) -> list[MachineConfig]:
    if names is None:
        names = [machine_name_from_start_script(s) for s in scripts]
    elif len(names) != len(scripts):
        raise ConfigError(
            f"{flags}: the number of {what} names and {what} start scripts must be the same: "
            f"{list(names)} vs. {list(scripts)}"
        )
    return [MachineConfig(n, Path(s).absolute()) for n, s in zip(names, scripts, strict=True)]


def config_from_legacy(
    *,
    start_scripts: Sequence[str] | None = None,
    vm_names: Sequence[str] | None = None,
    vm_start_scripts: Sequence[str] | None = None,
    container_names: Sequence[str] | None = None,
    container_start_scripts: Sequence[str] | None = None,
    vlans: Sequence[str | int] | None = None,
    global_timeout: str | float | None = None,
    test_script: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DriverConfig:
    """A configuration from the pre-JSON flags; a flag left out (None) falls back to its env var."""
    env = os.environ if environ is None else environ
    if start_scripts is None:
        start_scripts = _env_list(env, "startScripts")
    if vm_names is None:
        vm_names = _env_list(env, "vmNames")
    if vm_start_scripts is None:
        vm_start_scripts = _env_list(env, "vmStartScripts")
    if container_names is None:
        container_names = _env_list(env, "containerNames")
    if container_start_scripts is None:
        container_start_scripts = _env_list(env, "containerStartScripts")
    if vlans is None:
        vlans = _env_list(env, "vlans")
    if global_timeout is None:
        global_timeout = env.get("globalTimeout")
    if test_script is None:
        test_script = env.get("testScript") or None

    # A run-<name>-nspawn script among the start scripts is a container (nixos-repl's; nixpkgs
    # names containers with --container-* only).
    scripts = list(start_scripts or [])
    nspawn = [s for s in scripts if container_name_from_start_script(s) is not None]
    machines = [
        MachineConfig(machine_name_from_start_script(s), Path(s).absolute())
        for s in scripts
        if s not in nspawn
    ]
    machines += _named(vm_names, vm_start_scripts or [], "vm", "--vm-names/--vm-start-scripts")
    containers = [
        MachineConfig(str(container_name_from_start_script(s)), Path(s).absolute()) for s in nspawn
    ]
    containers += _named(
        container_names,
        container_start_scripts or [],
        "container",
        "--container-names/--container-start-scripts",
    )
    vms: dict[str, MachineConfig] = {}
    for machine in [*machines, *containers]:
        known = vms.get(machine.name)
        if known is not None:
            raise ConfigError(
                f"two start scripts define a machine named '{machine.name}': "
                f"{known.start_script} and {machine.start_script}"
            )
        vms[machine.name] = machine
    return DriverConfig(
        vms={m.name: m for m in machines},
        containers={c.name: c for c in containers},
        vlans=_vlans(vlans or [], "--vlans"),
        global_timeout=(
            DEFAULT_GLOBAL_TIMEOUT
            if global_timeout is None
            else _timeout(global_timeout, "--global-timeout")
        ),
        test_script=Path(test_script) if test_script is not None else None,
    )


def resolve_config(
    config_file: str | os.PathLike[str] | None,
    *,
    test_script: str | os.PathLike[str] | None = None,
    global_timeout: str | float | None = None,
    environ: Mapping[str, str] | None = None,
    **legacy: Sequence[str] | None,
) -> DriverConfig:
    """The configuration of one run: ``--config`` if given, else the legacy flags and env vars.

    ``test_script`` and ``global_timeout`` given on the command line override the file's.
    """
    if config_file is None:
        return config_from_legacy(
            test_script=test_script, global_timeout=global_timeout, environ=environ, **legacy
        )
    given = sorted(f"--{k.replace('_', '-')}" for k, v in legacy.items() if v is not None)
    if given:
        raise ConfigError(f"--config cannot be combined with {', '.join(given)}")
    config = load_driver_configuration(config_file)
    if test_script is not None:
        config.test_script = Path(test_script)
    if global_timeout is not None:
        config.global_timeout = _timeout(global_timeout, "--global-timeout")
    return config


# -- checks before anything starts -----------------------------------------------------------


def check_config(config: DriverConfig, *, need_test_script: bool = True) -> None:
    """Refuse what cannot run: containers without root or systemd-nspawn, bad machine names,
    missing or non-executable start scripts, no script."""
    both = sorted(set(config.vms) & set(config.containers))
    if both:
        raise ConfigError(
            f"'{both[0]}' names both a machine and a container: names are unique across kinds, "
            "rename one of them"
        )
    if config.containers:
        names = ", ".join(sorted(config.containers))
        if os.geteuid() != 0:
            raise ConfigError(f"containers (systemd-nspawn) need root; run as root: {names}")
        if shutil.which("systemd-nspawn") is None:
            raise ConfigError(
                "containers need systemd-nspawn (Debian: apt-get install systemd-container): "
                f"{names}"
            )
    check_machine_names([*config.vms, *config.containers])
    for kind, machines in (("machine", config.vms), ("container", config.containers)):
        for name, machine in machines.items():
            script = machine.start_script
            if not script.exists():
                raise ConfigError(f"start script of {kind} '{name}' does not exist: {script}")
            if not script.is_file():
                raise ConfigError(f"start script of {kind} '{name}' is not a file: {script}")
            if not os.access(script, os.X_OK):
                raise ConfigError(
                    f"start script of {kind} '{name}' is not executable: {script} (chmod +x it)"
                )
    if need_test_script:
        if config.test_script is None:
            raise ConfigError(
                "no test script: pass it as an argument, in the config's 'test_script', "
                "or in $testScript"
            )
        if not config.test_script.is_file():
            raise ConfigError(f"test script {config.test_script} does not exist")
        if not os.access(config.test_script, os.R_OK):
            raise ConfigError(f"test script {config.test_script} is not readable")
