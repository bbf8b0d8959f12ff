"""The text side of nixpkgs' systemd helpers: the commands they run and how replies are read."""

from __future__ import annotations

import re
import shlex

from ..errors import RequestedAssertionFailed

__all__ = [
    "diagnostics_script",
    "format_diagnostics",
    "parse_unit_info",
    "parse_unit_property",
    "systemctl_command",
]

# How many journal lines a failed wait shows.
JOURNAL_LINES = 30

# Section markers of the diagnostics script's output.
_SECTION = "=== nixos-repl: "

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


def diagnostics_script(unit: str | None, user: str | None = None) -> str:
    """One guest command that gathers what systemd knows about a failed wait.

    The unit's state, the failed units and the last lines of the unit's journal (of the whole
    journal without a unit), each under a marker. Prints nothing on a guest without systemd.
    """
    parts = ["command -v systemctl >/dev/null 2>&1 || exit 0"]
    journal = f"journalctl --no-pager -n {JOURNAL_LINES}"
    if unit is not None:
        q = shlex.quote(unit)
        show = systemctl_command(f"--no-pager show -p ActiveState -p SubState -p Result {q}", user)
        parts.append(f"echo '{_SECTION}state'; {show} 2>&1")
        journal += f" --user-unit {q}" if user is not None else f" -u {q}"
    parts.append(f"echo '{_SECTION}failed'; systemctl --no-pager --failed --plain --no-legend 2>&1")
    parts.append(
        "if command -v journalctl >/dev/null 2>&1; then "
        f"echo '{_SECTION}journal'; {journal} 2>&1; fi"
    )
    return "; ".join(parts) + "; true"


def format_diagnostics(unit: str | None, output: str) -> str:
    """The diagnostics script's output as lines to append to an error message ('' if none)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(_SECTION):
            current = sections.setdefault(line[len(_SECTION) :], [])
        elif current is not None and line.strip():
            current.append(line.rstrip())
    if not sections:
        return ""
    text = []
    if "state" in sections:
        # systemd prints properties in its own order, not in the order asked for.
        order = ["ActiveState", "SubState", "Result"]
        state = sorted(sections["state"], key=lambda line: _rank(order, line.split("=")[0]))
        text.append(f"state of {unit}: " + ", ".join(state))
    failed = sections.get("failed", [])
    text.append("failed units:" + ("" if failed else " none"))
    text += [f"  {line}" for line in failed]
    if "journal" in sections:
        whose = f"{unit}'s journal" if unit is not None else "the journal"
        text.append(f"last {JOURNAL_LINES} lines of {whose}:")
        text += [f"  {line}" for line in sections["journal"][-JOURNAL_LINES:]]
    return "\n" + "\n".join(line.rstrip() for line in text)


def _rank(order: list[str], key: str) -> int:
    return order.index(key) if key in order else len(order)
