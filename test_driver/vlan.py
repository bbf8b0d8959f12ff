"""``test_driver.vlan``: one vde_switch per VLAN."""

from nixos_repl.vlan import VLan

__all__ = ["VLan"]
