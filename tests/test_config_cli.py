"""Configuration parsing, the command lines, and every bad input: one line, exit 2, nothing run."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nixos_repl.config import (
    DEFAULT_GLOBAL_TIMEOUT,
    DriverConfig,
    MachineConfig,
    check_config,
    config_from_legacy,
    load_driver_configuration,
    resolve_config,
)
from nixos_repl.errors import ConfigError

from .helpers import BIN


def vm(tmp_path: Path, name: str, executable: bool = True) -> Path:
    script = tmp_path / f"run-{name}-vm"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755 if executable else 0o644)
    return script


def json_config(tmp_path: Path, **override: Any) -> Path:
    data: dict[str, Any] = {
        "vms": {"server": {"name": "server", "start_script": str(vm(tmp_path, "server"))}},
        "containers": {},
        "vlans": [1, 2],
        "global_timeout": 120,
        "enable_ssh_backdoor": False,
        "test_script": str(tmp_path / "test-script"),
    }
    for key, value in override.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    (tmp_path / "test-script").write_text("pass\n")
    path = tmp_path / "driverConfiguration.json"
    path.write_text(json.dumps(data))
    return path


# -- parsing ---------------------------------------------------------------------------------


def test_json_config(tmp_path: Path) -> None:
    config = load_driver_configuration(json_config(tmp_path))
    assert config.vms == {"server": MachineConfig("server", tmp_path / "run-server-vm")}
    assert config.vlans == [1, 2]
    assert config.global_timeout == dt.timedelta(seconds=120)
    assert config.test_script == tmp_path / "test-script"
    check_config(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vlans": None}, "missing key 'vlans'"),
        ({"test_script": None}, "missing key 'test_script'"),
        ({"vlans": "1"}, "'vlans' must be a list"),
        ({"vlans": ["x"]}, "VLAN numbers are integers"),
        ({"global_timeout": "soon"}, "global_timeout: expected a number of seconds"),
        ({"global_timeout": 0}, "must be more than 0 seconds"),
        ({"vms": {"a": {}}}, "vms.a: missing key 'start_script'"),
        ({"vms": []}, "'vms' must be an object"),
        ({"enable_ssh_backdoor": "no"}, "'enable_ssh_backdoor' must be true or false"),
    ],
)
def test_json_config_errors(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_driver_configuration(json_config(tmp_path, **override))
    assert "\n" not in str(e.value)


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"vms": {}')
    with pytest.raises(ConfigError, match="malformed JSON at line 1"):
        load_driver_configuration(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_driver_configuration(tmp_path / "missing.json")
    bad.write_text("[1]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_driver_configuration(bad)


def test_legacy_flags(tmp_path: Path) -> None:
    a, b = vm(tmp_path, "a"), vm(tmp_path, "b-2")
    config = config_from_legacy(
        start_scripts=[str(a), str(b)], vlans=["1", "3"], global_timeout="60", environ={}
    )
    assert list(config.vms) == ["a", "b-2"]
    assert config.vlans == [1, 3]
    assert config.global_timeout == dt.timedelta(seconds=60)
    named = config_from_legacy(vm_names=["x"], vm_start_scripts=[str(a)], environ={})
    assert named.vms == {"x": MachineConfig("x", a)}
    assert config_from_legacy(environ={}).global_timeout == DEFAULT_GLOBAL_TIMEOUT


def test_env_fallbacks(tmp_path: Path) -> None:
    a, b = vm(tmp_path, "a"), vm(tmp_path, "b")
    env = {
        "startScripts": f"{a} {b}",
        "vlans": "1 2",
        "globalTimeout": "30",
        "testScript": str(tmp_path / "t.py"),
    }
    config = config_from_legacy(environ=env)
    assert list(config.vms) == ["a", "b"]
    assert config.vlans == [1, 2]
    assert config.global_timeout == dt.timedelta(seconds=30)
    assert config.test_script == tmp_path / "t.py"
    by_name = config_from_legacy(environ={"vmNames": "p q", "vmStartScripts": f"{a} {b}"})
    assert list(by_name.vms) == ["p", "q"]
    # A flag wins over its variable.
    assert config_from_legacy(vlans=["9"], environ=env).vlans == [9]


def test_legacy_errors(tmp_path: Path) -> None:
    a = vm(tmp_path, "a")
    with pytest.raises(ConfigError, match="must be the same"):
        config_from_legacy(vm_names=["x", "y"], vm_start_scripts=[str(a)], environ={})
    with pytest.raises(ConfigError, match="two start scripts define a machine named 'a'"):
        config_from_legacy(start_scripts=[str(a), str(a)], environ={})
    with pytest.raises(ConfigError, match="cannot be combined with --start-scripts"):
        resolve_config(json_config(tmp_path), start_scripts=[str(a)], environ={})


def test_checks(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    missing = config_from_legacy(start_scripts=[str(tmp_path / "run-x-vm")], environ={})
    with pytest.raises(ConfigError, match="start script of machine 'x' does not exist"):
        check_config(missing)
    plain = config_from_legacy(start_scripts=[str(vm(tmp_path, "y", executable=False))], environ={})
    with pytest.raises(ConfigError, match="start script of machine 'y' is not executable"):
        check_config(plain)
    containers = config_from_legacy(
        container_names=["c1"], container_start_scripts=[str(script)], environ={}
    )
    with pytest.raises(ConfigError, match="start script of container 'c1' is not executable"):
        check_config(containers, need_test_script=False)


def test_containers_need_root_and_systemd_nspawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    containers = config_from_legacy(
        container_names=["c1"],
        container_start_scripts=[str(tmp_path / "run-c1-nspawn")],
        environ={},
    )
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match=r"^containers \(systemd-nspawn\) need root; .*: c1$"):
        check_config(containers, need_test_script=False)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(ConfigError, match="apt-get install systemd-container"):
        check_config(containers, need_test_script=False)
    with pytest.raises(ConfigError, match="no test script"):
        check_config(config_from_legacy(environ={}))
    check_config(config_from_legacy(environ={}), need_test_script=False)


# -- the command lines -----------------------------------------------------------------------


def cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("startScripts", "testScript")}
    runtime = cwd / "runtime"
    runtime.mkdir(exist_ok=True)
    environ.update({"XDG_RUNTIME_DIR": str(runtime), **(env or {})})
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=environ, timeout=60)


def test_help_lists_nixpkgs_flags(tmp_path: Path) -> None:
    result = cli([str(BIN / "nixos-test-driver"), "--help"], tmp_path)
    assert result.returncode == 0
    for flag in (
        "-c CONFIG, --config CONFIG",
        "-K, --keep-machine-state",
        "-I, --interactive, --no-interactive",
        "--debug-hook-attach",
        "-o OUTPUT_DIRECTORY, --output_directory OUTPUT_DIRECTORY",
        "--junit-xml JUNIT_XML",
        "--log-level LOG_LEVEL",
        "--start-scripts",
        "--vm-names",
        "--vm-start-scripts",
        "--vlans",
        "--global-timeout",
        "testscript",
    ):
        assert flag in result.stdout, flag
    assert "--keep-vm-state" not in result.stdout  # hidden, as in nixpkgs
    batch_help = cli([sys.executable, "-m", "nixos_repl", "--help"], tmp_path)
    assert "--batch FILE" in batch_help.stdout and "--start-scripts" in batch_help.stdout


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", "malformed JSON"),
        ("missing-key", "missing key 'global_timeout'"),
        ("missing-script", "does not exist"),
        ("not-executable", "is not executable"),
        ("unequal", "must be the same"),
        (
            "containers",
            "start script of container 'c' does not exist" if os.geteuid() == 0 else "need root",
        ),
        ("no-test-script", "no test script"),
        ("bad-vlan", "VLAN numbers are integers"),
        ("bad-timeout", "expected a number of seconds"),
        ("bad-log-level", "unknown log level"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str, message: str) -> None:
    test = write(tmp_path / "t.py", "open('ran', 'w').close()\n")
    good = str(vm(tmp_path, "good"))
    driver = str(BIN / "nixos-test-driver")
    env: dict[str, str] = {}
    args = {
        "malformed": ["-c", str(write(tmp_path / "c.json", "{"))],
        "missing-key": ["-c", str(json_config(tmp_path, global_timeout=None))],
        "missing-script": [str(test), "--start-scripts", str(tmp_path / "run-gone-vm")],
        "not-executable": [str(test), "--start-scripts", str(vm(tmp_path, "x", False))],
        "unequal": [str(test), "--vm-names", "a", "b", "--vm-start-scripts", good],
        "containers": [
            str(test),
            "--container-names",
            "c",
            "--container-start-scripts",
            str(tmp_path / "run-c-nspawn"),
        ],
        "no-test-script": ["--start-scripts", good],
        "bad-vlan": [str(test), "--start-scripts", good, "--vlans", "one"],
        "bad-timeout": [str(test), "--start-scripts", good, "--global-timeout", "x"],
        "bad-log-level": [str(test), "--start-scripts", good],
    }[case]
    if case == "bad-log-level":
        env["logLevel"] = "chatty"
    result = cli([driver, *args], tmp_path, env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("nixos-test-driver: error: ")
    assert message in result.stderr
    assert not (tmp_path / "ran").exists()
    assert list((tmp_path / "runtime").iterdir()) == []  # no state dir, no VLAN socket


def test_batch_bad_input(tmp_path: Path) -> None:
    result = cli(
        [sys.executable, "-m", "nixos_repl", "--batch", str(tmp_path / "t.py"),
         "--start-scripts", str(tmp_path / "run-gone-vm")],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"nixos-repl: error: start script of machine 'gone' does not exist: "
        f"{tmp_path / 'run-gone-vm'}\n"
    )
    notebook = cli([sys.executable, "-m", "nixos_repl", "--batch", "x.ipynb"], tmp_path)
    assert notebook.returncode == 2 and notebook.stderr.count("\n") == 1


def test_output_directory_must_be_writable(tmp_path: Path) -> None:
    result = cli([str(BIN / "nixos-test-driver"), "-o", str(tmp_path / "nope")], tmp_path)
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_generate_driver_symbols(tmp_path: Path) -> None:
    result = cli([str(BIN / "generate-driver-symbols")], tmp_path)
    assert result.returncode == 0, result.stderr
    symbols = (tmp_path / "driver-symbols").read_text().split(",")
    assert symbols[:3] == ["start_all", "test_script", "machines"]
    assert "dump_machine_ssh" in symbols and "Machine" in symbols


def test_test_driver_module_paths() -> None:
    import nixos_repl
    from test_driver import generate_driver_symbols, main
    from test_driver.debug import DebugAbstract, DebugNop
    from test_driver.driver import Driver
    from test_driver.errors import MachineError, RequestedAssertionFailed
    from test_driver.logger import AbstractLogger
    from test_driver.machine import BaseMachine, NspawnMachine, QemuMachine, retry
    from test_driver.machine.qmp import QMPAPIError
    from test_driver.polling_condition import PollingCondition
    from test_driver.vlan import VLan

    assert QemuMachine is nixos_repl.QemuMachine and BaseMachine is nixos_repl.BaseMachine
    assert issubclass(RequestedAssertionFailed, AssertionError)
    assert MachineError is nixos_repl.MachineError and QMPAPIError is nixos_repl.QMPAPIError
    assert all(
        callable(x) for x in (main, generate_driver_symbols, retry, Driver, VLan, PollingCondition)
    )
    assert issubclass(DebugNop, DebugAbstract)
    assert isinstance(AbstractLogger, type) and isinstance(NspawnMachine, type)


SCRIPTS = Path(__file__).parent / "scripts"


def test_script_without_machines(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "nixos_repl", "--batch", str(SCRIPTS / "no_machines.py")]
    result = cli([*command, "--junit-xml", "junit.xml"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no machines here\n" in result.stderr
    assert "test script finished in " in result.stderr
    assert '<testcase name="arithmetic"' in (tmp_path / "junit.xml").read_text()


def test_other_exceptions_exit_1_with_a_traceback(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "nixos_repl", "--batch", str(SCRIPTS / "other_error.py")]
    result = cli(command, tmp_path)
    assert result.returncode == 1
    assert '!!! Test "typo" failed with error: "name \'undefined_helper\' is not defined"' in (
        result.stderr
    )
    assert "NameError: name 'undefined_helper' is not defined" in result.stderr
    assert f'File "{SCRIPTS / "other_error.py"}", line 2' in result.stderr


def test_batch_options_leave_the_commands_alone() -> None:
    from nixos_repl.cli import _parser

    args = _parser().parse_args(["guest", "build", "tiny", "--name", "a", "--out", "d"])
    assert args.out == Path("d") and args.output_directory is None
    assert _parser().parse_args(["demo", "--out", "x"]).out == Path("x")


# -- machine names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "names"),
    [
        ("config", ["a/../../victim"]),
        ("vm-names", ["a/../../victim"]),
        ("config", [".."]),
        ("vm-names", ["two\nlines"]),
        ("vm-names", ["my-vm", "my_vm"]),
    ],
)
def test_bad_machine_names_exit_2_and_delete_nothing(
    tmp_path: Path, how: str, names: list[str]
) -> None:
    """A name must be one file-name component (its state directory must stay under
    $XDG_RUNTIME_DIR) and no two names may be the same Python name; nothing starts."""
    runtime = tmp_path / "runtime"
    (runtime / "vm-state-a").mkdir(parents=True)  # left by an earlier run of machine `a`
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    test = write(tmp_path / "t.py", "open('ran', 'w').close()\n")
    scripts = [str(vm(tmp_path, f"m{i}")) for i in range(len(names))]
    if how == "config":
        vms = {n: {"name": n, "start_script": s} for n, s in zip(names, scripts, strict=True)}
        args = ["-c", str(json_config(tmp_path, vms=vms, vlans=[])), str(test)]
    else:
        args = [str(test), "--vm-names", *names, "--vm-start-scripts", *scripts]
    result = cli([str(BIN / "nixos-test-driver"), *args], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    expected = "are both 'my_vm' in test scripts" if len(names) == 2 else "invalid machine name"
    assert expected in result.stderr
    assert (victim / "keep").is_dir() and (runtime / "vm-state-a").is_dir()
    assert not (tmp_path / "ran").exists()


def test_machine_names_in_the_api(tmp_path: Path) -> None:
    """``create_machine`` and the registry refuse the same names, before touching anything."""
    from nixos_repl import Driver, Registry
    from nixos_repl.machine import Machine

    (tmp_path / "vm-state-x").mkdir()
    (tmp_path / "victim").mkdir()
    script = str(vm(tmp_path, "m"))
    with Driver(DriverConfig(), out_dir=tmp_path, tmp_dir=tmp_path) as driver:
        with pytest.raises(ConfigError, match=re.escape("invalid machine name 'x/../victim'")):
            driver.create_machine(script, name="x/../victim")
        driver.create_machine(script, name="my-vm")
        with pytest.raises(ConfigError, match="'my-vm' and 'my_vm' are both 'my_vm'"):
            driver.create_machine(script, name="my_vm")
        assert [m.name for m in driver.machines] == ["my-vm"]
    with pytest.raises(ConfigError, match="invalid machine name"):
        Registry([("ok", script), ("x/../victim", script)], out_dir=tmp_path, tmp_dir=tmp_path)
    with pytest.raises(ConfigError, match="invalid machine name"):
        Machine(script, name=".", tmp_dir=tmp_path, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="invalid machine name"):
        check_config(DriverConfig(vms={"a/b": MachineConfig("a/b", Path(script))}))
    assert (tmp_path / "victim").is_dir() and (tmp_path / "vm-state-x").is_dir()


# nixpkgs' test_driver package, 2026 layout (nixos/lib/test-driver/src/test_driver/), and the
# modules of it that are the driver's own plumbing, which no test script imports.
NIXPKGS_TEST_DRIVER = {
    "config", "debug", "display", "driver", "duration", "efi", "errors", "logger", "machine",
    "machine.nspawn_display", "machine.ocr", "machine.qmp", "polling_condition", "qmp",
    "test_reporter", "vlan", "vsock",
}  # fmt: skip
DRIVER_PLUMBING = {"machine.nspawn_display", "test_reporter", "vsock"}


def test_every_nixpkgs_module_path_that_scripts_import_is_there() -> None:
    import importlib

    import test_driver

    root = Path(test_driver.__file__).parent
    ours = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
        if p.name != "__init__.py" or p.parent != root
    }
    assert ours == NIXPKGS_TEST_DRIVER - DRIVER_PLUMBING
    for module in sorted(ours):
        importlib.import_module(f"test_driver.{module}")


def test_test_driver_duration_and_efi() -> None:
    from nixos_repl.errors import MachineError
    from test_driver.duration import as_seconds, as_timedelta
    from test_driver.efi import EfiVariable

    assert as_timedelta(2) == dt.timedelta(seconds=2) and as_seconds(dt.timedelta(0, 1)) == 1.0
    with pytest.raises(TypeError):
        as_seconds(True)
    with pytest.raises(MachineError, match="EFI variables"):
        EfiVariable(name="Demo", flags=EfiVariable.Flags.NON_VOLATILE)


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs tesseract")
def test_test_driver_ocr_reads_a_screenshot_file(tmp_path: Path) -> None:
    """nixpkgs' OCR self-test imports ``test_driver.machine.ocr``."""
    from test_driver.machine import ocr

    from .helpers import console

    path = tmp_path / "screen.png"
    console("keys-ok hello 42").save(path)
    assert "hello" in ocr.perform_ocr_on_screenshot(path)
    texts = ocr.perform_ocr_variants_on_screenshot(path)
    assert len(texts) == 3 and any("hello" in text for text in texts)
    assert ocr.perform_ocr_variants_on_screenshot(path, timeout=0) == ["", "", ""]


