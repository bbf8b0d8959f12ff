"""``%rebuild CMD``: run a build command and redeploy the changed machines (``rebuild(cmd)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class

from .magics import magic

if TYPE_CHECKING:
    from .session import Session

__all__ = ["RebuildMagics"]


@magics_class
class RebuildMagics(Magics):
    """``%rebuild``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    @magic("rebuild")
    def rebuild(self, line: str) -> Any:
        """%rebuild CMD...: run the build command CMD (the rest of the line, as typed), then
        redeploy: machines whose start script changed restart, new ones are added, removed ones
        stop, VLANs follow the new set, and ``vm1``, ``machines``, ``vlan<N>`` are rebound.
        The same as ``rebuild("CMD")``; shows what changed."""
        if not line.strip():
            raise UsageError(
                "missing the build command\nusage: %rebuild CMD...  "
                "(e.g. %rebuild nix-build -A driverInteractive)"
            )
        return self.session.driver.rebuild(line.strip())
