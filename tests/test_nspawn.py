"""systemd-nspawn containers (``NspawnMachine``) on the debian-container guest, for real.

Each test starts its own containers in a private directory and checks afterwards that no
systemd-nspawn, journalctl, container process or mount of that directory is left.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixos_repl.errors import MachineError, RequestedAssertionFailed
from nixos_repl.guests import build_debian_container, build_tiny
from nixos_repl.guests.container import guest_files
from nixos_repl.machine import MachineState, NspawnMachine
from nixos_repl.machine.nspawn import processes_in
from nixos_repl.registry import Registry

from .helpers import (
    NEEDS_CONTAINERS,
    container_guests,
    container_leftovers,
    interrupt_after,
    wait_for_no_container_leftovers,
)

pytestmark = NEEDS_CONTAINERS


@pytest.fixture(scope="module")
def container_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return container_guests(tmp_path_factory, "ct1", "ct2")


class Containers:
    """Containers of one test, released and checked for leftovers at its end."""

    def __init__(self, tmp: Path, scripts: Path) -> None:
        self.tmp = tmp
        self.scripts = scripts
        self.machines: list[NspawnMachine] = []

    def __call__(self, name: str = "ct1", script: Path | None = None) -> NspawnMachine:
        start = script or self.scripts / f"run-{name}-nspawn"
        machine = NspawnMachine(str(start), tmp_dir=self.tmp, out_dir=self.tmp)
        self.machines.append(machine)
        return machine

    def leaders(self) -> list[int]:
        return [m.lifecycle.leader for m in self.machines if m.lifecycle.leader is not None]


@pytest.fixture
def containers(container_dir: Path) -> Iterator[Containers]:
    tmp = Path(tempfile.mkdtemp(prefix="nixos-repl-nspawn-"))
    made = Containers(tmp, container_dir)
    try:
        yield made
    finally:
        for machine in made.machines:
            machine.release()
        assert wait_for_no_container_leftovers(tmp, made.leaders()) == []
        shutil.rmtree(tmp)


def test_commands_in_a_container(containers: Containers) -> None:
    ct1 = containers("ct1")
    assert repr(ct1) == "<NspawnMachine 'ct1'>"
    assert ct1.succeed("hostname") == "ct1\n"
    assert ct1.execute("echo out; echo err >&2; exit 3") == (3, "out\n")
    assert ct1.fail("false") == ""
    with pytest.raises(RequestedAssertionFailed, match="failed \\(exit code 1\\)"):
        ct1.succeed("false")
    # nixpkgs' prelude: pipefail, nounset, root's environment from /etc/profile and no other.
    assert ct1.execute("false | true")[0] == 1
    assert ct1.execute("echo $UNSET_VARIABLE")[0] != 0
    assert ct1.succeed("echo $USER $HOME; env | grep -c NIXOS_REPL || true") == "root /root\n0\n"
    # The namespaces are the container's: its own pid 1 (systemd) and network.
    assert ct1.succeed("cat /proc/1/comm") == "systemd\n"
    assert ct1.succeed("ls /sys/class/net") == "lo\n"
    ct1.wait_for_unit("multi-user.target")
    ct1.wait_for_unit("systemd-journald.service")
    ct1.succeed("systemd-run --unit=probe sleep 600")
    ct1.wait_for_unit("probe.service")
    assert ct1.systemctl("is-active probe.service") == (0, "active\n")
    ct1.succeed("(sleep 1; touch /tmp/later) >/dev/null 2>&1 &")
    ct1.wait_until_succeeds("test -e /tmp/later", timeout=30)
    # The shared directory is /tmp/shared.
    ct1.copy_from_host(__file__, "/root/copied.py")
    assert ct1.succeed("head -1 /root/copied.py").startswith('"""')


def test_two_containers_write_their_own_files(containers: Containers, container_dir: Path) -> None:
    ct1, ct2 = containers("ct1"), containers("ct2")
    ct1.succeed("echo one > /etc/marker")
    ct2.fail("test -e /etc/marker")
    assert ct2.succeed("hostname") == "ct2\n"
    ct2.succeed("echo two > /etc/marker")
    assert ct1.succeed("cat /etc/marker") == "one\n"
    root = Path((container_dir / "run-ct1-nspawn").read_text().split("lowerdir=")[1].split(",")[0])
    assert not (root / "etc/marker").exists()


