"""``attempt_timeout``: a try that blocks is cut and the next one starts (nixpkgs #554716)."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from nixos_repl import Machine, RequestedAssertionFailed
from nixos_repl.driver import retry

# Blocks until /tmp/go exists, which a background job creates after 2 s.
BLOCKING_PROBE = "if [ -e /tmp/go ]; then echo ready; else sleep 100; fi"


@pytest.fixture
def go_in_two_seconds(vm1: Machine) -> Machine:
    vm1.succeed("rm -f /tmp/go; (sleep 2; touch /tmp/go) >/dev/null 2>&1 &")
    return vm1


def test_wait_until_succeeds_retries_a_blocked_try(go_in_two_seconds: Machine) -> None:
    start = time.monotonic()
    out = go_in_two_seconds.wait_until_succeeds(BLOCKING_PROBE, timeout=30, attempt_timeout=1)
    # Without the bound the first try would sleep until the 30 s budget is spent.
    assert out == "ready\n"
    assert time.monotonic() - start < 20


def test_retry_cuts_the_commands_of_a_try(go_in_two_seconds: Machine) -> None:
    start = time.monotonic()
    retry(
        lambda _last: go_in_two_seconds.execute(BLOCKING_PROBE)[0] == 0,
        timeout=dt.timedelta(seconds=30),
        attempt_timeout=dt.timedelta(seconds=1),
    )
    assert time.monotonic() - start < 20
    # The bound ends with the retry: a later command has its own timeout again.
    assert go_in_two_seconds.execute("sleep 1.5; echo slept")[1] == "slept\n"


def test_a_cut_try_does_not_count_as_a_failure(vm1: Machine) -> None:
    with pytest.raises(RequestedAssertionFailed, match="action timed out after"):
        vm1.wait_until_fails("sleep 100", timeout=3, attempt_timeout=1)


def test_a_cut_try_that_redirected_its_output_is_killed(vm1: Machine) -> None:
    # nixpkgs' attempt-timeout self-test: a try that keeps nothing of its stdout open.
    start = time.monotonic()
    with pytest.raises(RequestedAssertionFailed, match="action timed out after"):
        vm1.wait_until_fails("exec sleep 100 > /dev/null", timeout=3, attempt_timeout=1)
    assert vm1.succeed("echo next") == "next\n"
    assert time.monotonic() - start < 3 + 3, "no try, and no later command, waits behind one"
    assert "sleep 100" not in vm1.succeed("ps -o args")
