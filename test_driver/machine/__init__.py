"""``test_driver.machine``: the machine classes and ``retry``."""

from nixos_repl.driver import NspawnMachine, retry
from nixos_repl.machine import BaseMachine, Machine, QemuMachine

__all__ = ["BaseMachine", "Machine", "NspawnMachine", "QemuMachine", "retry"]
