"""Shared fixtures: tiny guests under TCG, booted once per session where tests can share them.

Every test that uses a guest (the ``guest_dir`` fixture, directly or through another fixture) is
marked ``vm``: ``./dev.sh test -m "not vm"`` runs the fast lane.

Machines start from the boot cache (a cold boot the first time, saved there; in this process
and in every front end and ``--batch`` run a test starts, through ``NIXOS_REPL_BOOT_CACHE``).
``NIXOS_REPL_TEST_BOOT_CACHE=0`` boots every machine cold; ``=DIR`` keeps the cache in DIR.
A test of booting itself (what happens before the backdoor answers) is marked ``cold_boot``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixos_repl import Machine, Registry
from nixos_repl.guests import build_tiny, cache_dir
from nixos_repl.machine.bootcache import ENV as BOOT_CACHE_ENV
from nixos_repl.machine.bootcache import BootCache

from .helpers import (
    BROWSER_FLAGS,
    CHROMEDRIVER,
    CHROMIUM,
    SUITE_GUESTS,
    TOKEN,
    free_port,
    install_kernelspec,
    keep_guests,
    leftovers,
    machines_config,
    write_notebook,
)

# KVM guests hang on the project's machines (nested virtualisation): tests always use TCG.
os.environ["NIXOS_REPL_ACCEL"] = "tcg"
# The Ctrl-C tests need Python's own SIGINT handler, which Python does not install when it
# starts with SIGINT ignored (a background job of a shell without job control).
signal.signal(signal.SIGINT, signal.default_int_handler)
# Sockets, VLAN switches and state directories of this run stay private to it.
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="nixos-repl-tests-")
# Kernels and shells keep their IPython history here, not in the user's ~/.ipython: a search of
# the history sees this run's cells only.
os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="nixos-repl-tests-ipython-")
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
# The boot cache: kept between runs (a clean checkout on the same machine finds it), its keys
# naming the guests' start scripts where ``keep_guests`` puts them.
_SWITCH = os.environ.get("NIXOS_REPL_TEST_BOOT_CACHE", "1")
BOOT_CACHE = (
    None
    if _SWITCH == "0"
    else Path(_SWITCH) if _SWITCH not in ("", "1") else SUITE_GUESTS.parent / "boot"
)  # fmt: skip
if BOOT_CACHE is None:
    os.environ.pop(BOOT_CACHE_ENV, None)
else:
    os.environ[BOOT_CACHE_ENV] = str(BOOT_CACHE)


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


@pytest.fixture(scope="session", autouse=True)
def boot_cache_keeps_the_suites_guests() -> Iterator[None]:
    """Entries of machines the next run cannot find again (start scripts of a test's own, in
    its temporary directory) are dropped, entries older than a week are made anew, and what a
    killed save left half-written is removed after an hour."""
    yield
    if BOOT_CACHE is None:
        return
    now = time.time()
    cache = BootCache(BOOT_CACHE)
    for entry in cache.entries():
        ours = str(entry.meta.get("command", "")).startswith(KEPT_SCRIPTS)
        if not ours or _age(entry.path, now) > 7 * 86400:
            cache.discard(entry)
    for left in BOOT_CACHE.glob(".*-*"):
        if _age(left, now) > 3600:
            shutil.rmtree(left, ignore_errors=True)


# Start scripts at the same paths in every run: the suite's guests, the README's copy
# (test_docs.README_COPY) and the REPL demo's guests (interactive/tour.py).
KEPT_SCRIPTS = tuple(
    f"{d}/" for d in (SUITE_GUESTS, SUITE_GUESTS.parent / "readme", cache_dir() / "demo")
)


def _age(path: Path, now: float) -> float:
    """Seconds since ``path`` changed (0 when another run removed it meanwhile)."""
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0


@pytest.fixture(autouse=True)
def cold_boot(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked ``cold_boot`` boot their machines as if there were no boot cache."""
    if request.node.get_closest_marker("cold_boot") is not None:
        monkeypatch.delenv(BOOT_CACHE_ENV, raising=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cold_boot: the test boots its machines cold (it tests what the boot does)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "guest_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def guest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guests")
    build_tiny(["vm1", "vm2"], path)  # nodes 1 and 2: 192.168.<vlan>.1 and .2
    build_tiny(["crashy", "solo"], path)
    return keep_guests(path)


@pytest.fixture(scope="session")
def registry(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """vm1 and vm2 on VLAN 1, shared by the tests that do not break machines."""
    out = tmp_path_factory.mktemp("out")
    scripts = [guest_dir / "run-vm1-vm", guest_dir / "run-vm2-vm"]
    with Registry.from_start_scripts(scripts, vlans=[1], out_dir=out) as reg:
        # Booted cold: tests read the boot's console lines ("connecting to host...").
        cache = os.environ.pop(BOOT_CACHE_ENV, None)
        try:
            reg.start_all()
        finally:
            if cache is not None:
                os.environ[BOOT_CACHE_ENV] = cache
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


# -- shared by the batch and front-end tests ------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    out, runtime = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    runtime.mkdir()
    yield out, runtime
    assert leftovers(runtime) == [], "a QEMU or vde_switch outlived the run"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = install_kernelspec(tmp_path_factory.mktemp("kernelspec"))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = saved


@pytest.fixture
def repl_env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    return {
        "XDG_RUNTIME_DIR": str(runtime),
        "NIXOS_REPL_ACCEL": "tcg",
        "TERM": "screen",
        "NIXOS_REPL_IMAGES": "halfcell",
        "HOME": os.environ.get("HOME", "/root"),
        "PATH": os.environ["PATH"],
    }


@pytest.fixture
def lab(tmp_path: Path, guest_dir: Path) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server whose nixos-repl kernels get vm1; yields its URL and runtime dir."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_PATH": str(install_kernelspec(tmp_path / "prefix")),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "NIXOS_REPL_CONFIG": str(machines_config(guest_dir, tmp_path, ("vm1",))),
        "XDG_RUNTIME_DIR": str(runtime),
        "NIXOS_REPL_ACCEL": "tcg",
    }
    work = tmp_path / "work"
    work.mkdir()
    write_notebook(
        work / "shot.ipynb",
        "%start vm1\n%type vm1 echo hello from JupyterLab\\n\n"
        "vm1.wait_until_tty_matches('1', 'hello from JupyterLab', timeout=60)\n"
        "%screenshot vm1",
    )
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
         f"--notebook-dir={work}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError(
                        "JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield url, runtime
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
