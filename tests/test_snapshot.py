"""Snapshots on the tiny guest: rewind in place, list, delete, and every bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from nixos_repl import Machine, Registry
from nixos_repl.errors import MachineError, QMPAPIError
from nixos_repl.loop import run_sync
from nixos_repl.machine import snapshot as snapshot_module
from nixos_repl.machine.bootcache import ENV as BOOT_CACHE_ENV
from nixos_repl.machine.qmp import QMPSession
from nixos_repl.machine.snapshot import FILE_NODE, Snapshots


@pytest.fixture(scope="module")
def solo_registry(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    out = tmp_path_factory.mktemp("snap-out")
    with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=out) as reg:
        yield reg


@pytest.fixture
def solo(solo_registry: Registry) -> Machine:
    machine = solo_registry["solo"]
    machine.connect()
    return machine


def shares(machine: Machine) -> list[str]:
    mounts = machine.succeed("cat /proc/mounts")
    return sorted(line.split()[1] for line in mounts.splitlines() if line.split()[2] == "9p")


def test_restore_rewinds_in_place_and_everything_works_at_once(solo: Machine) -> None:
    qemu = solo.pid
    solo.succeed("echo before > /root/kept")
    info = solo.snapshot("base")
    assert info.label == "base" and info.size > 0
    assert shares(solo) == ["/tmp/shared", "/tmp/xchg"], "the shares are mounted again"

    solo.succeed("echo after > /root/kept; touch /root/new; sleep 999 >/dev/null 2>&1 &")
    solo.succeed("date -u -s @1000000000")  # the abandoned timeline's clock is far off
    solo.restore("base")

    assert solo.pid == qemu, "the same QEMU"
    assert solo.succeed("cat /root/kept") == "before\n"
    assert solo.fail("test -e /root/new") == ""
    sleeps = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done 2>/dev/null"
    assert "sleep 999" not in solo.succeed(sleeps), "the abandoned timeline's processes are gone"
    assert solo.succeed("echo its own output") == "its own output\n"
    guest_time = int(solo.succeed("date -u +%s"))
    assert abs(guest_time - time.time()) < 5, "the clock is set from the host's"
    assert shares(solo) == ["/tmp/shared", "/tmp/xchg"]
    solo.succeed("echo through the share > /tmp/xchg/out")
    solo.copy_from_vm("/root/kept")
    assert "restored snapshot base" in solo.get_console_log().splitlines()
    assert "running" in solo.send_monitor_command("info status")
    assert solo.screenshot("after-restore").width > 0
    solo.send_key("ret")


def test_a_restore_writes_no_kernel_into_the_guests_ram(solo: Machine) -> None:
    """QEMU writes each ROM image that lives in guest RAM again at every system reset, and loading
    a snapshot is one: the tiny guest's kernel (~60 MiB of ELF segments) must not be among them."""
    roms = solo.send_monitor_command("info roms")
    in_ram = [int(size, 16) for size in re.findall(r"size=0x([0-9a-f]+) mem=ram", roms)]
    assert in_ram, f"the kernel's loader is a ROM in RAM:\n{roms}"
    assert max(in_ram) < 2**16, f"a large image is written into RAM at every restore:\n{roms}"


def test_a_qemu_without_io_uring_gets_the_plain_state_file(tmp_path: Path) -> None:
    """The state file is added with io_uring; a QEMU built without it refuses that, and the file
    is added without (pure logic: a QMP session that refuses io_uring)."""
    asked: list[dict[str, object]] = []

    class NoUring:
        async def aexecute(self, cmd: str, args: dict[str, object]) -> dict[str, object]:
            asked.append(args)
            if args.get("aio") == "io_uring":
                raise QMPAPIError({"error": {"class": "GenericError", "desc": "no io_uring"}})
            return {"return": {}}

    snapshots = Snapshots("m", tmp_path)
    asyncio.run(snapshots._add_file_node(cast(QMPSession, NoUring())))
    plain = {"driver": "file", "node-name": FILE_NODE, "filename": str(snapshots.path)}
    assert asked == [{**plain, "aio": "io_uring"}, plain]


