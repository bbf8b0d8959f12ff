"""``test_driver.efi``: EFI variables. nixos-repl does not edit OVMF variable stores: the names
exist so that scripts and their type checks import, and using them raises MachineError."""

from typing import Any

from nixos_repl.errors import MachineError

__all__ = ["EfiGuid", "EfiVariable", "EfiVars"]


def _unsupported(*args: Any, **kwargs: Any) -> None:
    raise MachineError(
        "EFI variables (test_driver.efi) are not supported by nixos-repl; run this test with "
        "nixpkgs' driver"
    )


class EfiVariable:
    """An OVMF variable (not supported)."""

    class Flags:
        NON_VOLATILE = 0x1
        BOOTSERVICE_ACCESS = 0x2
        RUNTIME_ACCESS = 0x4
        TIME_BASED_AUTHENTICATED_WRITE_ACCESS = 0x20

    class State:
        VAR_HEADER_VALID_ONLY = 0x7F
        VAR_ADDED = 0x3F

    __init__ = _unsupported


class EfiVars:
    """A machine's OVMF variable store (not supported)."""

    __init__ = _unsupported


class EfiGuid:
    """Well-known vendor GUIDs (not supported)."""

    __init__ = _unsupported
