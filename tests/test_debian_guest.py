"""The driver against a real systemd guest: the debootstrapped Debian 12 with NixOS's backdoor.

A small core runs in the default lane, since every NixOS test uses it: ``wait_for_unit`` (and
its failure diagnostics), ``systemctl``, unit info and properties, and the tools nixpkgs' test
scripts call. Building the guest needs root and the Debian mirror (~1.5 min the first time, then
cached in ~/.cache/nixos-repl); it boots in ~12 s under TCG. The rest is opt-in: set
NIXOS_REPL_DEBIAN_TESTS=1.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixos_repl import Machine, Registry, RequestedAssertionFailed
from nixos_repl.guests import build_debian

from .helpers import interrupt_after, keep_guests

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the debian guest needs root"),
]
opt_in = pytest.mark.skipif(
    os.environ.get("NIXOS_REPL_DEBIAN_TESTS") != "1",
    reason="beyond the core of the debian guest's tests: set NIXOS_REPL_DEBIAN_TESTS=1",
)

NAME = "debian1"
PEER = "peer"  # built with NAME: node 2 on its VLANs
UNIT = """[Unit]
Description=A unit written by a test

[Service]
ExecStart=/bin/sleep infinity
"""


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    built = tmp_path_factory.mktemp("debian-guests")
    build_debian([NAME, PEER], built)  # the peer is not started
    script = keep_guests(built) / f"run-{NAME}-vm"
    out = tmp_path_factory.mktemp("debian-out")
    # A directory of its own: the session's tiny pair may hold VLAN 1 in the shared one.
    run = tmp_path_factory.mktemp("debian-run")
    with Registry([(NAME, script)], vlans=[1], out_dir=out, tmp_dir=run) as registry:
        machine = registry[NAME]
        machine.connect()  # from the boot cache when it has this guest
        yield machine


@opt_in
def test_fast_framing_over_the_nixos_backdoor(debian: Machine) -> None:
    assert debian.shell is not None and debian.shell.fast, (
        "the backdoor shell sees the nixos-repl ports"
    )
    assert debian.succeed("hostname") == f"{NAME}\n"
    assert debian.succeed("readlink /proc/1/exe") == "/usr/lib/systemd/systemd\n"


@opt_in
def test_succeed_execute_fail(debian: Machine) -> None:
    assert debian.succeed("echo hello") == "hello\n"
    assert debian.execute("echo out; exit 3") == (3, "out\n")
    assert debian.execute("false | true")[0] == 1, "pipefail, as nixpkgs runs commands"
    assert debian.fail("echo no; false") == "no\n"
    with pytest.raises(RequestedAssertionFailed, match=r"command `exit 4` failed"):
        debian.succeed("exit 4")
    assert debian.succeed("echo to-stderr >&2; echo to-stdout") == "to-stdout\n"


@opt_in
def test_background_job_holding_stdout_is_waited_for(debian: Machine) -> None:
    assert debian.succeed("(sleep 2; echo late) & echo early") == "early\nlate\n"
    assert debian.succeed("echo next") == "next\n"


@opt_in
def test_keyboard_interrupt_kills_the_command(debian: Machine) -> None:
    interrupt_after(1.0)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        debian.succeed("sleep 1000")
    assert time.monotonic() - start < 1.0 + 3.0
    assert debian.succeed("echo own-output") == "own-output\n"
    assert "sleep 1000" not in debian.succeed("ps -eo args")


@opt_in
def test_timeout_gives_124(debian: Machine) -> None:
    start = time.monotonic()
    assert debian.execute("echo begun; sleep 100", timeout=1) == (124, "begun\n")
    assert time.monotonic() - start < 4.0
    assert debian.succeed("echo after-timeout") == "after-timeout\n"


def test_systemd_reaches_multi_user_cleanly(debian: Machine) -> None:
    debian.wait_for_unit("multi-user.target", timeout=dt.timedelta(seconds=120))
    info = debian.get_unit_info("backdoor.service")
    assert info["ActiveState"] == "active"
    assert info["KillSignal"] == "1", "SIGHUP, as NixOS's backdoor.service"
    requires = set(debian.get_unit_property("backdoor.service", "Requires").split())
    assert requires >= {"dev-hvc0.device", "dev-ttyS0.device"}
    debian.wait_until_succeeds("systemctl is-system-running", timeout=60)
    assert debian.succeed("systemctl --failed --no-legend") == ""
    assert debian.get_unit_property("serial-getty@ttyS0.service", "LoadState") == "masked"


def test_start_and_stop_a_real_unit(debian: Machine) -> None:
    debian.succeed(
        f"cat > /etc/systemd/system/test-sleeper.service <<'EOF'\n{UNIT}EOF",
        "systemctl daemon-reload",
    )
    status, _ = debian.systemctl("start test-sleeper.service")
    assert status == 0
    debian.wait_for_unit("test-sleeper.service", timeout=30)
    assert debian.get_unit_property("test-sleeper.service", "SubState") == "running"
    debian.stop_job("test-sleeper.service")
    assert debian.get_unit_property("test-sleeper.service", "ActiveState") == "inactive"
    with pytest.raises(RequestedAssertionFailed, match="is inactive and there are no pending jobs"):
        debian.wait_for_unit("test-sleeper.service", timeout=10)
    debian.start_job("test-sleeper.service")
    debian.wait_for_unit("test-sleeper.service", timeout=30)
    debian.stop_job("test-sleeper.service")


def test_a_real_failed_unit_is_explained_with_its_journal(debian: Machine) -> None:
    debian.succeed("systemd-run --unit=test-broken sh -c 'echo broken-because-42; exit 3'")
    debian.wait_for_unit_active_state("test-broken.service", "failed", timeout=30)
    with pytest.raises(RequestedAssertionFailed) as failure:
        debian.wait_for_unit("test-broken.service", timeout=30)
    message = str(failure.value)
    assert message.startswith('unit "test-broken.service" reached state "failed"\n')
    assert "ActiveState=failed, SubState=failed, Result=exit-code" in message
    assert "test-broken.service" in message.split("failed units:")[1]
    assert "broken-because-42" in message.split("journal:")[1]
    debian.succeed("systemctl reset-failed test-broken.service")


@opt_in
def test_wait_for_open_port(debian: Machine) -> None:
    debian.succeed("systemd-run --unit=test-listener nc -lk 8080")
    debian.wait_for_open_port(8080, timeout=30)
    debian.succeed("systemctl stop test-listener")
    debian.wait_for_closed_port(8080, timeout=30)


@opt_in
def test_network_and_shares(debian: Machine) -> None:
    debian.wait_until_succeeds("ip -4 -br addr show eth0 | grep -q 10.0.2.15", timeout=60)
    assert debian.succeed("findmnt -n -o FSTYPE /tmp/shared") == "9p\n"
    assert debian.succeed("findmnt -n -o FSTYPE /tmp/xchg") == "9p\n"


@opt_in
def test_copy_from_host(debian: Machine, tmp_path: Path) -> None:
    source = tmp_path / "greeting.txt"
    source.write_text("hello from the host\n")
    debian.copy_from_host(str(source), "/root/copied/greeting.txt")
    assert debian.succeed("cat /root/copied/greeting.txt") == "hello from the host\n"


@opt_in
def test_screenshot(debian: Machine) -> None:
    shot = debian.screenshot("debian-screen")
    assert shot.path is not None and Path(shot.path).stat().st_size > 0
    width, height = shot.size
    assert width >= 640 and height >= 400


def test_etc_hosts_names_the_machines_built_together(debian: Machine) -> None:
    debian.wait_for_unit("vlan-addresses.service", timeout=60)
    hosts = debian.succeed("cat /etc/hosts").splitlines()
    assert {f"192.168.1.1 {NAME}", f"192.168.1.2 {PEER}"} <= set(hosts)
    assert "192.168.1.1/24" in debian.succeed("ip -4 -br addr show eth1")


def test_the_tools_nixpkgs_scripts_call(debian: Machine) -> None:
    """curl and ``python`` (``python -m http.server``), as on a NixOS test guest."""
    debian.succeed("python -c 'import http.server'", "curl --version")


def test_a_restore_rewinds_the_disk_and_systemd(debian: Machine) -> None:
    debian.snapshot("disk")
    debian.succeed("echo later > /var/tmp/after && sync && systemctl stop systemd-journald")
    debian.restore("disk")
    debian.fail("test -e /var/tmp/after")
    assert debian.get_unit_property("systemd-journald.service", "ActiveState") == "active"
    debian.wait_for_unit("multi-user.target")
    debian.delete_snapshot("disk")


@opt_in
def test_shutdown_powers_off_cleanly(debian: Machine) -> None:
    debian.shutdown()
    assert debian.state == "off"
