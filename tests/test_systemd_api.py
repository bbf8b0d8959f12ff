"""nixpkgs' systemd helpers, driven against a stand-in systemctl inside the tiny guest.

The tiny guest has no systemd; a small script answers the few systemctl calls the driver makes, so
the driver's own logic (state polling, the fast failures, messages) runs for real over the shell.
"""

from __future__ import annotations

import datetime as dt

import pytest

from nixos_repl import Machine, RequestedAssertionFailed

FAKE_SYSTEMCTL = r"""#!/bin/sh
state=$(cat /tmp/fake-state 2>/dev/null || echo inactive)
case "$*" in
  *list-jobs*) cat /tmp/fake-jobs 2>/dev/null || echo "No jobs running." ;;
  *--property=*) echo "ActiveState=$state" ;;
  *show*) printf 'Id=%s\nActiveState=%s\nSubState=running\n' "${3:-x}" "$state" ;;
  *) echo "$*" >> /tmp/fake-log ;;
esac
"""


@pytest.fixture
def systemd(vm2: Machine) -> Machine:
    vm2.succeed(f"cat > /sbin/systemctl <<'EOF'\n{FAKE_SYSTEMCTL}EOF\nchmod +x /sbin/systemctl")
    vm2.succeed("rm -f /tmp/fake-state /tmp/fake-jobs /tmp/fake-log")
    return vm2


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
