"""nixpkgs' systemd helpers, driven against a stand-in systemctl inside the tiny guest.

The tiny guest has no systemd; a small script answers the few systemctl calls the driver makes, so
the driver's own logic (state polling, the fast failures, messages) runs for real over the shell.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest

from nixos_repl import Machine, RequestedAssertionFailed

FAKE_SYSTEMCTL = r"""#!/bin/sh
state=$(cat /tmp/fake-state 2>/dev/null || echo inactive)
case "$*" in
  *list-jobs*) cat /tmp/fake-jobs 2>/dev/null || echo "No jobs running." ;;
  *--failed*) [ "$state" = failed ] && echo "foo.service loaded failed failed Foo" ;;
  *--property=*) echo "ActiveState=$state" ;;
  *show\ -p*) printf 'ActiveState=%s\nSubState=dead\nResult=exit-code\n' "$state" ;;
  *show*) printf 'Id=%s\nActiveState=%s\nSubState=running\n' "${3:-x}" "$state" ;;
  *) echo "$*" >> /tmp/fake-log ;;
esac
"""


# 40 numbered lines, whatever the flags: the driver itself keeps the last 30.
FAKE_JOURNALCTL = """#!/bin/sh
echo "journalctl $*"
i=1; while [ $i -le 40 ]; do echo "journal line $i"; i=$((i+1)); done
"""


@pytest.fixture
def systemd(vm2: Machine) -> Iterator[Machine]:
    vm2.succeed(f"cat > /sbin/systemctl <<'EOF'\n{FAKE_SYSTEMCTL}EOF\nchmod +x /sbin/systemctl")
    vm2.succeed(f"cat > /sbin/journalctl <<'EOF'\n{FAKE_JOURNALCTL}EOF\nchmod +x /sbin/journalctl")
    vm2.succeed("rm -f /tmp/fake-state /tmp/fake-jobs /tmp/fake-log")
    yield vm2
    vm2.succeed("rm -f /sbin/systemctl /sbin/journalctl")


def test_wait_for_unit_sees_a_unit_become_active(systemd: Machine) -> None:
    systemd.succeed("echo activating > /tmp/fake-state")
    systemd.succeed("(sleep 1; echo active > /tmp/fake-state) > /dev/null 2>&1 &")
    systemd.wait_for_unit("foo.service", timeout=dt.timedelta(seconds=20))
    assert systemd.get_unit_info("foo.service")["ActiveState"] == "active"
    assert systemd.get_unit_property("foo.service", "ActiveState") == "active"
    systemd.require_unit_state("foo.service")


def test_wait_for_unit_fails_fast(systemd: Machine) -> None:
    systemd.succeed("echo failed > /tmp/fake-state")
    failed = r'unit "foo\.service" reached state "failed"'
    with pytest.raises(RequestedAssertionFailed, match=failed):
        systemd.wait_for_unit("foo.service", timeout=10)
    systemd.succeed("echo inactive > /tmp/fake-state")
    with pytest.raises(RequestedAssertionFailed, match="is inactive and there are no pending jobs"):
        systemd.wait_for_unit("foo.service", timeout=10)
    with pytest.raises(RequestedAssertionFailed, match="to to be in state 'active'"):
        systemd.require_unit_state("foo.service")


def test_start_and_stop_job(systemd: Machine) -> None:
    systemd.start_job("bar.service")
    systemd.stop_job("bar.service")
    assert systemd.succeed("cat /tmp/fake-log") == "start bar.service\nstop bar.service\n"


def test_a_failed_unit_is_explained(systemd: Machine) -> None:
    systemd.succeed("echo failed > /tmp/fake-state")
    with pytest.raises(RequestedAssertionFailed) as failure:
        systemd.wait_for_unit("foo.service", timeout=10)
    lines = str(failure.value).splitlines()
    assert lines[0] == 'unit "foo.service" reached state "failed"'
    assert lines[1] == "state of foo.service: ActiveState=failed, SubState=dead, Result=exit-code"
    assert lines[2:4] == ["failed units:", "  foo.service loaded failed failed Foo"]
    assert lines[4] == "last 30 lines of foo.service's journal:"
    assert lines[5:] == [f"  journal line {i}" for i in range(11, 41)]


def test_wait_for_unit_active_state_waits_through_failed_and_inactive(systemd: Machine) -> None:
    systemd.succeed("echo inactive > /tmp/fake-state")
    systemd.succeed("(sleep 1; echo failed > /tmp/fake-state) > /dev/null 2>&1 &")
    systemd.wait_for_unit_active_state("foo.service", "failed", timeout=dt.timedelta(seconds=20))
    with pytest.raises(RequestedAssertionFailed) as failure:
        systemd.wait_for_unit_active_state("foo.service", "active", 2)
    first, state = str(failure.value).splitlines()[:2]
    assert re.fullmatch(r"action timed out after \d+\.\d\d seconds \(timeout=2\.0\)", first)
    assert state.startswith("state of foo.service: ActiveState=failed")


def test_a_port_timeout_on_a_guest_without_systemd_says_only_what_nixpkgs_says(
    vm1: Machine,
) -> None:
    with pytest.raises(RequestedAssertionFailed) as failure:
        vm1.wait_for_open_port(1, timeout=1)
    assert re.fullmatch(
        r"action timed out after \d+\.\d\d seconds \(timeout=1\.0\)", str(failure.value)
    )


def test_a_port_timeout_lists_failed_units_and_the_journal(systemd: Machine) -> None:
    systemd.succeed("echo failed > /tmp/fake-state")
    with pytest.raises(RequestedAssertionFailed) as failure:
        systemd.wait_for_open_port(1, timeout=1)
    lines = str(failure.value).splitlines()
    assert lines[1:3] == ["failed units:", "  foo.service loaded failed failed Foo"]
    assert lines[3] == "last 30 lines of the journal:"
    assert lines[-1] == "  journal line 40"
