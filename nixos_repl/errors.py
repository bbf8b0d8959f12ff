"""The exception hierarchy, in one place. nixpkgs names are kept where test scripts catch them."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "GuestBuildError",
    "MachineError",
    "NixosReplError",
    "PollingConditionError",
    "QMPAPIError",
    "RebuildError",
    "RequestedAssertionFailed",
    "UnknownMachineError",
]


class NixosReplError(Exception):
    """Base of errors raised by nixos-repl itself (not the user's assertions)."""


class MachineError(NixosReplError):
    """Something went wrong with a machine that is not the test's fault (QEMU died, tool missing).

    Same name and meaning as nixpkgs' ``test_driver.errors.MachineError``.
    """


class UnknownMachineError(NixosReplError, KeyError):
    """A machine name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class RequestedAssertionFailed(AssertionError):
    """A test assertion failed (``succeed``, ``fail``, ``wait_*``, ``t.assert*``), as in nixpkgs."""


class PollingConditionError(Exception):
    """A polling condition failed, as in nixpkgs."""


class GuestBuildError(NixosReplError):
    """An embedded guest could not be built (a missing Debian package, an unknown module...)."""


class QMPAPIError(RuntimeError):
    """An error returned by QEMU over QMP, with nixpkgs' attributes."""

    def __init__(self, message: dict[str, object]) -> None:
        error = message.get("error")
        err = error if isinstance(error, dict) else {}
        self.class_name = str(err.get("class", ""))
        self.description = str(err.get("desc", ""))
        self.transaction_id = message.get("id")
        super().__init__(
            f"<QMP API error related to transaction {self.transaction_id} "
            f"[{self.class_name}]: {self.description}>"
        )


class ConfigError(NixosReplError):
    """A driver configuration that cannot be used (malformed file, missing key, bad start script).

    The message is one line saying which input is wrong and why; nothing has been started.
    """


class RebuildError(NixosReplError):
    """``rebuild()``: the build command failed or cannot run; nothing was redeployed."""
