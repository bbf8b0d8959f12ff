"""nixpkgs' test framework type-checks every test script before it runs (driver.nix): it
prepends type hints that import from ``test_driver``, adds ``name: QemuMachine;`` per machine and
``vlanN: VLan``, and runs mypy against the installed driver. Through the flake's overlay that
driver is nixos-repl, so the same step must pass against nixos-repl's wheel: the modules and
names exist and the packages carry ``py.typed``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .helpers import BIN

ROOT = Path(__file__).resolve().parent.parent

# The names the newest nixpkgs prepend imports (facts from nixos/lib/test-script-prepend.py),
# then the type hints it declares for the globals scripts use.
PREPEND = """\
from typing import Any, Callable, ContextManager, Optional
from unittest import TestCase

from test_driver.debug import DebugAbstract, DebugNop
from test_driver.driver import Driver
from test_driver.logger import AbstractLogger, CompositeLogger
from test_driver.machine import BaseMachine, NspawnMachine, QemuMachine
from test_driver.vlan import VLan

start_all: Callable[[], None]
subtest: Callable[[str], ContextManager[None]]
retry: Callable[..., None]
test_script: Callable[[], None]
machines: list[BaseMachine]
vlans: list[VLan]
driver: Driver
log: AbstractLogger
run_tests: Callable[[], None]
join_all: Callable[[], None]
serial_stdout_off: Callable[[], None]
serial_stdout_on: Callable[[], None]
t: TestCase
debug: DebugAbstract
"""

SCRIPT = """\
start_all()
with subtest("types"):
    out: str = server.succeed("echo hi")
    status, _ = client.execute("true")
    server.wait_for_unit("multi-user.target")
    client.wait_until_succeeds("ping -c 1 server", timeout=60)
    t.assertEqual(status, 0)
    log.info(out)
    assert vlan1.nr == 1
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python whose site-packages holds nixos-repl's wheel (built from a copy of the source)
    and, through a .pth file, this environment's dependencies."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("nixos_repl", "test_driver", "kernel"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-c", "from setuptools import build_meta; build_meta.build_wheel('dist')"],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = (source / "dist").glob("nixos_repl-*.whl")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (packages,) = env.glob("lib/python3*/site-packages")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "test_driver/py.typed" in names and "nixos_repl/py.typed" in names
        archive.extractall(packages)
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (packages / "deps.pth").write_text(f"{ours}\n")
    return env / "bin" / "python"


def typecheck(
    python: Path, tmp_path: Path, script: str, cache: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """driver.nix's step: prepend, one line of machine hints, the VLAN hints, the script."""
    path = tmp_path / "testScriptWithTypes"
    hints = "server: QemuMachine; client: QemuMachine;"
    path.write_text(f"{PREPEND}{hints}\nvlan1: VLan\n{script}")
    caching = ["--cache-dir", str(cache)] if cache is not None else ["--no-incremental"]
    return subprocess.run(
        [str(BIN / "mypy"), "--python-executable", str(python), "--no-implicit-optional",
         "--pretty", "--no-color-output", *caching, str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_test_script_type_checks_against_the_installed_driver(site: Path, tmp_path: Path) -> None:
    result = typecheck(site, tmp_path, SCRIPT, site.parent.parent / "mypy-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_type_error_in_the_script_is_reported(site: Path, tmp_path: Path) -> None:
    script = 'server.succeed(1)\nclient.no_such_method("x")\n'
    result = typecheck(site, tmp_path, script, site.parent.parent / "mypy-cache")
    assert result.returncode == 1
    assert '"succeed" of "Machine" has incompatible type "int"' in result.stdout or (
        "succeed" in result.stdout and "incompatible type" in result.stdout
    ), result.stdout
    assert "no_such_method" in result.stdout


def test_without_py_typed_the_step_would_fail(site: Path, tmp_path: Path) -> None:
    (marker,) = site.parent.parent.glob("lib/python3*/site-packages/test_driver/py.typed")
    marker.unlink()
    try:
        result = typecheck(site, tmp_path, SCRIPT)
    finally:
        marker.touch()
    assert result.returncode == 1
    assert "py.typed" in result.stdout


def test_the_build_reads_pyproject_without_deprecations(tmp_path: Path) -> None:
    """``license`` is an SPDX expression (a table is deprecated since setuptools 77, which is
    the first version to read the expression: the build requires it, and the dev tools too)."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (build,) = (Requirement(r) for r in project["build-system"]["requires"])
    assert build.name == "setuptools" and not build.specifier.contains("76.9")
    dev = [Requirement(r) for r in project["project"]["optional-dependencies"]["dev"]]
    assert all(r.specifier == build.specifier for r in dev if r.name == "setuptools")
    assert build.specifier.contains(Version(importlib.metadata.version("setuptools")))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("nixos_repl", "test_driver", "kernel"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel('out')"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (metadata,) = (tmp_path / "out").glob("*.dist-info/METADATA")
    assert "License-Expression: MIT" in metadata.read_text()
