"""``test_driver.display``: whether QEMU can open a window."""

from nixos_repl.machine.process import graphical_display_available

__all__ = ["graphical_display_available"]
