"""``test_driver.driver``: the Driver and its configuration."""

from nixos_repl.config import DriverConfig as DriverConfiguration
from nixos_repl.config import load_driver_configuration
from nixos_repl.driver import AssertionTester, Driver, get_tmp_dir, pythonize_name

__all__ = [
    "AssertionTester",
    "Driver",
    "DriverConfiguration",
    "get_tmp_dir",
    "load_driver_configuration",
    "pythonize_name",
]