@pytest.mark.parametrize(
    "argv",
    [
        ["--vlans", "1", "notebook", "--no-browser"],
        ["notebook", "--vlans", "1", "--no-browser"],
        ["--start-scripts", "a", "b", "notebook", "--no-browser", "--vlans", "1"],
        ["notebook", "--start-scripts", "a", "b", "--vlans", "1", "--no-browser"],
    ],
)
def test_machine_options_before_or_after_the_command(argv: list[str]) -> None:
    from nixos_repl.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.command, args.vlans, args.no_browser) == ("notebook", ["1"], True)
    assert args.start_scripts in (None, ["a", "b"])
    assert args.jupyter_args == []


def test_machine_options_with_a_command_that_takes_none(tmp_path: Path) -> None:
    result = cli(
        [sys.executable, "-m", "nixos_repl", "--vlans", "1", "export", "x.jsonl", "-o", "t.py"],
        tmp_path,
    )
    assert result.returncode == 2
    assert "--vlans: machine options go with the REPL, --batch or notebook, not with export" in (
        result.stderr
    )


def test_nspawn_start_scripts_are_containers(tmp_path: Path) -> None:
    config = config_from_legacy(start_scripts=["/x/run-vm1-vm", "/x/run-ct1-nspawn"], environ={})
    assert list(config.vms) == ["vm1"] and list(config.containers) == ["ct1"]
    assert config.containers["ct1"].start_script == Path("/x/run-ct1-nspawn")
    with pytest.raises(ConfigError, match="two start scripts define a machine named 'a'"):
        config_from_legacy(start_scripts=["/x/run-a-vm", "/y/run-a-nspawn"], environ={})
    both = DriverConfig(
        vms={"a": MachineConfig("a", tmp_path / "run-a-vm")},
        containers={"a": MachineConfig("a", tmp_path / "run-a-nspawn")},
    )
    with pytest.raises(ConfigError, match="'a' names both a machine and a container"):
        check_config(both, need_test_script=False)
