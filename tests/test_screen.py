"""Screen, keyboard, QMP and HMP controls against real tiny guests under TCG."""

from __future__ import annotations

import datetime as dt
import io
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nixos_repl import (
    Driver,
    DriverConfig,
    MachineConfig,
    MachineError,
    PollingConditionError,
    QMPAPIError,
    Registry,
    RequestedAssertionFailed,
)
from nixos_repl.interactive.display import PNG_SIGNATURE, Screenshot
from nixos_repl.loop import run_sync
from nixos_repl.machine import Machine
from nixos_repl.machine.ocr import iter_ocr
from nixos_repl.machine.qmp import QMPSession

from .helpers import console, free_port, no_live_tesseract

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs tesseract")

# The tiny guest's console: 1280x800 once the bochs DRM driver has taken over, 720x400 before.
CONSOLE_SIZES = {(1280, 800), (720, 400)}


def ppm_size(path: Path) -> tuple[int, int]:
    """Width and height from a binary PPM header (no comments: QEMU writes none)."""
    magic, width, height, _ = path.read_bytes()[:64].split(maxsplit=4)[:4]
    assert magic == b"P6"
    return int(width), int(height)


def tcp_listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port`` on this host."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, _, state = line.split()[1:4]
                address, _, hex_port = local.partition(":")
                if int(hex_port, 16) == port and state == "0A":
                    found.add(address)
    return found


def running(command: str) -> str:
    """A guest check that ``command`` runs (busybox has no pgrep)."""
    return f"ps | grep -q ' {command}$'"


