"""``test_driver.polling_condition``: polling conditions."""

from nixos_repl.driver import PollingCondition
from nixos_repl.errors import PollingConditionError

__all__ = ["PollingCondition", "PollingConditionError"]
