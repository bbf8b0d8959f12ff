"""The text side of nixpkgs' systemd helpers: the commands they run and how replies are read."""

from __future__ import annotations

import re

from ..errors import RequestedAssertionFailed

__all__ = ["parse_unit_info", "parse_unit_property", "systemctl_command"]

_PROPERTY_LINE = re.compile(r"^([^=]+)=(.*)$")


def systemctl_command(q: str, user: str | None = None) -> str:
    """``systemctl <q>``, or ``systemctl --user <q>`` run as ``user`` (nixpkgs' quoting)."""
    if user is None:
        return f"systemctl {q}"
    q = q.replace("'", "\\'")
    return (
        f"su -l {user} --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user {q}'"
    )


def _under(user: str | None) -> str:
    return f' under user "{user}"' if user is not None else ""


def parse_unit_info(unit: str, user: str | None, status: int, lines: str) -> dict[str, str]:
    """``systemctl show`` output as a dict; a non-zero status raises nixpkgs' message."""
    if status != 0:
        raise RequestedAssertionFailed(
            f'retrieving systemctl info for unit "{unit}"{_under(user)} failed with exit code '
            f"{status}"
        )
    info = {}
    for line in lines.split("\n"):
        match = _PROPERTY_LINE.match(line)
        if match:
            info[match.group(1)] = match.group(2)
    return info


def parse_unit_property(unit: str, property: str, user: str | None, status: int, lines: str) -> str:
    """The value in ``systemctl show --property`` output; nixpkgs' messages on failure."""
    if status != 0:
        raise RequestedAssertionFailed(
            f'retrieving systemctl property "{property}" for unit "{unit}"{_under(user)} '
            f"failed with exit code {status}"
        )
    match = _PROPERTY_LINE.match(lines.strip())
    if match is None or match.group(1) != property:
        raise RequestedAssertionFailed(
            f"unexpected systemctl output for {unit}.{property}: {lines!r}"
        )
    return match.group(2)
