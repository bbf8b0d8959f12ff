"""Helpers shared by the test modules: processes, interrupts, rendered screens."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "children_named",
    "console",
    "interrupt_after",
    "no_live_tesseract",
    "qemu_alive",
    "tesseract_children",
    "wait_until",
]


def qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def interrupt_after(delay: float) -> threading.Timer:
    """Deliver a real SIGINT to the main thread after ``delay`` seconds, as Ctrl-C does."""
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


FONT_PATHS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_PATHS:
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size + 16)


def console(*lines: str, size: int = 32) -> Image.Image:
    """Light grey text on black, 1280x800, like a Linux virtual console."""
    image = Image.new("RGB", (1280, 800), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((24, 24 + row * size * 5 // 4), line, fill=(170, 170, 170), font=font(size))
    return image


def children_named(name: str) -> list[tuple[int, str]]:
    """(pid, state) of this process's children called ``name``, zombies included."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1 : data.rindex(")")]
        state, ppid = data[data.rindex(")") + 2 :].split()[:2]
        if comm == name and int(ppid) == me:
            found.append((int(entry), state))
    return found


def tesseract_children() -> list[tuple[int, str]]:
    """(pid, state) of this process's tesseract children, zombies included."""
    return children_named("tesseract")


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def no_live_tesseract() -> bool:
    return all(state == "Z" for _, state in tesseract_children())
