"""JupyterLab in a real headless browser (Debian's chromium through Debian's chromium-driver):
a notebook on the nixos-repl kernel runs ``%screenshot vm1`` and the screenshot shows in the
page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    TOKEN,
    qemus_under,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver"
)


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
