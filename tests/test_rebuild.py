"""``rebuild(cmd)`` and ``%rebuild CMD`` on the embedded guests: a build command that writes new
start scripts and a new configuration (a changed, an added and a removed machine, a changed
VLAN set); restarts, additions, removals and the rebound namespace; bad builds change nothing."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from nixos_repl import Driver, DriverConfig, MachineConfig
from nixos_repl.config import load_driver_configuration
from nixos_repl.errors import ConfigError, RebuildError
from nixos_repl.interactive import session as session_mod
from nixos_repl.interactive.live import PlainSink
from nixos_repl.interactive.session import Session
from nixos_repl.rebuild import Redeploy, config_file_source

from .helpers import qemu_alive


def wrapper(path: Path, target: Path, marker: str) -> Path:
    """A start script that boots ``target`` with ``deploy=<marker>`` on the kernel line."""
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'export QEMU_KERNEL_PARAMS="${{QEMU_KERNEL_PARAMS:-}} deploy={marker}"\n'
        f'exec {target} "$@"\n'
    )
    path.chmod(0o755)
    return path


def config_json(path: Path, vms: dict[str, Path], vlans: list[int]) -> Path:
    path.write_text(
        json.dumps(
            {
                "vms": {n: {"name": n, "start_script": str(s)} for n, s in vms.items()},
                "containers": {},
                "vlans": vlans,
                "global_timeout": 3600,
                "enable_ssh_backdoor": False,
                "test_script": "interactive",
            }
        )
    )
    return path


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("nixos_repl")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def macs(machine: Any) -> str:
    return str(machine.succeed("cat /sys/class/net/*/address"))


def test_rebuild_redeploys_what_changed(guest_dir: Path, tmp_path: Path, lines: Lines) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    vm1_script = wrapper(deploy / "run-vm1-vm", guest_dir / "run-vm1-vm", "v1")
    config = config_json(
        deploy / "config.json",
        {"vm1": vm1_script, "vm2": guest_dir / "run-vm2-vm", "crashy": guest_dir / "run-crashy-vm"},
        [1],
    )
    # The build: vm1's script changes, crashy goes, solo comes, VLAN 1 is replaced by VLAN 2.
    new_config = config_json(
        tmp_path / "next.json",
        {"vm1": vm1_script, "vm2": guest_dir / "run-vm2-vm", "solo": guest_dir / "run-solo-vm"},
        [2],
    )
    build = tmp_path / "build.sh"
    build.write_text(
        "echo building the new machines\n"
        f"sed -i s/deploy=v1/deploy=v2/ {vm1_script}\n"
        f"cp {new_config} {config}\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    rt = tmp_path / "rt"
    rt.mkdir()
    driver = Driver(load_driver_configuration(config), out_dir=out, interactive=True, tmp_dir=rt)
    driver.config_source = config_file_source(config)
    with driver:
        ns = driver.test_symbols()
        driver.start_all()
        old = {m.name: m for m in driver.machines}
        for m in old.values():
            m.connect()
        pids: dict[str, int] = {n: m.pid or 0 for n, m in old.items()}
        assert all(pids.values())
        old_vlan = ns["vlan1"]
        assert "deploy=v1" in ns["vm1"].succeed("cat /proc/cmdline")

        actions: list[Any] = []
        driver.registry.observers.append(actions.append)
        result = ns["rebuild"](f"sh {build}")
        # One recorded action: the machines it restarted are not recorded on their own.
        assert [(a.machine, a.action, a.args) for a in actions] == [
            (None, "rebuild", (f"sh {build}",))
        ]
        driver.registry.observers.remove(actions.append)

        assert isinstance(result, Redeploy)
        assert result.restarted == ["vm1"] and result.added == ["solo"]
        assert result.removed == ["crashy"] and result.unchanged == ["vm2"]
        assert result.vlans_added == [2] and result.vlans_removed == [1]
        assert "building the new machines" in lines.lines
        assert lines.lines[-1] == "finished: updating machines"

        # The namespace follows.
        assert [m.name for m in ns["machines"]] == ["solo", "vm1", "vm2"]
        assert "crashy" not in ns and "vlan1" not in ns
        assert ns["vm1"] is driver.registry["vm1"] and ns["vm1"] is not old["vm1"]
        assert ns["solo"] is driver.registry["solo"] and ns["solo"].state == "defined"
        assert ns["vm2"] is old["vm2"]
        assert [v.nr for v in ns["vlans"]] == [2] and ns["vlan2"].pid is not None

        # Processes: the removed and the changed machine's old QEMU and VLAN 1's switch are
        # gone; the unchanged machine runs on.
        assert not qemu_alive(pids["crashy"]) and not qemu_alive(pids["vm1"])
        assert old_vlan.proc.returncode is not None
        assert ns["vm2"].pid == pids["vm2"] and qemu_alive(pids["vm2"])
        assert ns["vm2"].succeed("echo still-up") == "still-up\n"

        # The restarted machine booted its new script, on VLAN 2 (MAC 52:54:00:12:<vlan>:..).
        assert "deploy=v2" in ns["vm1"].succeed("cat /proc/cmdline")
        assert "52:54:00:12:02:" in macs(ns["vm1"]) and "52:54:00:12:01:" not in macs(ns["vm1"])
        # The new machine boots on first use, on VLAN 2.
        assert "52:54:00:12:02:" in macs(ns["solo"])

        # Bad builds change nothing.
        before = {m.name: (m, m.pid) for m in driver.machines}
        with pytest.raises(RebuildError) as failed:
            ns["rebuild"]("echo compiling; echo 'error: attribute missing' >&2; exit 3")
        message = str(failed.value)
        assert "failed (exit code 3)" in message and "error: attribute missing" in message
        assert "the machines were left as they were" in message
        config_json(config, {"vm1": vm1_script, "ghost": tmp_path / "run-ghost-vm"}, [2])
        with pytest.raises(ConfigError, match="start script of machine 'ghost' does not exist"):
            driver.rebuild("true")
        with pytest.raises(RebuildError, match="needs the build command"):
            driver.rebuild("  ")
        assert {m.name: (m, m.pid) for m in driver.machines} == before
        assert lines.lines.count("finished: updating machines") == 1


def test_rebuild_magic_without_a_config_file(guest_dir: Path, tmp_path: Path) -> None:
    """``%rebuild`` in a session made from start scripts: the same scripts are re-read."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "run-vm1-vm"
    shutil.copy(guest_dir / "run-vm1-vm", script)
    out = tmp_path / "out"
    out.mkdir()
    rt = tmp_path / "rt"
    rt.mkdir()
    config = DriverConfig(vms={"vm1": MachineConfig("vm1", script)})
    session = Session(Driver(config, out_dir=out, interactive=True, tmp_dir=rt), PlainSink())
    session_mod.set_current(session)
    ip: Any = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.extension_manager.load_extension("nixos_repl")
    try:
        old = ip.user_ns["vm1"]
        with capture_output():
            result = ip.run_cell("%rebuild true").result
        assert isinstance(result, Redeploy) and result.summary() == "unchanged vm1"
        assert ip.user_ns["vm1"] is old

        # The rest of the line is the command, raw: $VAR reaches the shell, not IPython.
        with capture_output():
            result = ip.run_cell(f'%rebuild X=changed; echo "# $X" >> {script}').result
        assert result.redefined == ["vm1"] and result.restarted == []
        assert script.read_text().endswith("# changed\n")
        assert ip.user_ns["vm1"] is not old and ip.user_ns["vm1"].state == "defined"

        with capture_output() as captured:
            ip.run_cell("%rebuild")
        assert "usage: %rebuild CMD..." in captured.stderr + captured.stdout
    finally:
        ip.extension_manager.unload_extension("nixos_repl")
        InteractiveShell.clear_instance()
        session.close()


