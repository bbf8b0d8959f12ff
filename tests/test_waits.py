"""Waits that loop in the guest: one backdoor command per wait, nixpkgs' results and messages."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nixos_repl import Machine, RequestedAssertionFailed
from nixos_repl.machine import waits

from .helpers import interrupt_after

COUNTER = "/tmp/wait-tries"
# Prints which try this is (0, 1, ...) and succeeds from the third one.
THIRD_TRY = (
    f"n=$(cat {COUNTER} 2>/dev/null || echo 0); echo $((n + 1)) > {COUNTER}; "
    "echo try-$n; printf '\\n\\n'; [ $n -ge 2 ]"
)


@pytest.fixture
def commands(vm1: Machine, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The commands the host sends to vm1's backdoor during the test."""
    vm1.succeed(f"rm -f {COUNTER}")
    shell = vm1.shell
    assert shell is not None
    sent: list[str] = []
    execute = shell.execute

    async def spy(command: str, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        sent.append(command)
        return await execute(command, *args, **kwargs)

    monkeypatch.setattr(shell, "execute", spy)
    yield sent


def test_wait_until_succeeds_returns_the_successful_try_only(
    vm1: Machine, commands: list[str]
) -> None:
    assert vm1.wait_until_succeeds(THIRD_TRY) == "try-2\n\n\n"
    assert len(commands) == 1, "one guest-side loop, not one command per try"
    assert vm1.succeed(f"cat {COUNTER}") == "3\n"


def test_wait_until_fails_returns_the_failing_try(vm1: Machine, commands: list[str]) -> None:
    out = vm1.wait_until_fails(f"{THIRD_TRY.removesuffix('[ $n -ge 2 ]')}[ $n -lt 2 ]")
    assert out == "try-2\n\n\n"
    assert len(commands) == 1


def test_each_try_is_a_fresh_strict_shell(vm1: Machine, commands: list[str]) -> None:
    # An unset variable fails the try (set -u); a `cd` or variable does not reach the next try.
    probe = f"{THIRD_TRY}; cd /; x=set; echo $undefined_variable"
    with pytest.raises(RequestedAssertionFailed):
        vm1.wait_until_succeeds(probe, timeout=1)
    assert vm1.wait_until_succeeds('[ "$(pwd)" = /tmp ] && [ -z "${x-}" ] && echo fresh') == (
        "fresh\n"
    )


def test_timeout_raises_nixpkgs_message_after_a_last_try(vm1: Machine, commands: list[str]) -> None:
    with pytest.raises(RequestedAssertionFailed) as error:
        vm1.wait_until_succeeds(f"echo x >> {COUNTER}; false", timeout=1)
    assert re.fullmatch(
        r"action timed out after \d+\.\d\d seconds \(timeout=1\.0\)", str(error.value)
    )
    assert len(commands) == 1, "the guest-side loop makes nixpkgs' last try itself"
    tries = int(vm1.succeed(f"wc -l < {COUNTER}"))
    assert tries > 2, "the loop tried more than once in the guest"


def test_a_blocking_try_ends_with_the_wait(vm1: Machine, commands: list[str]) -> None:
    start = time.monotonic()
    with pytest.raises(RequestedAssertionFailed, match="action timed out after"):
        vm1.wait_until_succeeds("sleep 1000", timeout=3)
    assert time.monotonic() - start < 3 + 2, "the wait ends at its timeout, not 10 s later"
    assert "sleep 1000" not in vm1.succeed("ps -o args")


def test_a_blocking_try_ends_with_a_host_side_wait_too(vm1: Machine) -> None:
    vm1.callbacks.append(lambda: None)  # polling conditions: the host loops
    try:
        start = time.monotonic()
        with pytest.raises(RequestedAssertionFailed, match="action timed out after"):
            vm1.wait_until_succeeds("sleep 1000", timeout=3)
        assert time.monotonic() - start < 3 + 2, "no try runs on past the wait's end"
    finally:
        vm1.callbacks.clear()


def test_wait_for_file_and_port(vm1: Machine, commands: list[str]) -> None:
    vm1.succeed("rm -f /tmp/later; (sleep 1; touch /tmp/later) >/dev/null 2>&1 &")
    vm1.wait_for_file("/tmp/later")
    vm1.succeed("(sleep 1; nc -l -p 7357 >/dev/null 2>&1) >/dev/null 2>&1 &")
    vm1.wait_for_open_port(7357)
    waits_sent = [c for c in commands if "__nr_end" in c]
    assert len(waits_sent) == 2


def test_an_interrupt_kills_the_loop_and_keeps_the_channel(
    vm1: Machine, commands: list[str]
) -> None:
    interrupt_after(1.0)
    with pytest.raises(KeyboardInterrupt):
        vm1.wait_until_succeeds(f"echo x >> {COUNTER}; false")
    before = vm1.succeed(f"wc -l < {COUNTER}")
    assert vm1.succeed(f"sleep 0.5; wc -l < {COUNTER}") == before, "the loop is gone"
    assert vm1.succeed("echo mine") == "mine\n"


def test_polling_conditions_keep_one_command_per_try(vm1: Machine, commands: list[str]) -> None:
    calls: list[int] = []
    vm1.callbacks.append(lambda: calls.append(1))
    try:
        assert vm1.wait_until_succeeds(THIRD_TRY) == "try-2\n\n\n"
    finally:
        vm1.callbacks.clear()
    assert len(commands) == 3 and len(calls) == 3, "nixpkgs runs them before every try"


def test_the_unit_probe_uses_nixpkgs_commands() -> None:
    probe = waits.unit_settled("nginx.service", "alice")
    assert '--no-pager show "nginx.service" --property="ActiveState"' in probe
    assert "su -l alice --shell /bin/sh" in probe and "list-jobs --full" in probe
    script = waits.loop_script("true", True, 2.5)
    assert "2500000" in script and "> 50000 ? __nr_n - __nr_t : 50000" in script
