"""The registry as supervisor: names, states, crash detection, teardown, and bad input."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nixos_repl import MachineError, Registry, UnknownMachineError

from .helpers import interrupt_after, qemu_alive


def test_unknown_machine_names_the_known_ones(registry: Registry) -> None:
    with pytest.raises(
        UnknownMachineError, match=r"no machine named 'vm9' \(known machines: vm1, vm2\)"
    ):
        registry["vm9"]
    with pytest.raises(KeyError):  # also a KeyError, as a mapping should raise
        registry["vm9"]
    assert [m.name for m in registry.machines] == ["vm1", "vm2"]


def test_bad_start_scripts(tmp_path: Path) -> None:
    with pytest.raises(MachineError, match="does not exist"):
        Registry.from_start_scripts([tmp_path / "run-nope-vm"])
    script = tmp_path / "run-plain-vm"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(MachineError, match="not executable"):
        Registry.from_start_scripts([script])


def test_qemu_exiting_before_the_banner_shows_its_stderr(tmp_path: Path) -> None:
    script = tmp_path / "run-broken-vm"
    script.write_text("#!/bin/sh\necho 'qemu: something is badly wrong' >&2\nexit 3\n")
    script.chmod(0o755)
    with Registry.from_start_scripts([script], out_dir=tmp_path) as reg:
        with pytest.raises(MachineError, match=r"(?s)exited with code 3.*badly wrong"):
            reg["broken"].succeed("true")
        assert reg["broken"].state == "off"


@pytest.mark.cold_boot
def test_no_qemu_on_path(guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"  # everything the start script needs, but no QEMU
    bin_dir.mkdir()
    for tool in ("bash", "env", "mkdir", "mktemp", "grep", "sort"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("NIXOS_REPL_ACCEL", raising=False)
    with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=tmp_path) as reg:
        with pytest.raises(MachineError, match="qemu-system-x86_64 not found on PATH"):
            reg["solo"].start()


@pytest.mark.cold_boot
def test_banner_timeout_shows_the_console(guest_dir: Path, tmp_path: Path) -> None:
    # A start script that drops the backdoor console: the guest never says the banner.
    script = tmp_path / "run-mute-vm"
    script.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        args=()
        for a in "$@"; do
            [ "$a" = virtconsole,chardev=shell ] && a=virtio-rng-pci
            args+=("$a")
        done
        exec {guest_dir}/run-solo-vm "${{args[@]}}"
    """)
    )
    script.chmod(0o755)
    with Registry.from_start_scripts([script], out_dir=tmp_path) as reg:
        mute = reg["mute"]
        mute.connect_timeout = 8
        start = time.monotonic()
        with pytest.raises(MachineError, match=r"(?s)did not start within 8.*Last console lines"):
            mute.connect()
        assert time.monotonic() - start < 20


