"""``%watch`` through a real nixos-repl kernel (jupyter_client): a frame only when the screen
changed, updates while other cells run, ``--stop``, the machine going off, and bad input."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

from .helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    TOKEN,
    kernel_env,
    machines_config,
    write_notebook,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Recorder:
    """A kernel whose every IOPub message is kept, whatever cell it belongs to."""

    def __init__(self, env: dict[str, str]) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="nixos-repl", env=env)
        self.messages: list[dict[str, Any]] = []

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except Exception:  # queue.Empty
            return None
        self.messages.append(msg)
        return msg

    def run(self, code: str, timeout: float = 120) -> tuple[str, list[dict[str, Any]]]:
        """Execute ``code``; its status and its own outputs (every message is recorded)."""
        msg_id = self.kc.execute(code)
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"no reply to {code!r}"
            msg = self._pump(1)
            if (
                msg is not None
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                break
        reply = self.kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=10)
        own = [m for m in self.messages if m["parent_header"].get("msg_id") == msg_id]
        return str(reply["content"]["status"]), own

    def drain(self, seconds: float) -> None:
        """Record what the kernel sends for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._pump(min(left, 0.2))

    def updates(self, display_id: str, since: int = 0) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages[since:]
            if m["msg_type"] == "update_display_data"
            and m["content"]["transient"].get("display_id") == display_id
        ]

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def text(outputs: list[dict[str, Any]]) -> str:
    parts = []
    for m in outputs:
        content = m["content"]
        if m["msg_type"] == "stream":
            parts.append(content["text"])
        elif m["msg_type"] == "error":
            parts.append("\n".join(content["traceback"]))
        elif "data" in content:
            parts.append(content["data"].get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def kernel(
    jupyter_path: Path, guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Recorder]:
    directory = tmp_path_factory.mktemp("watch")
    runtime = directory / "rt"
    runtime.mkdir()
    k = Recorder(kernel_env(runtime, machines_config(guest_dir, directory, ("vm1", "vm2"))))
    try:
        status, outputs = k.run("%start vm1")
        assert status == "ok", text(outputs)
        # fbcon's blinking cursor changes the screen twice a second: an idle screen is one
        # without it.
        status, outputs = k.run(
            "%succeed vm1 echo 0 > /sys/class/graphics/fbcon/cursor_blink; clear"
        )
        assert status == "ok", text(outputs)
        yield k
    finally:
        k.shutdown()


def start_watch(k: Recorder, line: str) -> tuple[str, str]:
    status, outputs = k.run(line)
    assert status == "ok", text(outputs)
    shown = [m for m in outputs if m["msg_type"] == "display_data"]
    assert len(shown) == 1, outputs
    first = shown[0]["content"]
    png = base64.b64decode(first["data"]["image/png"])
    assert png.startswith(PNG_SIGNATURE)
    assert first["data"]["text/plain"].startswith("vm1 screen 1280x800, live")
    return str(first["transient"]["display_id"]), str(shown[0]["parent_header"]["msg_id"])


def test_frames_only_when_the_screen_changes(kernel: Recorder) -> None:
    k = kernel
    started = time.monotonic()
    display_id, watch_cell = start_watch(k, "%watch vm1 --interval 50")
    assert time.monotonic() - started < 5  # returns at once (the first frame is in the cell)

    mark = len(k.messages)
    k.drain(2.0)  # idle: 40 screenshots, no frame
    assert k.updates(display_id, mark) == []
    status, outputs = k.run("%watch")
    assert status == "ok" and "vm1: every 50 ms, 1 frames from" in text(outputs)

    # Typing changes the screen: frames follow, while other cells run.
    mark = len(k.messages)
    for word in ("alpha ", "beta ", "gamma ", "delta "):
        assert k.run(f"%type vm1 {word}")[0] == "ok"
        k.drain(0.3)
    typed = k.updates(display_id, mark)
    assert 2 <= len(typed) <= 40, len(typed)
    for m in typed:
        data = m["content"]["data"]
        assert base64.b64decode(data["image/png"]).startswith(PNG_SIGNATURE)
        # The updates belong to the %watch cell, not to the cell that typed.
        assert m["parent_header"]["msg_id"] == watch_cell

    # Idle again: nothing more.
    k.drain(0.5)
    mark = len(k.messages)
    k.drain(1.5)
    assert k.updates(display_id, mark) == []

    # A command's output on the screen is a change too.
    mark = len(k.messages)
    assert k.run("%succeed vm1 echo on-the-screen > /dev/tty1")[0] == "ok"
    k.drain(0.5)
    assert len(k.updates(display_id, mark)) >= 1

    status, _ = k.run("%watch --stop vm1")
    assert status == "ok"
    k.drain(0.3)
    last = k.updates(display_id)[-1]["content"]["data"]
    assert "stopped" in last["text/plain"]
    mark = len(k.messages)
    assert k.run("%type vm1 after-stop")[0] == "ok"
    k.drain(0.6)
    assert k.updates(display_id, mark) == []
    status, outputs = k.run("%watch")
    assert "no screen is being watched" in text(outputs)


def test_a_watch_stops_when_the_machine_goes_off(kernel: Recorder) -> None:
    k = kernel
    status, outputs = k.run("%start vm2")
    assert status == "ok", text(outputs)
    status, outputs = k.run("%watch vm2 --interval 50")
    assert status == "ok", text(outputs)
    display_id = next(
        m["content"]["transient"]["display_id"] for m in outputs if m["msg_type"] == "display_data"
    )
    assert k.run("%crash vm2")[0] == "ok"
    k.drain(1.0)
    last = k.updates(display_id)[-1]["content"]["data"]["text/plain"]
    assert "vm2 is crashed: watch stopped" in last or "vm2 is off: watch stopped" in last, last
    status, outputs = k.run("%watch")
    assert "vm2" not in text(outputs)
    # The watch did not boot the machine again.
    status, outputs = k.run("print(vm2.state)")
    assert text(outputs).strip() in ("crashed", "off")


def test_bad_input(kernel: Recorder) -> None:
    k = kernel
    for line, message in [
        ("%watch vm9", "no machine named 'vm9' (known machines: vm1, vm2)"),
        ("%watch --stop vm9", "no machine named 'vm9'"),
        ("%watch vm1 --interval 0", "must be at least 20 ms, not 0"),
        ("%watch vm1 --interval fast", "not a whole number of milliseconds: 'fast'"),
        ("%watch vm1 --interval", "usage: %watch"),
        ("%watch --stop vm1", "vm1 is not being watched"),
    ]:
        status, outputs = k.run(line)
        assert status == "error", line
        assert message in text(outputs), (line, text(outputs))
    status, outputs = k.run("%watch --stop")  # nothing to stop: fine
    assert status == "ok"
    # A machine that is not running has no screen (and is not started by %watch).
    assert k.run("if vm2.booted: vm2.crash()")[0] == "ok"
    status, outputs = k.run("%watch vm2")
    assert status == "error"
    assert "start it with %start vm2" in text(outputs)
    assert k.run("%succeed vm1 echo still-fine")[0] == "ok"


def test_jupyterlab_updates_the_watched_screen_in_place(
    lab: tuple[str, Path], browser: Any, tmp_path: Path
) -> None:
    """In a real JupyterLab: the %watch cell's image changes when a later cell types, and stays
    one image (updated in place, not appended)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = lab
    write_notebook(
        tmp_path / "work" / "watch.ipynb",
        "%start vm1\n%succeed vm1 echo 0 > /sys/class/graphics/fbcon/cursor_blink\n"
        "%watch vm1 --interval 100",
        "%type vm1 echo typed after the watch\\n",
    )
    browser.get(f"{url}/lab/tree/watch.ipynb?token={TOKEN}")
    wait = WebDriverWait(browser, 120)
    editor = wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell .cm-content"))
    )
    # The kernel first: keys sent while it starts may be lost.
    WebDriverWait(browser, 120).until(
        lambda b: "nixos-repl | Idle" in b.find_element(By.CSS_SELECTOR, "body").text
    )
    editor.click()

    def shift_enter() -> None:
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(
            Keys.SHIFT
        ).perform()

    first_cell = ".jp-NotebookPanel .jp-CodeCell:nth-child(1) .jp-OutputArea-output img"
    shift_enter()
    try:
        image = WebDriverWait(browser, 180).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, first_cell))
        )
    except Exception:
        browser.save_screenshot(str(tmp_path / "jupyterlab-watch-failed.png"))
        outputs = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
        raise AssertionError(
            "no image in the %watch cell; outputs: " + repr([o.text for o in outputs])
        ) from None
    before = str(image.get_attribute("src"))
    assert before.startswith("data:image/png")
    time.sleep(1)  # idle: the image stays as it is
    assert str(browser.find_element(By.CSS_SELECTOR, first_cell).get_attribute("src")) == before
    shift_enter()  # the second cell types on vm1's screen
    # JupyterLab replaces the <img> on each update: a found element may go stale at once.
    WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda b: str(b.find_element(By.CSS_SELECTOR, first_cell).get_attribute("src")) != before
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, first_cell)) == 1
    browser.save_screenshot(str(tmp_path / "jupyterlab-watch.png"))


def test_watch_outside_jupyter_says_so(guest_dir: Path, tmp_path: Path) -> None:
    """In a shell without a kernel (the terminal REPL's), %watch says it needs Jupyter."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from nixos_repl import Driver, DriverConfig, MachineConfig
    from nixos_repl.interactive import session as session_mod
    from nixos_repl.interactive.live import PlainSink
    from nixos_repl.interactive.session import Session

    config = DriverConfig(vms={"vm1": MachineConfig("vm1", guest_dir / "run-vm1-vm")})
    rt = tmp_path / "rt"
    rt.mkdir()
    driver = Driver(config, out_dir=tmp_path, interactive=True, tmp_dir=rt)
    session = Session(driver, PlainSink())
    session_mod.set_current(session)
    ip: Any = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.extension_manager.load_extension("nixos_repl")
    try:
        with capture_output() as captured:
            result = ip.run_cell("%watch vm1")
        assert not result.success
        assert "%watch shows a live screen in Jupyter only" in captured.stderr + captured.stdout
        assert "use %screenshot vm1" in captured.stderr + captured.stdout
        assert driver.registry["vm1"].state == "defined"  # nothing was started
    finally:
        ip.extension_manager.unload_extension("nixos_repl")
        InteractiveShell.clear_instance()
        session.close()
