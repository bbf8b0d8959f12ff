"""``test_driver.qmp``: the QMP session's older module path (now ``test_driver.machine.qmp``)."""

from test_driver.machine.qmp import QMPAPIError, QMPSession

__all__ = ["QMPAPIError", "QMPSession"]
