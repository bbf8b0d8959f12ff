"""Containers' pure logic: the Nix-sandbox preparation nixpkgs' driver does before containers (the
decisions, with fakes: nothing here touches this host's /run, /var/run, cgroups or /etc) and the
X11 key names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixos_repl.config import DriverConfig, MachineConfig
from nixos_repl.driver import Driver
from nixos_repl.errors import GuestBuildError, MachineError
from nixos_repl.guests import build_debian_container
from nixos_repl.machine.nspawn import (
    HostView,
    in_nix_sandbox,
    nix_sandbox_preparation,
    prepare_nix_sandbox,
    x11_key_name,
)

READY = HostView(
    run_writable=True, var_run_is_run=True, cgroup2=True, os_release=True, machine_id=True
)
BARE = HostView(
    run_writable=False, var_run_is_run=False, cgroup2=False, os_release=False, machine_id=False
)


def test_in_nix_sandbox_is_a_build_not_a_nix_shell() -> None:
    assert in_nix_sandbox({"NIX_BUILD_TOP": "/build"})
    assert not in_nix_sandbox({"NIX_BUILD_TOP": "/tmp/nix-shell.x", "IN_NIX_SHELL": "impure"})
    assert not in_nix_sandbox({"IN_NIX_SHELL": "pure"})
    assert not in_nix_sandbox({})


def test_a_bare_sandbox_gets_every_step_in_nixpkgs_order() -> None:
    assert nix_sandbox_preparation(BARE) == [
        ["mkdir", "-p", "/run"],
        ["mount", "-t", "tmpfs", "none", "/run"],
        ["mkdir", "-p", "/run/netns"],
        ["mkdir", "-p", "/var"],
        ["ln", "-s", "/run", "/var/run"],
        ["mkdir", "-p", "/sys/fs/cgroup"],
        ["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"],
        ["touch", "/etc/os-release"],
        ["systemd-machine-id-setup"],
    ]


@pytest.mark.parametrize(
    ("lacking", "steps"),
    [
        ({"run_writable": False}, [["mount", "-t", "tmpfs", "none", "/run"]]),
        ({"var_run_is_run": False}, [["ln", "-s", "/run", "/var/run"]]),
        ({"cgroup2": False}, [["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"]]),
        ({"os_release": False}, [["touch", "/etc/os-release"]]),
        ({"machine_id": False}, [["systemd-machine-id-setup"]]),
    ],
)
def test_each_lack_gets_its_own_step(lacking: dict[str, object], steps: list[list[str]]) -> None:
    view = HostView(**{**READY.__dict__, **lacking})
    done = [argv for argv in nix_sandbox_preparation(view) if argv[0] != "mkdir"]
    assert done == steps


def test_a_ready_host_needs_nothing_and_this_host_is_read_right() -> None:
    assert nix_sandbox_preparation(READY) == []
    view = HostView.read()
    # This Debian host, as root: /run writable, /var/run its link, an os-release.
    assert (view.run_writable, view.var_run_is_run, view.os_release) == (
        os.geteuid() == 0,
        True,
        True,
    )
    # A cgroup v1 hierarchy (tmpfs with controllers under it) is not what nspawn needs.
    if any(
        line.split()[1:3] == ["/sys/fs/cgroup", "tmpfs"] for line in Path("/proc/mounts").open()
    ):
        assert not view.cgroup2


def test_preparation_runs_the_steps_and_needs_root() -> None:
    ran: list[list[str]] = []
    assert prepare_nix_sandbox(BARE, run=ran.append, euid=0) == ran
    assert len(ran) == 9
    with pytest.raises(
        MachineError, match=r"^systemd-nspawn requires root to work\. You are 1000$"
    ):
        prepare_nix_sandbox(BARE, run=ran.append, euid=1000)
    assert len(ran) == 9


def test_the_driver_prepares_only_in_a_sandbox_and_only_for_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr("nixos_repl.driver.prepare_nix_sandbox", lambda: calls.append("prepare"))
    script = tmp_path / "run-ct1-nspawn"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    with_container = DriverConfig(containers={"ct1": MachineConfig("ct1", script)})
    for environ, config, expected in [
        ({"NIX_BUILD_TOP": "/build"}, with_container, ["prepare"]),
        ({"NIX_BUILD_TOP": "/build", "IN_NIX_SHELL": "impure"}, with_container, []),
        ({}, with_container, []),
        ({"NIX_BUILD_TOP": "/build"}, DriverConfig(), []),
    ]:
        calls.clear()
        monkeypatch.delenv("NIX_BUILD_TOP", raising=False)
        monkeypatch.delenv("IN_NIX_SHELL", raising=False)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        Driver(config, out_dir=tmp_path, tmp_dir=tmp_path).registry.close()
        assert calls == expected, environ


# -- the container's X11 keyboard (pure: nixpkgs' key translation) ---------------------------


@pytest.mark.parametrize(
    ("key", "x11"),
    [
        ("ctrl-alt-delete", "ctrl+alt+Delete"),
        ("ctrl-alt-f1", "ctrl+alt+F1"),
        ("alt-f2", "alt+F2"),
        ("meta_l-l", "super+l"),
        ("shift-tab", "shift+Tab"),
        ("ctrl-c", "ctrl+c"),
        ("ret", "Return"),
        ("\n", "Return"),
        ("spc", "space"),
        ("kp_enter", "KP_Enter"),
        ("f12", "F12"),
        ("shift", "Shift_L"),  # alone, a modifier is a key
        ("meta_r", "Super_R"),
        ("esc", "Escape"),
        ("0x0C", "0x0C"),  # what X11 has no name for goes through as it is
    ],
)
def test_x11_key_names_as_nixpkgs(key: str, x11: str) -> None:
    assert x11_key_name(key) == x11


# -- the debian-container guest's VLAN options (checked before anything is built) -----------


@pytest.mark.parametrize(
    ("names", "vlans", "nodes", "error"),
    [
        (["ct1"], [256], [], "invalid VLAN 256: VLANs are 0 to 255"),
        (["ct1"], [1, 1], [], r"VLANs must be unique: \[1, 1\]"),
        (["ct1"], [1], ["bad name"], "invalid machine name 'bad name'"),
        (["ct1", "ct2"], [1], ["ct2", "vm1"], r"both a machine built here \(--name\) and another "),
        (
            ["a-long-name"],
            [1],
            [],
            "container name 'a-long-name' is too long for VLANs: its host interface "
            "a-long-name-eth1 would have 16 characters, Linux allows 15; shorten the name",
        ),
    ],
)
def test_bad_vlan_options_are_refused_in_one_line(
    tmp_path: Path, names: list[str], vlans: list[int], nodes: list[str], error: str
) -> None:
    with pytest.raises(GuestBuildError, match=error) as refused:
        build_debian_container(names, tmp_path, vlans=vlans, nodes=nodes)
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []
