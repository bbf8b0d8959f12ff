"""``test_driver.logger``: the logger interface of test scripts (``log``)."""

from nixos_repl.logs import AbstractLogger, DriverLogger, LogLevel

# nixpkgs' name for the class of ``log`` (its test-script-prepend.py imports it).
CompositeLogger = DriverLogger

__all__ = ["AbstractLogger", "CompositeLogger", "DriverLogger", "LogLevel"]
