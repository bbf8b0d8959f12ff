"""``test_driver.logger``: the logger interface of test scripts (``log``)."""

from nixos_repl.logs import AbstractLogger, DriverLogger, LogLevel

__all__ = ["AbstractLogger", "DriverLogger", "LogLevel"]