@pytest.mark.cold_boot  # the states a boot goes through
def test_kill_9_is_noticed_and_start_brings_it_back(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    seen: list[str] = []
    own_registry.watch(lambda machine: seen.append(machine.state))
    vm.succeed("echo booted-once >&2")
    assert own_registry.states() == {"crashy": "up"}
    pid = vm.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while vm.state != "crashed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vm.state == "crashed", "QEMU's death noticed within 1 s"
    with pytest.raises(MachineError) as error:
        vm.succeed("true")
    message = str(error.value)
    assert "crashy" in message and "status -9" in message and "booted-once" in message
    vm.start()
    assert vm.succeed("echo back") == "back\n"
    assert vm.state == "up"
    assert seen == ["starting", "up", "crashed", "starting", "up"]


def test_kill_during_a_command_fails_promptly(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    vm.connect()
    pid = vm.pid
    assert pid is not None
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {pid}"])
    start = time.monotonic()
    with pytest.raises(MachineError, match="crashed"):
        vm.succeed("sleep 30")
    assert time.monotonic() - start < 3


def test_shutdown_and_crash_are_not_crashes(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    vm.connect()
    vm.shutdown()
    assert vm.state == "off" and not vm.booted
    assert vm.succeed("echo rebooted") == "rebooted\n"  # any command boots it again
    vm.crash()
    assert vm.state == "off"
    vm.start()
    vm.connect()
    vm.succeed("poweroff")
    vm.wait_for_shutdown(timeout=20)
    assert vm.state == "off"


def test_no_qemu_survives_sigkill_of_the_parent(guest_dir: Path, tmp_path: Path) -> None:
    program = textwrap.dedent(f"""
        import sys, time
        from nixos_repl import Registry
        script = {str(guest_dir / "run-solo-vm")!r}
        reg = Registry.from_start_scripts([script], vlans=[3], out_dir={str(tmp_path)!r})
        reg.__enter__()
        reg["solo"].start()
        print(reg["solo"].pid, reg.vlans[0].pid, flush=True)
        time.sleep(300)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert child.stdout is not None
    qemu_pid, vlan_pid = map(int, child.stdout.readline().split())
    assert qemu_alive(qemu_pid) and qemu_alive(vlan_pid)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 5
    while (qemu_alive(qemu_pid) or qemu_alive(vlan_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_alive(qemu_pid), "QEMU died with its parent"
    assert not qemu_alive(vlan_pid), "so did the VLAN switch"


def test_leaving_the_registry_kills_everything(guest_dir: Path, tmp_path: Path) -> None:
    with Registry.from_start_scripts(
        [guest_dir / "run-solo-vm"], vlans=[7], out_dir=tmp_path
    ) as reg:
        reg.start_all()
        pid = reg["solo"].pid
        vlan_pid = reg.vlans[0].pid
        assert pid is not None and vlan_pid is not None
    assert not qemu_alive(pid) and not qemu_alive(vlan_pid)
    assert reg["solo"].state == "off"


@pytest.mark.cold_boot
def test_guest_dying_before_the_banner_is_reported(
    guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QEMU_KERNEL_PARAMS", "rdinit=/nonexistent")  # the kernel panics
    with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=tmp_path) as reg:
        with pytest.raises(MachineError, match=r"(?s)machine 'solo' crashed.*panic"):
            reg["solo"].succeed("true")
        assert reg["solo"].state == "crashed"


@pytest.mark.cold_boot  # interrupted while the guest boots
def test_an_interrupted_connect_resumes(own_registry: Registry) -> None:
    from nixos_repl.loop import run_sync

    vm = own_registry["crashy"]
    interrupt_after(1.5)  # while the guest boots
    with pytest.raises(KeyboardInterrupt):
        vm.succeed("true")
    assert vm.succeed("echo up") == "up\n"
    assert vm.shell is not None
    run_sync(vm.shell.setup())  # a setup sent again (as after an interrupt) changes nothing
    assert vm.succeed("echo again") == "again\n"
    interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        vm.succeed("sleep 1000")
    assert vm.succeed("echo still-in-sync") == "still-in-sync\n"


def test_a_guest_that_reboots_itself_comes_back(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    vm.start(allow_reboot=True)
    vm.succeed("touch /tmp/before-reboot")
    with contextlib.suppress(MachineError):  # the reply may be lost with the old shell
        vm.execute("reboot")
    deadline = time.monotonic() + 20
    while vm.state != "starting" and time.monotonic() < deadline:  # QMP RESET arrives
        time.sleep(0.05)
    assert vm.state == "starting" and not vm.connected
    assert vm.succeed("echo back") == "back\n"
    vm.fail("test -e /tmp/before-reboot")
    assert vm.state == "up"


def test_vlan_switch_directories(tmp_path: Path) -> None:
    from nixos_repl.vlan import VLan

    stale = VLan(9, tmp_path)
    stale.socket_dir.mkdir()
    (stale.socket_dir / "ctl").write_text("")  # left behind by a killed run
    stale.start()
    try:
        with pytest.raises(MachineError, match="VLAN 9 is in use"):
            VLan(9, tmp_path).start()
    finally:
        stale.stop()  # blocking, as nixpkgs' vlan1.stop() in a test script
    assert stale.process is not None and stale.process.returncode is not None