def test_timeout_raises_timeout_expired_and_kills_the_command(containers: Containers) -> None:
    ct1 = containers()
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        ct1.succeed("sleep 97", timeout=1)
    assert time.monotonic() - started < 10
    assert ct1.succeed("pgrep -x sleep || echo none") == "none\n"


def test_ctrl_c_kills_the_command_tree_and_the_next_command_works(
    containers: Containers,
) -> None:
    ct1 = containers()
    ct1.succeed("true")
    timer = interrupt_after(1.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            ct1.succeed("sleep 98 & sleep 99; wait")
    finally:
        timer.cancel()
    assert ct1.succeed("pgrep -x sleep || echo none") == "none\n"
    assert ct1.succeed("echo next") == "next\n"


def test_journal_lines_are_console_lines(
    containers: Containers, caplog: pytest.LogCaptureFixture
) -> None:
    ct1 = containers()
    with caplog.at_level(logging.DEBUG, logger="nixos_repl.machine.ct1.serial"):
        ct1.succeed("logger -t probe hello-from-the-journal")
        assert ct1.wait_for_console_text("probe.*hello-from", timeout=30).endswith("hello-from")
    messages = [r.getMessage() for r in caplog.records]
    assert any("ct1 # " in m and "hello-from" in m for m in messages)
    assert "hello-from-the-journal" in (ct1.state_dir / "console.log").read_text()


def up_with_leader(container: NspawnMachine) -> int:
    """Start ``container`` (a first command) and return its leader's pid."""
    container.succeed("true")
    leader = container.lifecycle.leader
    assert leader is not None
    return leader


def test_shutdown_powers_off(containers: Containers) -> None:
    ct1 = containers()
    leader = up_with_leader(ct1)
    ct1.shutdown()
    assert ct1.state is MachineState.OFF
    assert not ct1.is_up()
    assert wait_for_no_container_leftovers(containers.tmp, [leader]) == []
    # A command starts it again, as on a VM.
    assert ct1.succeed("echo again") == "again\n"


def test_a_poweroff_from_inside_is_off_not_crashed(containers: Containers) -> None:
    ct1 = containers()
    leader = up_with_leader(ct1)
    ct1.succeed("systemctl --no-block poweroff")
    ct1.wait_for_shutdown()
    assert ct1.state is MachineState.OFF
    assert ct1.lifecycle.crash_report is None
    assert wait_for_no_container_leftovers(containers.tmp, [leader]) == []
    assert ct1.succeed("echo again") == "again\n"


def test_a_dead_leader_is_a_clear_machine_error(containers: Containers) -> None:
    ct1 = containers()
    leader = up_with_leader(ct1)
    os.kill(leader, 9)
    deadline = time.monotonic() + 20
    while ct1.state is not MachineState.CRASHED and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(MachineError, match="container 'ct1' crashed: systemd-nspawn"):
        ct1.succeed("true")
    assert wait_for_no_container_leftovers(containers.tmp, [leader]) == []


def test_qemu_only_methods_are_missing_and_screenshots_refused(containers: Containers) -> None:
    ct1 = containers()
    with pytest.raises(MachineError, match="Screenshots are not supported by NspawnMachine"):
        ct1.screenshot("x")
    for name in ("send_monitor_command", "crash", "block", "forward_port", "send_console"):
        assert not hasattr(ct1, name)


def _script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / f"run-{name}-nspawn"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(mode)
    return path


def test_bad_start_scripts(containers: Containers) -> None:
    tmp = containers.tmp
    lazy = containers("lazy", _script(tmp, "lazy", "x", mode=0o644))
    with pytest.raises(MachineError, match="is not executable"):
        lazy.start()
    quitter = containers("quitter", _script(tmp, "quitter", "echo cannot start >&2; exit 3"))
    with pytest.raises(MachineError, match=r"(?s)exited with status 3.*cannot start"):
        quitter.succeed("true")
    mute = containers("mute", _script(tmp, "mute", f"exec sleep 1000 # {tmp}"))
    mute.connect_timeout = 1
    with pytest.raises(MachineError, match="sent no READY=1 on its notify socket within 1 s"):
        mute.succeed("true")
    assert mute.state is MachineState.OFF
    assert container_leftovers(tmp) == []


def test_without_systemd_nspawn_the_script_names_the_package(containers: Containers) -> None:
    tmp = containers.tmp
    (tmp / "not-a-program").write_text("")
    ct1 = containers.scripts / "run-ct1-nspawn"
    # The real script, in a mount namespace where /usr/bin/systemd-nspawn is not executable.
    hidden = _script(
        tmp,
        "hidden",
        f"exec /usr/bin/unshare --mount /bin/sh -c "
        f"'/bin/mount --bind {tmp}/not-a-program /usr/bin/systemd-nspawn && exec {ct1}'",
    )
    machine = containers("hidden", hidden)
    with pytest.raises(MachineError, match="apt-get install systemd-container"):
        machine.succeed("true")


def test_the_guest_build_is_cached_and_writes_nspawn_scripts(
    container_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = container_dir / "run-ct1-nspawn"
    root = Path(script.read_text().split("lowerdir=")[1].split(",")[0])
    before = root.stat().st_mtime_ns
    (again,) = build_debian_container(["ct1"], tmp_path)
    assert again.read_text() == script.read_text()
    assert os.access(again, os.X_OK)
    assert root.stat().st_mtime_ns == before
    assert (root / "usr/bin/sh").readlink() == Path("bash")
    # The modes debugfs rdump drops: the sticky /tmp, setuid su.
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "usr/bin/su").stat().st_mode & 0o4000
    # A relative start script works: it runs in the state directory.
    monkeypatch.chdir(tmp_path)
    ct = NspawnMachine("run-ct1-nspawn", tmp_dir=tmp_path / "run", out_dir=tmp_path)
    try:
        assert ct.succeed("echo relative") == "relative\n"
    finally:
        ct.release()
    assert wait_for_no_container_leftovers(tmp_path, []) == []


CONTAINER_TEST_SCRIPT = """
assert [m.name for m in machines] == ["ct1", "ct2"], machines
assert [m.name for m in machines_nspawn] == ["ct1", "ct2"] and machines_qemu == []
assert isinstance(ct1, NspawnMachine) and isinstance(ct1, BaseMachine)
start_all()
assert ct1.succeed("hostname") == "ct1\\n"
ct2.wait_for_unit("multi-user.target")
ct2.succeed("test ! -e /etc/marker")
"""


@pytest.mark.parametrize("invocation", ["config", "legacy"])
def test_the_driver_runs_containers(container_dir: Path, tmp_path: Path, invocation: str) -> None:
    test = tmp_path / "test.py"
    test.write_text(CONTAINER_TEST_SCRIPT)
    scripts = {n: str(container_dir / f"run-{n}-nspawn") for n in ("ct2", "ct1")}
    if invocation == "config":
        config = {
            "vms": {},
            "containers": {n: {"name": n, "start_script": s} for n, s in scripts.items()},
            "vlans": [],
            "global_timeout": 300,
            "enable_ssh_backdoor": False,
            "test_script": str(test),
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
        args = ["--config", str(tmp_path / "config.json")]
    else:
        args = [str(test), "--container-names", *scripts, "--container-start-scripts"]
        args += scripts.values()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    driver = Path(sys.executable).parent / "nixos-test-driver"
    result = subprocess.run(
        [str(driver), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "must succeed: hostname" in result.stdout + result.stderr
    assert wait_for_no_container_leftovers(runtime, []) == []


def test_a_container_may_not_take_a_machines_name(container_dir: Path, tmp_path: Path) -> None:
    vm_script = tmp_path / "run-ct1-vm"
    vm_script.write_text("#!/bin/sh\nexit 1\n")
    vm_script.chmod(0o755)
    registry = Registry(start_scripts=[("ct1", vm_script)], tmp_dir=tmp_path, out_dir=tmp_path)
    vm_state = tmp_path / "vm-state-ct1"  # as a VM that ran leaves it
    vm_state.mkdir()
    (vm_state / "disk").write_text("the VM's")
    with pytest.raises(MachineError, match="a machine named 'ct1' already exists"):
        registry.add_container(str(container_dir / "run-ct1-nspawn"))
    assert (vm_state / "disk").read_text() == "the VM's"
    assert registry.machines_nspawn == []
    # Nor a VM a container's.
    registry.add_container(str(container_dir / "run-ct2-nspawn"))
    with pytest.raises(MachineError, match="a machine named 'ct2' already exists"):
        registry.add(str(vm_script), name="ct2")
    assert [m.name for m in registry.machines] == ["ct1"]


# -- containers on VLANs, beside VMs ---------------------------------------------------------


def test_node_numbers_and_hosts_count_every_machine_of_the_test() -> None:
    files = guest_files("ct1", [1, 3], ["vm2", "ct1", "a"])
    # Sorted: a=1, ct1=2, vm2=3; the i-th VLAN is eth<i>.
    assert "Name=eth1\n\n[Network]\nAddress=192.168.1.2/24\nAddress=2001:db8:1::2/64\n" in files
    assert "Name=eth2\n\n[Network]\nAddress=192.168.3.2/24\n" in files
    hosts = files.split("etc/hosts\" <<'EOF'\n")[1].split("EOF")[0]
    assert hosts.splitlines() == [
        "127.0.0.1 localhost",
        "::1 localhost",
        "192.168.1.1 a",
        "2001:db8:1::1 a",
        "192.168.1.2 ct1",
        "2001:db8:1::2 ct1",
        "192.168.1.3 vm2",
        "2001:db8:1::3 vm2",
    ]
    assert "etc/hosts" in guest_files("ct1", [], ["ct1"])
    assert "192.168" not in guest_files("ct1", [], ["ct1"])


VLAN_TEST_SCRIPT = """
start_all()
# /etc/hosts names the VM (the tiny guest has no IPv6 address: -4).
assert ct1.succeed("getent ahostsv4 vm2 | head -1").split()[0] == "192.168.1.2"
ct1.wait_until_succeeds("ping -4 -c1 -W2 vm2", timeout=120)
vm2.wait_until_succeeds("ping -c1 -W2 ct1", timeout=60)  # by the name /etc/hosts gives it
# One connection per nc -l: a read may come between two of them (refused), so it is retried.
ct1.succeed("systemd-run --unit=serve sh -c 'while :; do echo served-by-ct1 | nc -N -l 1234; done'")
served = vm2.wait_until_succeeds("nc -w 10 192.168.1.1 1234", timeout=60)
assert served == "served-by-ct1\\n", served
# The bridge, its address and the two ports, in the driver's network namespace.
import subprocess
ports = subprocess.run(["ip", "-o", "link", "show", "master", "br1"], capture_output=True,
                       text=True, check=True).stdout
assert "vde-tap1" in ports and "ct1-eth1" in ports, ports
assert "192.168.1.254/24" in subprocess.run(["ip", "-o", "addr", "show", "br1"],
                                            capture_output=True, text=True).stdout
"""


@pytest.fixture(scope="module")
def vlan_container_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vlan-containers")
    # In a test of ct1 and vm2, ct1 is node 1 and vm2 node 2, as nixpkgs numbers them; each
    # guest is built knowing the other's name.
    build_debian_container(["ct1"], out, vlans=[1], nodes=["vm2"])
    build_tiny(["vm2"], out, nodes=["ct1"])
    return out


def test_a_container_and_a_vm_on_one_vlan_talk(vlan_container_dir: Path, tmp_path: Path) -> None:
    test = tmp_path / "test.py"
    test.write_text(VLAN_TEST_SCRIPT)
    config = {
        "vms": {"vm2": {"name": "vm2", "start_script": str(vlan_container_dir / "run-vm2-vm")}},
        "containers": {
            "ct1": {"name": "ct1", "start_script": str(vlan_container_dir / "run-ct1-nspawn")}
        },
        "vlans": [1],
        "global_timeout": 600,
        "enable_ssh_backdoor": False,
        "test_script": str(test),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    driver = Path(sys.executable).parent / "nixos-test-driver"
    # A network namespace of its own, as a Nix build has; what the run leaves in it is listed
    # after the driver exits.
    result = subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f"{driver} --config config.json; s=$?; echo links:; ip -o link; exit $s",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=400,
    )
    output = result.stdout + result.stderr
    driver_lines = [line for line in output.splitlines() if " # " not in line]  # no consoles
    assert result.returncode == 0, "\n".join(driver_lines[-60:])
    assert "creating tap interface vde-tap1" in output
    links = result.stdout.rpartition("links:\n")[2].splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"], links
    assert wait_for_no_container_leftovers(runtime, []) == []


# -- bad input -------------------------------------------------------------------------------


def test_a_container_root_in_use_is_refused_and_a_stale_one_cleaned(
    containers: Containers, caplog: pytest.LogCaptureFixture
) -> None:
    ct1 = containers("ct1")
    ct1.succeed("echo written > /root/marker")
    script = str(containers.scripts / "run-ct1-nspawn")
    tmp = containers.tmp
    with pytest.raises(MachineError) as refused:
        NspawnMachine(script, tmp_dir=tmp, out_dir=tmp)
    assert str(refused.value).startswith(
        f"ct1: the container root {ct1.state_dir} is in use by a container that is still running ("
    )
    assert "\n" not in str(refused.value)
    assert ct1.succeed("cat /root/marker") == "written\n"  # untouched
    # A run killed outright (SIGKILL to its start script's process group): the container's own
    # processes outlive systemd-nspawn; the driver ends them.
    assert ct1.process is not None
    leader = ct1.lifecycle.leader
    assert leader is not None
    os.killpg(ct1.process.pid, 9)
    assert wait_for_no_container_leftovers(tmp, [leader]) == []
    assert ct1.state is MachineState.CRASHED
    assert (ct1.state_dir / ".overlay/upper/root/marker").exists()
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.ct1"):
        again = containers("ct1")
    assert f"deleting machine state directory {again.state_dir}" in caplog.text
    assert again.succeed("test -e /root/marker || echo fresh") == "fresh\n"


def test_a_container_another_driver_runs_holds_its_root(
    containers: Containers, container_dir: Path
) -> None:
    """Started from elsewhere (working directory /), found by its mounts."""
    tmp = containers.tmp
    state = tmp / "vm-state-ct1"
    other = subprocess.Popen(
        [str(container_dir / "run-ct1-nspawn")],
        cwd="/",
        env={"RUN_NSPAWN_ROOT_DIR": str(state), "RUN_NSPAWN_SHARED_DIR": str(tmp / "shared")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not any(name == "systemd" for _, name in processes_in(state)):
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.1)
        with pytest.raises(MachineError, match="is in use by a container that is still running"):
            containers("ct1")
    finally:
        other.terminate()
        other.wait(timeout=60)
    assert wait_for_no_container_leftovers(tmp, []) == []
    assert containers("ct1").succeed("hostname") == "ct1\n"


def test_keep_machine_state_keeps_the_container_root(containers: Containers) -> None:
    script = str(containers.scripts / "run-ct1-nspawn")
    tmp = containers.tmp

    def container(keep: bool) -> NspawnMachine:
        machine = NspawnMachine(script, tmp_dir=tmp, out_dir=tmp, keep_machine_state=keep)
        containers.machines.append(machine)
        return machine

    first = container(keep=False)
    first.succeed("echo kept > /root/marker")
    first.shutdown()
    kept = container(keep=True)
    assert kept.succeed("cat /root/marker") == "kept\n"
    kept.release()
    fresh = container(keep=False)
    assert fresh.succeed("cat /root/marker || echo gone") == "gone\n"


def test_registry_watchers_see_a_containers_states(container_dir: Path, tmp_path: Path) -> None:
    script = container_dir / "run-ct1-nspawn"
    seen: list[tuple[str, MachineState]] = []
    with Registry(containers=[("ct1", script)], tmp_dir=tmp_path, out_dir=tmp_path) as registry:
        registry.watch(lambda machine: seen.append((machine.name, machine.state)))
        (ct1,) = registry.machines_nspawn
        ct1.succeed("true")
        ct1.shutdown()
        ct1.start()
        ct1.release()
    assert [state for _, state in seen] == [
        MachineState.STARTING,
        MachineState.UP,
        MachineState.STOPPING,
        MachineState.OFF,
        MachineState.STARTING,
        MachineState.STOPPING,
        MachineState.OFF,
    ]
    assert {name for name, _ in seen} == {"ct1"}
    assert wait_for_no_container_leftovers(tmp_path, []) == []


XDOTOOL_RECORDER = """#!/bin/sh
# Stands in for xdotool: records each call (the container has no X11 here).
echo "DISPLAY=$DISPLAY $*" >> /tmp/xdotool.calls
"""


def test_keys_go_to_xdotool_in_the_container(containers: Containers) -> None:
    ct1 = containers()
    script = containers.tmp / "xdotool"
    script.write_text(XDOTOOL_RECORDER)
    ct1.copy_from_host(str(script), "/usr/local/bin/xdotool")
    ct1.succeed("chmod +x /usr/local/bin/xdotool")
    ct1.send_key("ctrl-alt-f1")
    ct1.send_chars("a$\n", delay=None)
    ct1.send_key("meta_l-l", log=False)
    assert ct1.succeed("cat /tmp/xdotool.calls").splitlines() == [
        "DISPLAY=:0.0 key --clearmodifiers ctrl+alt+F1",
        "DISPLAY=:0.0 type --clearmodifiers --delay 0 -- a",
        "DISPLAY=:0.0 type --clearmodifiers --delay 0 -- $",
        "DISPLAY=:0.0 key --clearmodifiers Return",
        "DISPLAY=:0.0 key --clearmodifiers super+l",
    ]
    # wait_for_x asks xwininfo, as nixpkgs does in a container (a VM's way reads the journal).
    ct1.succeed(
        "printf '#!/bin/sh\\nexit 0\\n' > /usr/local/bin/xwininfo; chmod +x /usr/local/bin/xwininfo"
    )
    ct1.wait_for_x(timeout=30)
    ct1.succeed("printf '#!/bin/sh\\nexit 1\\n' > /usr/local/bin/xwininfo")
    with pytest.raises(RequestedAssertionFailed):
        ct1.wait_for_x(timeout=1)
    # nixpkgs' SSH backdoor command for a container (a string: the systemd-ssh proxy socket).
    assert ct1.ssh_backdoor_command() == (
        'ssh -o User=root -o ProxyCommand="socat - '
        'UNIX-CLIENT:/run/systemd/nspawn/unix-export/ct1/ssh" bash'
    )


VLAN_TAP_SCRIPT = """
import logging, subprocess, sys, tempfile
from pathlib import Path
from nixos_repl.errors import MachineError
from nixos_repl.vlan import VLan, link_exists
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
tmp = Path(tempfile.mkdtemp())
vlan = VLan(7, tmp, tap=True)
vlan.start()
print("tap up:", link_exists("vde-tap7"), vlan.plug_process is not None)
vlan.stop()
print("tap after stop:", link_exists("vde-tap7"), vlan.plug_process.returncode is not None)
subprocess.run(["ip", "tuntap", "add", "vde-tap8", "mode", "tap"], check=True)
other = VLan(8, tmp, tap=True)
try:
    other.start()
except MachineError as e:
    print("refused:", e)
print("switch after refusal:", other.proc.returncode is not None)
"""


def test_the_vlan_plugs_its_tap_in_and_out(tmp_path: Path) -> None:
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", VLAN_TAP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "creating tap interface vde-tap7" in lines
    assert "tap up: True True" in lines
    assert "tap after stop: False True" in lines
    assert (
        "refused: the tap interface vde-tap8 exists already (another test driver with VLAN 8 and "
        "containers runs in this network namespace); stop it, or run this one in a network "
        "namespace of its own (unshare --net)"
    ) in lines
    assert "switch after refusal: True" in lines


REGISTRY_TAP_SCRIPT = """
import sys, tempfile
from pathlib import Path
from nixos_repl.registry import Registry
from nixos_repl.vlan import link_exists
tmp = Path(tempfile.mkdtemp())
with Registry(vlans=[6], tmp_dir=tmp, out_dir=tmp) as registry:
    print("without containers:", link_exists("vde-tap6"))
    registry.add_container(sys.argv[1])
    print("with a container:", link_exists("vde-tap6"))
print("after:", link_exists("vde-tap6"))
"""


def test_a_container_added_later_plugs_the_vlans_taps_in(container_dir: Path) -> None:
    result = subprocess.run(
        [
            "unshare",
            "--net",
            sys.executable,
            "-c",
            REGISTRY_TAP_SCRIPT,
            str(container_dir / "run-ct1-nspawn"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "without containers: False",
        "with a container: True",
        "after: False",
    ]
