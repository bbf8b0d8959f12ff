"""``test_driver.machine.qmp``: QMP errors."""

from nixos_repl.errors import QMPAPIError
from nixos_repl.machine.qmp import QMPSession

__all__ = ["QMPAPIError", "QMPSession"]
