"""``test_driver.errors``: the exceptions test scripts catch."""

from nixos_repl.errors import MachineError, RequestedAssertionFailed

__all__ = ["MachineError", "RequestedAssertionFailed"]
