"""``test_driver.machine``: the machine classes and ``retry``."""

from nixos_repl.driver import retry
from nixos_repl.machine import BaseMachine, Machine, NspawnMachine, QemuMachine
from nixos_repl.machine.keys import CHAR_TO_KEY

__all__ = ["CHAR_TO_KEY", "BaseMachine", "Machine", "NspawnMachine", "QemuMachine", "retry"]