def test_notebook_kernels_read_the_config_file_itself(guest_dir: Path, tmp_path: Path) -> None:
    """``nixos-repl notebook --config FILE``: kernels get FILE, so a rebuild re-reads it."""
    from nixos_repl.interactive.notebook import notebook_env

    config = config_json(tmp_path / "config.json", {"vm1": guest_dir / "run-vm1-vm"}, [1])
    loaded = load_driver_configuration(config)
    env = notebook_env(loaded, tmp_path / "server", config)
    assert env["NIXOS_REPL_CONFIG"] == str(config.absolute())
    copied = notebook_env(loaded, tmp_path / "server2")
    assert copied["NIXOS_REPL_CONFIG"] == str(tmp_path / "server2" / "driverConfiguration.json")


def test_redeploy_then_rebind_updates_the_namespace_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Registry.redeploy`` applies a configuration and ``Driver.rebind`` refreshes the names,
    without booting anything and without printing the symbols banner."""
    scripts = {}
    for name in ("vm1", "vm2", "vm3"):
        scripts[name] = tmp_path / f"run-{name}-vm"
        scripts[name].write_text("#!/bin/sh\nexit 1\n")
        scripts[name].chmod(0o755)
    first = DriverConfig(vms={n: MachineConfig(n, scripts[n]) for n in ("vm1", "vm2")})
    with Driver(first, out_dir=tmp_path, tmp_dir=tmp_path, interactive=True) as driver:
        ns = driver.test_symbols()
        assert "additionally exposed symbols" in capsys.readouterr().out
        vm1 = ns["vm1"]
        scripts["vm2"].write_text("#!/bin/sh\nexit 2\n")
        result = driver.registry.redeploy(
            DriverConfig(vms={n: MachineConfig(n, scripts[n]) for n in ("vm2", "vm3")}, vlans=[])
        )
        assert (result.removed, result.redefined, result.added) == (["vm1"], ["vm2"], ["vm3"])
        assert driver.rebind() is ns
        assert "vm1" not in ns and ns["vm3"] is driver.registry["vm3"]
        assert ns["vm2"] is driver.registry["vm2"] and ns["vm2"] is not vm1
        assert [m.name for m in ns["machines"]] == ["vm2", "vm3"]
        assert [m.name for m in ns["machines_qemu"]] == ["vm2", "vm3"]
        assert ns["machines_nspawn"] == []
        assert capsys.readouterr().out == ""