def test_a_save_waits_until_the_guest_is_quiet(
    solo: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the guest is busy with when it is saved, it does again after every restore: the save
    waits for its vCPUs to go idle (a bounded wait, so a guest that never does is saved too)."""
    monkeypatch.setattr(snapshot_module, "QUIET_WAIT", 20.0)
    # A burst of guest work (~2 s under TCG) that goes on after the command that started it.
    burst = "i=0; while [ $i -lt 15000 ]; do i=$((i+1)); done; touch /root/burst-done"
    solo.succeed(f"rm -f /root/burst-done; ({burst}) >/dev/null 2>&1 &")
    solo.snapshot("after-burst")
    solo.succeed("rm -f /root/burst-done")
    solo.restore("after-burst")
    assert solo.succeed("test -e /root/burst-done && echo saved after it") == "saved after it\n"

    monkeypatch.setattr(snapshot_module, "QUIET_WAIT", 0.3)
    solo.succeed("(while :; do :; done) >/dev/null 2>&1 & echo $! > /root/spinner")
    try:
        start = time.monotonic()
        solo.snapshot("busy")
        assert time.monotonic() - start < 10, "a guest that never settles is saved all the same"
    finally:
        solo.succeed("kill $(cat /root/spinner)")
    solo.delete_snapshot("busy")
    solo.delete_snapshot("after-burst")


def test_snapshots_are_listed_replaced_and_deleted(solo: Machine) -> None:
    solo.snapshot("one")
    first = next(s for s in solo.snapshots() if s.label == "one")
    solo.snapshot("two")
    solo.snapshot("one")  # replaced, not doubled
    listing = solo.snapshots()
    labels = [s.label for s in listing]
    assert labels.count("one") == 1 and "two" in labels
    one = next(s for s in listing if s.label == "one")
    assert one.created >= first.created and 0 <= one.age < 120
    assert "MiB" in str(one)
    solo.delete_snapshot("two")
    assert "two" not in [s.label for s in solo.snapshots()]
    with pytest.raises(MachineError, match=r"no snapshot 'two' \(its snapshots: .*one"):
        solo.restore("two")
    with pytest.raises(MachineError, match="no snapshot 'nope'"):
        solo.delete_snapshot("nope")


@pytest.mark.parametrize("label", ["a/b", "with space", "", "../x", "-x", "x" * 65])
def test_bad_labels_are_refused_before_anything_happens(solo: Machine, label: str) -> None:
    before = [s.label for s in solo.snapshots()]
    with pytest.raises(MachineError, match="is not valid: use letters"):
        solo.snapshot(label)
    with pytest.raises(MachineError, match="is not valid"):
        solo.restore(label)
    assert [s.label for s in solo.snapshots()] == before
    assert shares(solo) == ["/tmp/shared", "/tmp/xchg"]


def test_a_busy_share_is_named_with_what_holds_it(solo: Machine) -> None:
    pid = solo.succeed("(cd /tmp/shared && exec sleep 1234) > /dev/null 2>&1 & echo $!").strip()
    solo.wait_until_succeeds(f'[ "$(readlink /proc/{pid}/cwd)" = /tmp/shared ]', timeout=10)
    try:
        with pytest.raises(
            MachineError, match=rf"share /tmp/shared is busy, held by pid {pid} \(sleep\)"
        ):
            solo.snapshot("busy")
        assert shares(solo) == ["/tmp/shared", "/tmp/xchg"], "the machine as it was"
        assert "busy" not in [s.label for s in solo.snapshots()]
    finally:
        solo.succeed(f"kill {pid}")


def test_restore_waits_for_a_running_command(solo: Machine) -> None:
    solo.snapshot("wait")

    async def both() -> str:
        command = asyncio.ensure_future(solo.aio.succeed("sleep 1; echo finished"))
        await asyncio.sleep(0.3)
        output: str
        output, _ = await asyncio.gather(command, solo.aio.restore("wait"))
        return output

    output = run_sync(both())
    assert output == "finished\n"
    assert solo.succeed("echo next") == "next\n"


def test_a_machine_that_is_not_running_cannot_be_saved(guest_dir: Path, tmp_path: Path) -> None:
    with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
        with pytest.raises(MachineError, match=r"crashy is defined, so it cannot save"):
            reg["crashy"].snapshot()
        assert reg["crashy"].snapshots() == []


def test_a_raw_writable_disk_is_refused(
    guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "data.raw"
    disk.write_bytes(b"\0" * 2**20)
    monkeypatch.setenv("QEMU_OPTS", f"-drive file={disk},format=raw,if=virtio")
    with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
        crashy = reg["crashy"]
        crashy.connect()
        with pytest.raises(MachineError, match=r"writable disk .*raw.*use a qcow2 image"):
            crashy.snapshot()
        assert shares(crashy) == ["/tmp/shared", "/tmp/xchg"]
        assert crashy.succeed("echo still fine") == "still fine\n"


def test_a_network_rewinds_together(registry: Registry, vm1: Machine, vm2: Machine) -> None:
    registry.snapshot_all("net")
    vm1.succeed("ip link set eth1 down")
    assert not re.search("[<,]UP[,>]", vm1.succeed("ip link show eth1"))
    registry.restore_all("net")
    assert re.search("[<,]UP[,>]", vm1.succeed("ip link show eth1"))
    vm1.succeed("ping -c 1 -W 5 192.168.1.2")
    vm2.succeed("ping -c 1 -W 5 192.168.1.1")
    for machine in (vm1, vm2):
        machine.delete_snapshot("net")


def test_the_snapshot_lives_in_the_state_directory(solo: Machine) -> None:
    solo.snapshot("file")
    path = solo.lifecycle.snapshots.path
    assert path.is_file() and path.parent == solo.lifecycle.state_dir
    assert os.stat(path).st_size > 0
    created = next(s.created for s in solo.snapshots() if s.label == "file")
    assert created.tzinfo is dt.UTC


def test_a_state_file_changed_behind_qemus_back_is_refused(solo: Machine) -> None:
    solo.snapshot("intact")
    solo.succeed("touch /root/still-here")
    path = solo.lifecycle.snapshots.path
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(2**20))
    with pytest.raises(MachineError, match=r"not restoring: .* was changed by something other"):
        solo.restore("intact")
    assert solo.succeed("ls /root/still-here") == "/root/still-here\n", "as it was"
    solo.snapshot("intact")  # a new snapshot can be taken, and restored
    solo.restore("intact")


def test_a_load_that_fails_half_way_stops_the_machine_and_says_so(
    guest_dir: Path, tmp_path: Path
) -> None:
    with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
        crashy = reg["crashy"]
        crashy.connect()
        crashy.snapshot("x")
        path = crashy.lifecycle.snapshots.path
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            f.write(os.urandom(path.stat().st_size // 4))
        crashy.lifecycle.snapshots._stamp = None  # as if QEMU itself had written the damage
        with pytest.raises(MachineError, match=r"half-loaded.*the machine is off"):
            crashy.restore("x")
        assert crashy.state == "off" and crashy.pid is None
        assert crashy.succeed("echo booted again") == "booted again\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_save_that_fills_the_disk_keeps_nothing(
    guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(small))
        with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
            crashy = reg["crashy"]
            crashy.connect()
            with pytest.raises(MachineError, match=r"could not save .* is full"):
                crashy.snapshot("big")
            assert crashy.snapshots() == []
            assert not crashy.lifecycle.snapshots.path.exists(), "nothing half-written kept"
            assert shares(crashy) == ["/tmp/shared", "/tmp/xchg"]
            assert crashy.succeed("echo still up") == "still up\n"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_machine_that_is_off_starts_from_its_snapshot(guest_dir: Path, tmp_path: Path) -> None:
    with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
        crashy = reg["crashy"]
        crashy.succeed("echo saved > /root/f")
        crashy.snapshot("fork")
        crashy.succeed("echo later > /root/f")
        crashy.shutdown()
        assert crashy.state == "off"
        # A machine the boot cache started or saved has its saved boot too.
        known = "booted, fork" if os.environ.get(BOOT_CACHE_ENV) else "fork"
        with pytest.raises(MachineError, match=rf"no snapshot 'nope' to start from .*: {known}\)"):
            crashy.restore("nope")
        assert crashy.state == "off", "nothing started"

        crashy.restore("fork")
        assert crashy.state == "up" and crashy.pid is not None
        assert crashy.succeed("cat /root/f") == "saved\n"
        assert crashy.shell is not None and crashy.shell.fast, "the fast framing again"
        assert shares(crashy) == ["/tmp/shared", "/tmp/xchg"]
        assert "restored snapshot fork" in crashy.get_console_log().splitlines()
        status, _ = crashy.execute("sleep 30", timeout=1)
        assert status == 124, "a timeout still kills through the control port"
        assert crashy.succeed("echo next") == "next\n"
        crashy.crash()
        crashy.restore("fork")  # as often as wanted
        assert crashy.succeed("cat /root/f") == "saved\n"
