"""OCR with the host's tesseract on rendered console-like images (no VM).

Everything runs on the project's one I/O loop, as the machines' OCR does.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from nixos_repl.errors import MachineError
from nixos_repl.loop import run_sync
from nixos_repl.machine import ocr as ocr_module
from nixos_repl.machine.ocr import iter_ocr, ocr, ocr_variants, preprocess
from nixos_repl.machine.ocr.tesseract import PrioritySlots

from .helpers import console, tesseract_children, wait_until

pytestmark = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs tesseract")

EXPECTED = re.compile(r"keys-ok\s+hello\s+42")


def busy_console() -> Image.Image:
    """A full screen of boot messages: seconds of tesseract work per pass."""
    lines = [
        f"[  OK  ] Started unit number {i} keys-ok hello 42 systemd-journald" for i in range(40)
    ]
    return console(*lines, size=16)


def test_ocr_reads_console_text() -> None:
    text = run_sync(ocr(console("keys-ok hello 42")))
    assert EXPECTED.search(text), text


def test_ocr_variants() -> None:
    texts = run_sync(ocr_variants(console("keys-ok hello 42")))
    assert len(texts) == 3
    for text in texts:  # raw, positive, negative
        assert EXPECTED.search(text), texts


def test_preprocess() -> None:
    image = console("keys-ok hello 42")
    for negate in (False, True):
        out = preprocess(image, negate)
        assert out.mode == "L"
        assert out.size == (round(1280 * 300 / 72), round(800 * 300 / 72))
    # Light text on black: the negative variant is mostly white, the positive mostly black.
    assert ImageStat.Stat(preprocess(image, negate=False)).mean[0] < 40
    assert ImageStat.Stat(preprocess(image, negate=True)).mean[0] > 215


def test_iter_ocr_static_screen_is_read_once() -> None:
    image = console("keys-ok hello 42")
    calls = 0

    async def screenshot() -> Image.Image:
        nonlocal calls
        calls += 1
        return image.copy()

    async def collect() -> list[str]:
        async with iter_ocr(screenshot, rescreen_delays=(0.05, 0.1)) as texts:
            return [text async for text in texts]

    texts = run_sync(collect())
    assert calls == 3
    assert len(texts) == 3  # unchanged screens are not read again
    assert all(EXPECTED.search(text) for text in texts), texts


def test_iter_ocr_reads_fresh_screenshots() -> None:
    screens = [console("waiting for input"), console("keys-ok hello 42")]

    async def screenshot() -> Image.Image:
        return screens.pop(0) if len(screens) > 1 else screens[0]

    async def collect() -> list[str]:
        async with iter_ocr(screenshot, variants=False, rescreen_delays=(0.2,)) as texts:
            return [text async for text in texts]

    texts = run_sync(collect())
    assert len(texts) == 2
    assert "waiting" in texts[0]
    assert EXPECTED.search(texts[1]), texts


def test_iter_ocr_break_kills_tesseract() -> None:
    image = busy_console()

    async def screenshot() -> Image.Image:
        return image

    async def main() -> None:
        seen_running = False
        async with iter_ocr(screenshot, rescreen_delays=()) as texts:
            async for text in texts:
                assert "hello" in text
                # The preprocessed passes start as soon as the raw one is done.
                seen_running = await wait_until(lambda: bool(tesseract_children()), 10)
                break
        assert seen_running
        # The block ends once the pending passes' processes are killed and reaped.
        assert not tesseract_children()

    run_sync(main())


def test_iter_ocr_aclose_kills_tesseract() -> None:
    image = busy_console()

    async def screenshot() -> Image.Image:
        return image

    async def main() -> None:
        async with iter_ocr(screenshot, rescreen_delays=()) as texts:
            first = asyncio.ensure_future(anext(texts))
            assert await wait_until(lambda: bool(tesseract_children()), 10)
            first.cancel()  # stop waiting for the (slow) raw pass, leave the block
        assert not tesseract_children()

    run_sync(main())


def test_cancelled_ocr_kills_tesseract() -> None:
    async def main() -> None:
        task = asyncio.create_task(ocr_variants(busy_console()))
        assert await wait_until(lambda: bool(tesseract_children()), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The task ends once its processes are killed and reaped.
        assert not tesseract_children()

    run_sync(main())


def test_missing_tesseract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    message = "OCR requested but `tesseract` is not available"
    image = Image.new("RGB", (64, 64))

    async def screenshot() -> Image.Image:
        raise AssertionError("no screenshot is taken without tesseract")

    async def first_text() -> str:
        async with iter_ocr(screenshot) as texts:
            async for text in texts:
                return text
        return ""

    with pytest.raises(MachineError) as e:
        run_sync(ocr(image))
    assert str(e.value) == message
    with pytest.raises(MachineError, match="`tesseract` is not available"):
        run_sync(ocr_variants(image))
    with pytest.raises(MachineError, match="`tesseract` is not available"):
        run_sync(first_text())


def fake_tesseract(directory: Path, body: str) -> None:
    script = directory / "tesseract"
    # The tests put the fake alone on PATH; its own commands come from the system's.
    script.write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_failing_tesseract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_tesseract(tmp_path, "cat >/dev/null; echo broken >&2; exit 3")
    monkeypatch.setenv("PATH", str(tmp_path))
    image = Image.new("RGB", (64, 64))

    async def screenshot() -> Image.Image:
        return image

    async def read_stream() -> list[str]:
        async with iter_ocr(screenshot, rescreen_delays=()) as texts:
            return [text async for text in texts]

    with pytest.raises(MachineError) as e:
        run_sync(ocr(image))
    assert str(e.value) == "OCR failed with exit code 3"
    assert e.value.__notes__ == ["tesseract: broken"]
    # The first failure itself, not an ExceptionGroup, whichever way the passes ran.
    for run in (ocr_variants(image), read_stream()):
        with pytest.raises(MachineError) as e:
            run_sync(run)
        assert str(e.value) == "OCR failed with exit code 3"
    assert not tesseract_children()


def test_engine_mode_is_probed_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A tesseract whose data has the legacy engine: nixpkgs' --oem 2 is kept.
    log = tmp_path / "calls"
    fake_tesseract(tmp_path, f'cat >/dev/null; echo "$@" >> {log}; echo "$@"')
    monkeypatch.setenv("PATH", str(tmp_path))
    image = Image.new("RGB", (64, 64))
    first = run_sync(ocr(image))
    second = run_sync(ocr(image))
    assert first == second
    assert first.split() == [
        "-", "-", "--oem", "2", "-c", "debug_file=/dev/null", "--psm", "11"
    ]  # fmt: skip
    assert len(log.read_text().splitlines()) == 3  # one probe, two passes


def test_engine_mode_falls_back_to_lstm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    body = 'cat >/dev/null; case "$*" in *"--oem 2"*) exit 1;; esac; echo "$@"'
    fake_tesseract(tmp_path, body)
    monkeypatch.setenv("PATH", str(tmp_path))
    text = run_sync(ocr(Image.new("RGB", (64, 64))))
    assert "--oem 1" in text
    assert "--psm 11" in text
    assert "debug_file=/dev/null" in text


def test_concurrency_is_bounded() -> None:
    assert ocr_module.max_processes() == max(1, len(os.sched_getaffinity(0)) // 2)


def test_iter_ocr_failing_screenshot_stops_the_passes() -> None:
    image = busy_console()
    shots = 0

    async def screenshot() -> Image.Image:
        nonlocal shots
        shots += 1
        if shots > 1:
            raise MachineError("screendump failed")
        return image

    async def main() -> None:
        with pytest.raises(MachineError, match="screendump failed"):
            async with iter_ocr(screenshot, rescreen_delays=(0.2,)) as texts:
                async for _ in texts:
                    pass
        assert shots == 2
        assert not tesseract_children()

    run_sync(main())


def test_iter_ocr_error_in_the_block_stops_the_passes() -> None:
    image = busy_console()

    async def screenshot() -> Image.Image:
        return image

    async def main() -> None:
        with pytest.raises(KeyError, match="consumer"):
            async with iter_ocr(screenshot, rescreen_delays=()):
                assert await wait_until(lambda: bool(tesseract_children()), 10)
                raise KeyError("consumer")
        assert not tesseract_children()

    run_sync(main())


def test_iter_ocr_timeout_stops_the_passes() -> None:
    image = busy_console()

    async def screenshot() -> Image.Image:
        return image

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                async with iter_ocr(screenshot, rescreen_delays=()) as texts:
                    assert await wait_until(lambda: bool(tesseract_children()), 10)
                    deadline.reschedule(asyncio.get_running_loop().time())
                    async for _ in texts:
                        pass
        assert not tesseract_children()

    run_sync(main())


def test_at_most_max_processes_tesseract_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = tmp_path / "events"
    fake_tesseract(tmp_path, f"echo start >> {log}; cat >/dev/null; sleep 0.1; echo end >> {log}")
    monkeypatch.setenv("PATH", str(tmp_path))
    images = [console("one"), console("two")]

    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            for image in images:
                group.create_task(ocr_variants(image))

    run_sync(main())
    running = most = 0
    for event in log.read_text().split():
        running += 1 if event == "start" else -1
        most = max(most, running)
    assert most <= ocr_module.max_processes()
    assert log.read_text().split().count("start") == 1 + 3 * len(images)  # the probe, the passes


def test_raw_passes_take_free_slots_first() -> None:
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        order: list[str] = []
        release = asyncio.Event()

        async def take(name: str, priority: int) -> None:
            async with slots.hold(priority):
                order.append(name)
                if name == "holder":
                    await release.wait()

        async with asyncio.TaskGroup() as group:
            for name, priority in [("holder", 0), ("variant", 1), ("raw", 0), ("gone", 0)]:
                task = group.create_task(take(name, priority))
                for _ in range(3):
                    await asyncio.sleep(0)  # let it take the slot or queue up
            task.cancel()  # a waiter cancelled before its turn takes no slot
            release.set()
        return order

    assert run_sync(main()) == ["holder", "raw", "variant"]
