"""nixpkgs' ``test_driver`` module paths over nixos-repl, for scripts and type stubs importing them.

``nixos-test-driver`` and ``generate-driver-symbols`` are this package's ``main`` and
``generate_driver_symbols``, as in nixpkgs.
"""

from nixos_repl.cli import generate_driver_symbols
from nixos_repl.cli import test_driver_main as main

__all__ = ["generate_driver_symbols", "main"]