def wait_for_state(machine: Machine, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while machine.state not in states and time.monotonic() < deadline:
        time.sleep(0.02)
    return machine.state


# -- QMP and the monitor ------------------------------------------------------------------------


def qmp(machine: Machine) -> QMPSession:
    assert machine.qmp_client is not None, f"{machine.name} runs"
    return machine.qmp_client


def test_qmp_send_and_api_errors(vm1: Machine) -> None:
    assert qmp(vm1).send("query-status")["return"]["running"] is True
    with pytest.raises(QMPAPIError) as error:
        qmp(vm1).send("no-such-command")
    assert error.value.class_name == "CommandNotFound"
    assert "no-such-command" in error.value.description
    assert error.value.transaction_id is None  # nixpkgs sends no id
    assert "[CommandNotFound]" in str(error.value)
    with pytest.raises(QMPAPIError) as error:
        qmp(vm1).send("screendump", {"no-such-argument": 1})
    assert error.value.class_name == "GenericError"
    assert qmp(vm1).send("query-status")["return"]["status"] == "running"


def test_wait_for_qmp_event(vm1: Machine, tmp_path: Path) -> None:
    qmp(vm1).send("stop")
    qmp(vm1).send("cont")
    event = vm1.wait_for_qmp_event(lambda e: e["event"] == "RESUME", dt.timedelta(seconds=10))
    assert event["event"] == "RESUME" and "timestamp" in event
    # The STOP event before it did not match: it was discarded, as in nixpkgs.
    assert all(e["event"] != "STOP" for e in qmp(vm1).events())
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        vm1.wait_for_qmp_event(lambda e: False, timeout=dt.timedelta(seconds=0.5))
    assert time.monotonic() - start < 2
    assert vm1.succeed("echo running") == "running\n"

    never_started = Machine("run-nothing-vm", tmp_dir=tmp_path, out_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"^QMP API is not ready yet, is the VM ready\?$"):
        never_started.wait_for_qmp_event(lambda e: True)


def test_send_monitor_command_help(vm1: Machine) -> None:
    text = vm1.send_monitor_command("help")
    assert len(text) > 10_000
    assert "balloon" in text
    assert text.endswith("(qemu) ")


# -- screenshots --------------------------------------------------------------------------------


def test_screenshot_files_and_size(vm1: Machine, caplog: pytest.LogCaptureFixture) -> None:
    out_dir = Path(vm1.out_dir)
    reference = Path(vm1.state_dir) / "reference.ppm"
    qmp(vm1).send("screendump", {"filename": str(reference)})
    size = ppm_size(reference)
    reference.unlink()
    assert size in CONSOLE_SIZES

    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        shot = vm1.screenshot("screen-test")
    path = out_dir / "screen-test.png"
    assert shot.path == path and path.exists()
    assert f"making screenshot {path}" in caplog.text
    assert path.read_bytes() == shot.png and shot.png.startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
    assert shot.size == size and shot.image.size == size
    assert shot._repr_png_() == shot.png

    assert vm1.screenshot("screen-test.jpeg").path == out_dir / "screen-test.jpeg"
    nested = out_dir / "sub"
    nested.mkdir(exist_ok=True)
    # A name with a "/" is used as it is (relative to the cwd), only ".png" is added.
    assert vm1.screenshot(f"{nested}/explicit").path == nested / "explicit.png"

    before = set(out_dir.iterdir())
    inline = vm1.screenshot()
    assert isinstance(inline, Screenshot) and inline.path is None and inline.size == size
    assert set(out_dir.iterdir()) == before, "screenshot() without a name saves nothing"
    assert not list(Path(vm1.state_dir).glob("*.ppm")), "the temporary PPMs are removed"


def test_async_screenshots_run_together(vm1: Machine, vm2: Machine) -> None:
    import asyncio

    async def both() -> list[Screenshot]:
        return list(await asyncio.gather(vm1.aio.screenshot(), vm2.aio.screenshot()))

    shots = run_sync(both())
    assert all(shot.size in CONSOLE_SIZES for shot in shots)


# -- keys ---------------------------------------------------------------------------------------


@needs_tesseract
def test_typed_keys_reach_tty1_and_the_screen(vm1: Machine) -> None:
    vm1.send_chars("clear\n")
    vm1.wait_until_tty_matches("1", r"^root@vm1:[^\n]*\n\s*$", timeout=30)
    assert "keys-ok" not in vm1.get_tty_text("1")
    vm1.send_chars("echo keys-ok\n")
    vm1.wait_until_tty_matches("1", "\nkeys-ok", timeout=30)
    lines = vm1.get_tty_text("1").splitlines()
    assert "keys-ok" in [line.strip() for line in lines]
    assert all(len(line) == 160 for line in lines), "folded to the console's width"
    vm1.wait_for_text("keys-ok", timeout=60)
    assert "keys-ok" in vm1.get_screen_text()


def test_key_table_shift_scancodes_and_tab(vm1: Machine) -> None:
    typed = 'A-b_c\tZ!"~|'
    vm1.send_chars("cat > /tmp/typed\n")
    vm1.wait_until_succeeds(running("cat"), timeout=30)
    vm1.send_chars(typed + "\n")
    vm1.send_key("ctrl-d")
    vm1.wait_until_fails(running("cat"), timeout=30)
    assert vm1.succeed("cat /tmp/typed") == typed + "\n"
    vm1.send_key("ret", delay=None, log=False)
    vm1.send_key("ret", delay=dt.timedelta(0))


def test_bad_keys_raise_and_send_nothing(vm1: Machine, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"'enter'.*did you mean 'ret'"):
        vm1.send_key("enter")
    with pytest.raises(ValueError, match="'nosuchkey'"):
        vm1.send_key("ctrl-nosuchkey")
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        with pytest.raises(ValueError, match=r"cannot type 'é' \(position 5"):
            vm1.send_chars("echo é\n")
    assert "sending keys" not in caplog.text, "nothing was typed"
    with pytest.raises(TypeError):
        vm1.send_key("a", delay=True)


def test_send_key_logs(vm1: Machine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        vm1.send_key("shift")
        vm1.send_chars("")
    assert "sending key 'shift'" in caplog.text
    assert "sending keys ''" in caplog.text


# -- OCR ----------------------------------------------------------------------------------------


@needs_tesseract
def test_wait_for_text_honours_its_timeout(vm1: Machine, caplog: pytest.LogCaptureFixture) -> None:
    start = time.monotonic()
    vm1.get_screen_text()
    one_pass = time.monotonic() - start
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        with pytest.raises(RequestedAssertionFailed) as error:
            vm1.wait_for_text("never-on-screen-[0-9]{12}", timeout=3)
    elapsed = time.monotonic() - start
    assert elapsed < 3 + one_pass + 2.0, f"{elapsed:.2f} s (one raw pass: {one_pass:.2f} s)"
    assert re.fullmatch(
        r"action timed out after \d+\.\d\d seconds \(timeout=3\.0\)", str(error.value)
    )
    assert "waiting for never-on-screen-[0-9]{12} to appear on screen" in caplog.text
    assert "Last OCR attempt failed. Text was: [" in caplog.text
    assert no_live_tesseract(), "the cancelled passes' tesseract processes are gone"


@needs_tesseract
def test_screen_text_variants(vm1: Machine) -> None:
    vm1.send_chars("echo variants-ok\n")
    vm1.wait_until_tty_matches("1", "\nvariants-ok", timeout=30)
    texts = vm1.get_screen_text_variants()
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)
    assert any("variants-ok" in text for text in texts), texts


@needs_tesseract
def test_ocr_streams_can_share_what_they_have_read() -> None:
    image = console("keys-ok hello 42")
    shots = 0

    async def screenshot() -> Image.Image:
        nonlocal shots
        shots += 1
        return image

    async def read_all(seen: set[bytes]) -> list[str]:
        async with iter_ocr(screenshot, False, (), seen) as texts:
            return [text async for text in texts]

    seen: set[bytes] = set()
    assert len(run_sync(read_all(seen))) == 1
    assert run_sync(read_all(seen)) == [], "an image read by an earlier stream is not read again"
    assert shots == 2 and len(seen) == 1


def test_missing_tesseract_is_a_clear_error(
    vm1: Machine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MachineError, match="OCR requested but `tesseract` is not available"):
        vm1.get_screen_text()
    with pytest.raises(MachineError, match="OCR requested but `tesseract` is not available"):
        vm1.wait_for_text("anything", timeout=5)


# -- TTYs and the serial console ----------------------------------------------------------------


def test_tty_helpers(vm1: Machine, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        with pytest.raises(RequestedAssertionFailed, match=r"timed out .*\(timeout=1\.0\)"):
            vm1.wait_until_tty_matches("1", "never-on-tty-[0-9]{12}", timeout=1)
    assert "Last chance to match /never-on-tty-[0-9]{12}/ on TTY1, which currently contains:" in (
        caplog.text
    )
    vm1.dump_tty_contents("1")  # the tiny guest has no journal: nothing to check but no error


def test_console_interact_forwards_stdin(
    vm1: Machine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    vm1.succeed(
        "rm -f /tmp/serial-in; (head -n1 /dev/ttyS0 > /tmp/serial-in) </dev/null >/dev/null 2>&1 &"
    )
    vm1.wait_until_succeeds(running("head -n1 /dev/ttyS0"), timeout=30)
    stdin = io.TextIOWrapper(io.BufferedReader(io.BytesIO("serial-ok ✓\n".encode())))
    monkeypatch.setattr(sys, "stdin", stdin)
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        vm1.console_interact()
    assert "Terminal is ready (there is no prompt):" in caplog.text
    assert "Closing connection to the console" in caplog.text
    vm1.wait_until_succeeds("grep -q 'serial-ok ✓' /tmp/serial-in", timeout=30)


# -- network ------------------------------------------------------------------------------------


def test_forward_port_reaches_the_guest(vm1: Machine) -> None:
    # QEMU forwards to the guest's user-networking address, which eth0 gets by DHCP.
    vm1.wait_until_succeeds("ip addr show eth0 | grep -q 'inet 10.0.2.15/'", timeout=30)
    host_port, guest_port = free_port(), 7777
    vm1.forward_port(host_port, guest_port)
    assert tcp_listeners(host_port) == {"0100007F"}, "bound to 127.0.0.1 only"
    vm1.succeed(f"rm -f /tmp/fwd; (nc -l -p {guest_port} > /tmp/fwd) </dev/null >/dev/null 2>&1 &")
    vm1.wait_until_succeeds(f"netstat -tln | grep -q ':{guest_port} '", timeout=30)
    with socket.create_connection(("127.0.0.1", host_port), timeout=10) as conn:
        conn.sendall(b"forwarded-ok\n")
    vm1.wait_until_succeeds("grep -q forwarded-ok /tmp/fwd", timeout=30)

    with pytest.raises(MachineError, match=f"host port {host_port}.*Could not set up host forward"):
        vm1.forward_port(host_port, guest_port)
    with pytest.raises(ValueError, match="host_port"):
        vm1.forward_port(70000, 80)
    assert vm1.send_monitor_command(f"hostfwd_remove tcp:127.0.0.1:{host_port}")


def test_block_and_unblock_the_vlan_link(vm1: Machine, vm2: Machine) -> None:
    ping = "ping -c 1 -W 1 192.168.1.1"
    vm2.wait_until_succeeds(ping, timeout=30)
    try:
        vm1.block()
        vm2.fail(ping)
        assert vm1.fail("ping -c 1 -W 1 192.168.1.2")
    finally:
        vm1.unblock()
    vm2.wait_until_succeeds(ping, timeout=30)


# -- reboot and QEMU dying ----------------------------------------------------------------------


def test_reboot(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    vm.start(allow_reboot=True)
    vm.succeed("touch /tmp/before-reboot")
    with pytest.raises(MachineError, match=r"block\(\).*VLAN.*not found"):
        vm.block()  # no VLAN interface on this machine
    pid = vm.pid
    vm.reboot()
    assert not vm.connected
    assert vm.succeed("echo back") == "back\n"
    assert vm.pid == pid, "the same QEMU: the guest rebooted"
    vm.fail("test -e /tmp/before-reboot")  # a fresh boot (tmpfs)
    assert vm.state == "up"

    vm.release()
    vm.start()  # allow_reboot=False: -no-reboot makes QEMU exit on the reset
    vm.connect()
    vm.reboot()
    assert wait_for_state(vm, {"off", "crashed"}, 30) == "off", "a requested exit, not a crash"


def test_qemu_dying_fails_promptly(own_registry: Registry) -> None:
    vm = own_registry["crashy"]
    vm.connect()
    client = vm.qmp_client
    pid = vm.pid
    assert client is not None and pid is not None
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {pid}"])
    start = time.monotonic()
    with pytest.raises((ConnectionError, MachineError)):
        vm.wait_for_qmp_event(lambda e: False, timeout=60)
    assert time.monotonic() - start < 5, "a wait for an event ends when QEMU dies"
    wait_for_state(vm, {"crashed"}, 5)

    start = time.monotonic()
    with pytest.raises(ConnectionError):
        client.send("query-status")
    with pytest.raises(MachineError, match=r"crashed.*status -9"):
        vm.screenshot()
    with pytest.raises(MachineError, match="crashed"):
        vm.send_key("ret")
    assert time.monotonic() - start < 2


def test_a_failing_polling_condition_stops_screen_and_monitor_actions(
    guest_dir: Path, tmp_path: Path
) -> None:
    """As in nixpkgs, where screenshots, keys and ``crash`` go through
    ``send_monitor_command``: a polling condition that fails stops them as it stops
    ``succeed``, and nothing reaches QEMU. The live view's ``image()`` is no test action."""
    config = DriverConfig(vms={"crashy": MachineConfig("crashy", guest_dir / "run-crashy-vm")})
    healthy = {"ok": True}
    with Driver(config, out_dir=tmp_path) as driver:
        machine = driver.machines_qemu[0]
        machine.connect()
        condition = driver.polling_condition(
            lambda: healthy["ok"], seconds_interval=0, description="the guest is healthy"
        )
        with condition:
            machine.screenshot("before")
            machine.send_key("ret")
            healthy["ok"] = False
            actions = {
                "succeed": lambda: machine.succeed("true"),
                "screenshot": lambda: machine.screenshot("after"),
                "send_key": lambda: machine.send_key("a"),
                "send_chars": lambda: machine.send_chars("echo no\n"),
                "send_monitor_command": lambda: machine.send_monitor_command("info status"),
                "crash": machine.crash,
                "reboot": machine.reboot,
            }
            for action, call in actions.items():
                with pytest.raises(PollingConditionError, match="the guest is healthy"):
                    call()
                assert machine.is_up(), action
            assert not (tmp_path / "after.png").exists()
            assert run_sync(machine.screen.image()).size in CONSOLE_SIZES
            if shutil.which("tesseract") is not None:
                with pytest.raises(PollingConditionError):
                    machine.get_screen_text()
        assert (tmp_path / "before.png").exists()
        healthy["ok"] = True
        assert machine.succeed("echo ok") == "ok\n"
