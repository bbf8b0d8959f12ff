"""The tests/scripts corpus through ``nixos-repl --batch`` and ``nixos-test-driver``."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pytest

from .helpers import BIN, leftovers, run_batch

pytestmark = pytest.mark.vm

SCRIPTS = Path(__file__).parent / "scripts"


def batch(script: str, scripts: Sequence[Path], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "nixos_repl", "--batch", str(SCRIPTS / script),
        "--start-scripts", *map(str, scripts), "--junit-xml", "junit.xml", *extra,
    ]  # fmt: skip


def test_green_script_exits_0_with_junit(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    scripts = [guest_dir / "run-vm1-vm", guest_dir / "run-vm2-vm"]
    logfile = out / "log.xml"
    result = run_batch(
        batch("green.py", scripts, "--vlans", "1"), out, runtime, {"LOGFILE": str(logfile)}
    )
    assert result.returncode == 0, result.stderr
    root = ET.parse(logfile).getroot()  # closed properly
    assert root.tag == "logfile"
    heads = [head.text for head in root.iter("head")]
    assert heads[:3] == ["start all VLans", "run the VM test script", "start all VMs"]
    assert "subtest: namespace" in heads and heads[-1] == "cleanup"
    assert any(line.get("type") == "serial" for line in root.iter("line"))
    assert result.junit() == {
        "machines answer": None,
        "retry and polling conditions": None,
        "namespace": None,
        "join_all": None,
    }
    log = result.stderr
    assert "additionally exposed symbols:\n    vm1, vm2,\n    vlan1,\n" in result.stdout
    for line in (
        "Machine state will be reset. To keep it, pass --keep-machine-state",
        "start all VLans",
        "Test will time out and terminate in 3600 seconds",
        "run the VM test script",
        "start all VMs",
        "vm1: starting vm",
        "subtest: machines answer",
        "vm1: must succeed: echo hello",
        "Checking polling condition 'the guest is alive'",
        "Polling condition succeeded: the guest is alive",
        "namespace checked",
        "wait for all VMs to finish",
        "cleanup",
    ):
        assert f"\n{line}\n" in f"\n{log}" or f"{line}\n" in log, line
    assert "(finished: subtest: namespace, in " in log
    assert "test script finished in " in log
    assert "vm1 # loud-line" in log  # serial lines while serial_stdout_on
    assert "vm1 # quiet-line" not in log


def test_failing_assertion_exits_1_with_filtered_traceback(
    guest_dir: Path, dirs: tuple[Path, Path]
) -> None:
    out, runtime = dirs
    result = run_batch(batch("assert_fails.py", [guest_dir / "run-vm1-vm"]), out, runtime)
    assert result.returncode == 1, result.stderr
    script = str(SCRIPTS / "assert_fails.py")
    assert result.bang_lines() == [
        '!!! Test "version check" failed with error: "command `exit 4` failed (exit code 4)"',
        "!!! Traceback (most recent call last):",
        f'!!!   File "{script}", line 10, in <module>',
        "!!!     check_version()",
        f'!!!   File "{script}", line 6, in check_version',
        '!!!     vm1.succeed("exit 4")',
        "!!! ",
        "!!! RequestedAssertionFailed: command `exit 4` failed (exit code 4)",
    ]
    assert not (out / "after-failure").exists()
    assert "test script finished" not in result.stderr
    assert result.junit() == {"version check": "test case failed"}


def test_machine_error_exits_1_with_full_traceback(
    guest_dir: Path, dirs: tuple[Path, Path]
) -> None:
    out, runtime = dirs
    result = run_batch(batch("machine_error.py", [guest_dir / "run-vm1-vm"]), out, runtime)
    assert result.returncode == 1, result.stderr
    bang = result.bang_lines()
    assert bang[0] == "!!! Traceback (most recent call last):"
    assert any("machine_error.py" in line and "line 2" in line for line in bang)
    assert any("nixos_repl/" in line for line in bang), "the full traceback"
    assert bang[-1].startswith("!!! ") and "broken" in "\n".join(bang[-3:])
    assert not (out / "after-failure").exists()
    assert result.junit() == {"main": "test case failed"}


def test_syntax_error_names_its_line_and_starts_nothing(
    guest_dir: Path, dirs: tuple[Path, Path]
) -> None:
    out, runtime = dirs
    result = run_batch(batch("syntax_error.py", [guest_dir / "run-vm1-vm"]), out, runtime)
    assert result.returncode == 1, result.stderr
    bang = "\n".join(result.bang_lines())
    assert f'File "{SCRIPTS / "syntax_error.py"}", line 3' in bang
    assert "SyntaxError" in bang
    assert "starting vm" not in result.stderr
    assert not (runtime / "vm-state-vm1").exists()


def test_global_timeout_kills_everything(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    scripts = [guest_dir / "run-vm1-vm", guest_dir / "run-vm2-vm"]
    command = batch("hang.py", scripts, "--vlans", "1", "--global-timeout", "15")
    started = time.monotonic()
    result = run_batch(command, out, runtime)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert time.monotonic() - started < 200
    assert "timeout reached; test terminating...\n" in result.stderr
    assert re.search(r"^vm1: kill (QemuMachine|machine) \(pid \d+\)$", result.stderr, re.M)
    assert not (out / "after-failure").exists()
    assert result.junit() == {"hangs": "test case failed"}
    assert leftovers(runtime) == []


def test_config_legacy_flags_and_env_give_the_same_run(
    guest_dir: Path, dirs: tuple[Path, Path]
) -> None:
    out, runtime = dirs
    script = SCRIPTS / "single.py"
    solo = guest_dir / "run-solo-vm"
    config = out / "driverConfiguration.json"
    config.write_text(
        json.dumps({
            "vms": {"solo": {"name": "solo", "start_script": str(solo)}},
            "containers": {},
            "vlans": [],
            "global_timeout": 600,
            "enable_ssh_backdoor": False,
            "test_script": str(script),
        })
    )  # fmt: skip
    driver = str(BIN / "nixos-test-driver")
    junit = ["--junit-xml", "junit.xml"]
    timeout = ["--global-timeout", "600"]
    solo_names = ["--vm-names", "solo", "--vm-start-scripts", str(solo)]
    env = {"startScripts": str(solo), "testScript": str(script), "globalTimeout": "600"}
    runs = {
        "config": run_batch([driver, "--config", str(config), *junit], out, runtime),
        "legacy": run_batch(
            [driver, str(script), "--start-scripts", str(solo), *timeout, *junit], out, runtime
        ),
        "vm-names": run_batch([driver, str(script), *solo_names, *timeout, *junit], out, runtime),
        "env": run_batch([driver, *junit], out, runtime, env=env),
    }
    for name, result in runs.items():
        assert result.returncode == 0, (name, result.stderr)
        assert result.junit() == {"main": None}, name
        assert "Test will time out and terminate in 600 seconds" in result.stderr, name
        assert "solo: must succeed: echo $((6 * 7))" in result.stderr, name
        assert "additionally exposed symbols:\n    solo,\n" in result.stdout, name
        assert "It's deprecated to use the `machine` variable" in result.stderr, name


@pytest.mark.skipif(
    os.environ.get("NIXOS_REPL_DEBIAN_TESTS") != "1",
    reason="the debian guest needs debootstrap, root and the Debian mirror: "
    "set NIXOS_REPL_DEBIAN_TESTS=1 to run this test",
)
def test_systemd_script_on_debian(
    tmp_path_factory: pytest.TempPathFactory, dirs: tuple[Path, Path]
) -> None:
    from nixos_repl.guests import build_debian

    out, runtime = dirs
    (script,) = build_debian(["debian1"], tmp_path_factory.mktemp("debian-guests"))
    result = run_batch(batch("systemd.py", [script]), out, runtime)
    assert result.returncode == 0, result.stderr
    assert result.junit() == {"unit info": None}
    assert "debian1: waiting for unit multi-user.target" in result.stderr
