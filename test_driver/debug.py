"""``test_driver.debug``: the debug hook interface (``debug``)."""

from nixos_repl.driver import Debug, DebugAbstract, DebugNop

__all__ = ["Debug", "DebugAbstract", "DebugNop"]
