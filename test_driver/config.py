"""``test_driver.config``: the driver configuration (``driverConfiguration.json``)."""

from nixos_repl.config import DriverConfig as DriverConfiguration
from nixos_repl.config import MachineConfig as MachineConfiguration
from nixos_repl.config import load_driver_configuration

# nixpkgs' per-kind classes; nixos-repl has one class for both (containers are refused).
QemuMachineConfiguration = MachineConfiguration
NspawnMachineConfiguration = MachineConfiguration

__all__ = [
    "DriverConfiguration",
    "MachineConfiguration",
    "NspawnMachineConfiguration",
    "QemuMachineConfiguration",
    "load_driver_configuration",
]
