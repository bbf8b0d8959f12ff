"""JupyterLab in a real headless browser (Debian's chromium through Debian's chromium-driver):
a notebook on the nixos-repl kernel runs ``%screenshot vm1`` and the screenshot shows in the
page."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_interactive_kernel import install_kernelspec, machines_config, qemus_under

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver"
)
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)
TOKEN = "nixos-repl-browser-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def notebook(path: Path, *sources: str) -> None:
    cells: list[dict[str, Any]] = [
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": source}
        for source in sources
    ]  # fmt: skip
    path.write_text(
        json.dumps(
            {
                "cells": cells,
                "metadata": {
                    "kernelspec": {
                        "name": "nixos-repl",
                        "display_name": "nixos-repl",
                        "language": "python",
                    },
                    "language_info": {"name": "python"},
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )


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
    notebook(
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


def test_jupyterlab_shows_a_cells_screenshot(
    lab: tuple[str, Path], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, runtime = lab
    browser.get(f"{url}/lab/tree/shot.ipynb?token={TOKEN}")
    wait = WebDriverWait(browser, 120)
    editor = wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell .cm-content"))
    )
    # The kernel first: keys sent while it starts may be lost.
    wait.until(lambda b: "nixos-repl | Idle" in b.find_element(By.CSS_SELECTOR, "body").text)
    editor.click()
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
    image = WebDriverWait(browser, 180).until(
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-OutputArea-output img")
        )
    )
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script("return arguments[0].naturalWidth", image) > 0
    )
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 1280
    assert str(image.get_attribute("src")).startswith("data:image/png")
    browser.save_screenshot(str(tmp_path / "jupyterlab.png"))
    assert qemus_under(runtime)  # the kernel booted vm1 for the cell
