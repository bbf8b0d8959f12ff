"""Guest-side waits: one backdoor command that loops in the guest until a condition holds.

nixpkgs' waits send one command per try and sleep a second between tries on the host. Here the
host sends one command: a bash loop that runs the probe, in a fresh ``set -euo pipefail`` subshell
with stdin ``/dev/null`` exactly as ``execute`` runs a command, every ``INTERVAL`` seconds (a
``read -t`` on an idle pipe: no process per pause) until the probe's status is the wanted one or
the deadline passes. A probe that takes longer than the interval (``systemctl`` under TCG) is
followed by a pause as long as itself, so the loop never takes more than half of the guest's
CPU from what it waits for. A condition that becomes true is seen within one pause plus one
probe, with no round trip per try. The probe's output is captured whole (trailing newlines
included) and only the last try's output is returned.

The callers keep nixpkgs' semantics around this. The try under way at the deadline is nixpkgs'
one last try, and a try that blocks is killed ``LAST_TRY_GRACE`` after the deadline, so a wait
ends within its timeout plus that grace; a caller whose messages come from its own check
(``wait_for_unit``) makes that check on the host afterwards. A loop is interrupted like any
command (Ctrl-C or its host-side limit kill it and everything it started).
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Awaitable
from typing import Protocol

from . import systemd
from .timing import LAST_TRY_GRACE

__all__ = ["INTERVAL", "loop_script", "unit_in_state", "unit_settled", "until"]

# Pause between two tries inside the guest.
INTERVAL = 0.05
# How much longer than its deadline the host lets a loop run before killing it (a guest too
# slow to end the loop itself).
SLACK = LAST_TRY_GRACE + 0.5


def loop_script(probe: str, want_success: bool, limit: float, interval: float = INTERVAL) -> str:
    """The bash text of a guest loop over ``probe`` (see the module's documentation).

    The pause between tries is ``interval``, or as long as the last try took if that was longer,
    but never past the deadline: the try under way at the deadline is nixpkgs' last try. A
    watchdog (one fork per wait, sleeping in ``read -t``) kills the try under way, with every
    process it started, ``LAST_TRY_GRACE`` seconds after the deadline, so the loop ends then
    even if the probe blocks.

    It exits 0 once the probe's status is the wanted one (0 when ``want_success``, else non-zero),
    printing that try's output; 1 after the deadline, printing the last try's output.
    """
    met = "-eq" if want_success else "-ne"
    micros = max(0, int(limit * 1_000_000))
    pause = max(1, int(interval * 1_000_000))
    watchdog = max(0.0, limit) + LAST_TRY_GRACE
    return (
        "set +e\n"
        f"__nr_end=$(( ${{EPOCHREALTIME//[!0-9]/}} + {micros} ))\n"
        "exec {__nr_z}<> <(:)\n"
        f"__nr_p={shlex.quote(probe)}\n"
        "__nr_me=$BASHPID\n"
        "__nr_tree() {\n"
        "  local p k=()\n"
        '  builtin kill -STOP "$1" 2>/dev/null || return 0\n'
        '  read -r -a k 2>/dev/null < "/proc/$1/task/$1/children"\n'
        '  for p in "${k[@]}"; do __nr_tree "$p"; done\n'
        '  builtin kill -KILL "$1"; builtin kill -CONT "$1" 2>/dev/null\n'
        "}\n"
        f"( read -r -t {watchdog:.6f} -u $__nr_z\n"
        '  read -r -a __nr_k 2>/dev/null < "/proc/$__nr_me/task/$__nr_me/children"\n'
        '  for __nr_c in "${__nr_k[@]}"; do\n'
        '    [[ $__nr_c == "$BASHPID" ]] || __nr_tree "$__nr_c"\n'
        "  done ) > /dev/null &\n"
        "__nr_w=$!\n"
        "while :; do\n"
        "  __nr_t=${EPOCHREALTIME//[!0-9]/}\n"
        '  __nr_o=$( ( set -euo pipefail; eval "$__nr_p" ) {__nr_z}<&- </dev/null; '
        "__nr_r=$?; echo x; exit $__nr_r )\n"
        "  __nr_r=$? __nr_n=${EPOCHREALTIME//[!0-9]/}\n"
        f'  if [ "$__nr_r" {met} 0 ]; then printf %s "${{__nr_o%x}}"; break; fi\n'
        '  if (( __nr_n >= __nr_end )); then printf %s "${__nr_o%x}"; __nr_r=; break; fi\n'
        # Pause as long as the try took (at least the interval): the probe never takes more
        # than half of a slow guest's CPU away from what it waits for.
        f"  __nr_d=$(( __nr_n - __nr_t > {pause} ? __nr_n - __nr_t : {pause} ))\n"
        "  __nr_d=$(( __nr_d < __nr_end - __nr_n ? __nr_d : __nr_end - __nr_n ))\n"
        "  printf -v __nr_d '%d.%06d' $(( __nr_d / 1000000 )) $(( __nr_d % 1000000 ))\n"
        "  read -r -t $__nr_d -u $__nr_z\n"
        "done\n"
        "builtin kill -KILL $__nr_w 2>/dev/null\n"
        '[ -n "$__nr_r" ]\n'
    )


class Execute(Protocol):
    """The machine's ``execute`` coroutine (what a loop runs its script with)."""

    def __call__(
        self, command: str, check_return: bool = ..., *, timeout: float | None = ...
    ) -> Awaitable[tuple[int, str]]: ...


async def until(
    execute: Execute, log: logging.Logger, probe: str, want_success: bool, limit: float
) -> tuple[bool, str]:
    """Loop ``probe`` in the guest for up to ``limit`` seconds; returns (condition seen, output).

    The output is the last try's. A loop the host had to kill (the guest is too slow to end it
    by itself) counts as not seen.
    """
    start = time.monotonic()
    status, output = await execute(
        loop_script(probe, want_success, limit), check_return=True, timeout=limit + SLACK
    )
    log.debug(
        "guest-side wait for `%s`: %s after %.2f s",
        probe if len(probe) < 200 else probe[:200] + "...",
        "seen" if status == 0 else "not seen",
        time.monotonic() - start,
    )
    return status == 0, output


def unit_settled(unit: str, user: str | None = None) -> str:
    """A probe that succeeds once ``wait_for_unit`` has something to decide: the unit is active
    or failed, or inactive with no job pending (nixpkgs' commands, read in the guest)."""
    show = systemd.systemctl_command(f'--no-pager show "{unit}" --property="ActiveState"', user)
    jobs = systemd.systemctl_command("list-jobs --full 2>&1", user)
    return (
        f"__nr_s=$({show}) || exit 0\n"
        'case "$__nr_s" in\n'
        "  ActiveState=active|ActiveState=failed) exit 0 ;;\n"
        f'  ActiveState=inactive) [[ $({jobs}) == *"No jobs"* ]] && exit 0 ;;\n'
        "esac\n"
        "exit 1\n"
    )


def unit_in_state(unit: str, user: str | None = None, *, state: str) -> str:
    """A probe that succeeds once the unit's ActiveState is ``state`` (or cannot be read)."""
    show = systemd.systemctl_command(f'--no-pager show "{unit}" --property="ActiveState"', user)
    return f'__nr_s=$({show}) || exit 0\n[ "$__nr_s" = {shlex.quote("ActiveState=" + state)} ]\n'
