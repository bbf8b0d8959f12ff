"""Many replays on one host: `nixos-repl --batch` keeps no host-global state.

Two replays with the same machine names (and the same VLAN) run at once under one
XDG_RUNTIME_DIR; both pass, each output directory holds only its own results, and nothing is left
behind. A machine whose state directory belongs to a running QEMU is refused, not clobbered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nixos_repl import DriverConfig, MachineConfig, MachineError, Registry
from nixos_repl.batch import SOCKET_PATH_MAX, private_tmp_dir
from nixos_repl.machine import Machine, state_dir_in_use

from .helpers import leftovers

# Both runs wait for each other once their machines are up (a barrier in a host directory), so
# they really overlap; each copies a file naming its run out of vm1.
SCRIPT = """\
import os
from pathlib import Path

tag = os.environ["RUN_TAG"]
barrier = Path(os.environ["BARRIER"])
start_all()
with subtest("machines up"):
    vm1.succeed(f"echo {tag} > /tmp/tag")
    vm2.succeed("ping -c 1 -W 5 192.168.1.1")
    (barrier / tag).touch()
    retry(lambda _: len(list(barrier.iterdir())) == 2, timeout=300)
with subtest("outputs"):
    vm1.copy_from_machine("/tmp/tag")
    vm1.screenshot("screen")
    t.assertEqual(vm1.succeed("cat /tmp/tag"), f"{tag}\\n")
"""


@pytest.mark.vm
def test_two_batch_replays_at_once_with_the_same_names(guest_dir: Path, tmp_path: Path) -> None:
    runtime, barrier = tmp_path / "run", tmp_path / "barrier"
    runtime.mkdir()
    barrier.mkdir()
    script = tmp_path / "test.py"
    script.write_text(SCRIPT)
    scripts = [str(guest_dir / "run-vm1-vm"), str(guest_dir / "run-vm2-vm")]
    procs = {}
    for tag in ("a", "b"):
        out = tmp_path / f"out-{tag}"
        out.mkdir()
        env = {
            **os.environ,
            "XDG_RUNTIME_DIR": str(runtime),
            "RUN_TAG": tag,
            "BARRIER": str(barrier),
            "LOGFILE": str(out / "log.xml"),
        }
        procs[tag] = subprocess.Popen(
            [sys.executable, "-m", "nixos_repl", "--batch", str(script),
             "--start-scripts", *scripts, "--vlans", "1", "-o", str(out),
             "--junit-xml", "junit.xml", "--global-timeout", "600"],
            env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    results = {tag: proc.communicate(timeout=600) for tag, proc in procs.items()}
    pids: dict[str, set[str]] = {}
    for tag, proc in procs.items():
        _, stderr = results[tag]
        assert proc.returncode == 0, f"run {tag}:\n{stderr}"
        out = tmp_path / f"out-{tag}"
        assert (out / "tag").read_text() == f"{tag}\n"
        assert (out / "screen.png").is_file()
        cases = ET.parse(out / "junit.xml").getroot().iter("testcase")
        assert [(c.get("name"), c.find("failure")) for c in cases] == [
            ("machines up", None),
            ("outputs", None),
        ]
        assert ET.parse(out / "log.xml").getroot().tag == "logfile"
        assert sorted(p.name for p in out.iterdir()) == [
            "junit.xml", "log.xml", "screen.png", "tag"
        ]  # fmt: skip
        pids[tag] = set(re.findall(r"QEMU running \(pid (\d+)\)", stderr))
        assert len(pids[tag]) == 2, stderr
    assert not pids["a"] & pids["b"]
    assert sorted(p.name for p in barrier.iterdir()) == ["a", "b"]
    # Each run's directory went with it; no QEMU or switch outlived them.
    assert list(runtime.iterdir()) == []
    assert leftovers(runtime) == []


@pytest.mark.vm
def test_a_state_directory_in_use_is_refused(guest_dir: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    registry = Registry([("solo", guest_dir / "run-solo-vm")], out_dir=tmp_path, tmp_dir=runtime)
    with registry:
        solo = registry["solo"]
        solo.start()
        assert state_dir_in_use(solo.state_dir)
        with pytest.raises(MachineError, match=r"still running .* XDG_RUNTIME_DIR"):
            Machine(str(guest_dir / "run-solo-vm"), tmp_dir=runtime, out_dir=tmp_path)
        assert solo.succeed("echo alive") == "alive\n"  # untouched
    assert not state_dir_in_use(solo.state_dir)
    # A stale directory (its QEMU gone) is reused as before.
    Machine(str(guest_dir / "run-solo-vm"), tmp_dir=runtime, out_dir=tmp_path)


def test_the_private_directory_keeps_socket_paths_within_the_unix_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = DriverConfig(vms={"server": MachineConfig("server", Path("run-server-vm"))})
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "rt"))
    private = private_tmp_dir(config)
    assert private is not None and private.parent == tmp_path / "rt" and private.is_dir()
    longest = private / "vm-state-server" / "nixos-repl-out"
    assert len(str(longest)) <= SOCKET_PATH_MAX
    # Where the extra component would not fit, the shared directory is used, with a warning.
    # 72 bytes: 31 more fit the shared layout (/vm-state-server/nixos-repl-out), 40 do not.
    deep = tmp_path / ("d" * (72 - len(str(tmp_path)) - 1))
    assert len(str(deep)) == 72
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    assert len(str(deep / "vm-state-server" / "nixos-repl-out")) <= SOCKET_PATH_MAX
    with caplog.at_level("WARNING", logger="nixos_repl.driver"):
        assert private_tmp_dir(config) is None
    assert "set XDG_RUNTIME_DIR to a shorter directory" in caplog.text
    assert list(deep.iterdir()) == []
