"""nixos-repl: an interactive environment for NixOS VM tests.

The library entry point is :class:`Registry`::

    with Registry.from_start_scripts(["./run-vm1-vm"]) as registry:
        print(registry["vm1"].succeed("uname -a"))
"""

from .config import DriverConfig, MachineConfig
from .driver import Driver
from .errors import (
    ConfigError,
    MachineError,
    NixosReplError,
    PollingConditionError,
    QMPAPIError,
    RequestedAssertionFailed,
    UnknownMachineError,
)
from .machine import BaseMachine, Machine, QemuMachine
from .registry import Registry
from .version import __version__

__all__ = [
    "BaseMachine",
    "ConfigError",
    "Driver",
    "DriverConfig",
    "Machine",
    "MachineConfig",
    "MachineError",
    "NixosReplError",
    "PollingConditionError",
    "QMPAPIError",
    "QemuMachine",
    "Registry",
    "RequestedAssertionFailed",
    "UnknownMachineError",
    "__version__",
]


def load_ipython_extension(ip: object) -> None:
    """``%load_ext nixos_repl``: the magics and the test namespace (see nixos_repl.interactive)."""
    from .interactive import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: object) -> None:
    from .interactive import unload_ipython_extension as unload

    unload(ip)
