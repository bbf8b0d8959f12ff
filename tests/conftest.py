"""Shared fixtures: tiny guests under TCG, booted once per session where tests can share them.

Every test that uses a guest (the ``guest_dir`` fixture, directly or through another fixture) is
marked ``vm``: ``./dev.sh test -m "not vm"`` runs the fast lane.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixos_repl import Machine, Registry
from nixos_repl.guests import build_tiny

# KVM guests hang on the project's machines (nested virtualisation): tests always use TCG.
os.environ["NIXOS_REPL_ACCEL"] = "tcg"
# Sockets, VLAN switches and state directories of this run stay private to it.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="nixos-repl-tests-")
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


REPO = Path(__file__).resolve().parents[1]


def _repo_files() -> set[str]:
    """Files in the checkout that git neither tracks nor ignores."""
    listing = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return set(listing.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_the_checkout() -> Iterator[None]:
    """Tests write into temporary directories: a screenshot or log in the checkout is a leak."""
    before = _repo_files()
    yield
    leaked = sorted(_repo_files() - before)
    assert not leaked, f"tests left files in {REPO}: {leaked}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "guest_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guests")
    build_tiny(["vm1", "vm2"], path)  # nodes 1 and 2: 192.168.<vlan>.1 and .2
    build_tiny(["crashy", "solo"], path)
    return path


@pytest.fixture(scope="session")
def registry(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """vm1 and vm2 on VLAN 1, shared by the tests that do not break machines."""
    out = tmp_path_factory.mktemp("out")
    scripts = [guest_dir / "run-vm1-vm", guest_dir / "run-vm2-vm"]
    with Registry.from_start_scripts(scripts, vlans=[1], out_dir=out) as reg:
        reg.start_all()
        yield reg


@pytest.fixture
def vm1(registry: Registry) -> Machine:
    machine = registry["vm1"]
    machine.connect()
    return machine


@pytest.fixture
def vm2(registry: Registry) -> Machine:
    machine = registry["vm2"]
    machine.connect()
    return machine


@pytest.fixture
def own_registry(guest_dir: Path, tmp_path: Path) -> Iterator[Registry]:
    """A registry with one machine of its own, for tests that crash or stop it."""
    with Registry.from_start_scripts([guest_dir / "run-crashy-vm"], out_dir=tmp_path) as reg:
        yield reg


@pytest.fixture
def crashy(own_registry: Registry) -> Machine:
    """The machine of ``own_registry`` (not started)."""
    return own_registry["crashy"]
