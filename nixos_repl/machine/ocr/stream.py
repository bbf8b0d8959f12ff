"""The streaming reader behind :func:`iter_ocr`: texts as soon as their OCR pass finishes.

One :class:`asyncio.TaskGroup` (see :func:`.tesseract.passes`) owns everything a block starts:
the task that takes the screenshots, the shared preprocessing of each screenshot and the passes.
The iterator the block gets hands out the texts in the order the passes finish. Leaving the
block cancels whatever still runs and waits for it (tesseract processes killed and reaped); a
task that fails cancels the rest, and its error comes out of the ``async with``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from PIL import Image

from .preprocess import VARIANTS, Prepared, Variant
from .tesseract import passes, read, tesseract

__all__ = ["iter_ocr"]

log = logging.getLogger("nixos_repl.ocr")  # not under nixos_repl.machine.<name>

T = TypeVar("T")


def _digest(image: Image.Image) -> bytes:
    header = f"{image.mode} {image.size} ".encode()
    return hashlib.blake2b(header + image.tobytes(), digest_size=16).digest()


class _Stream(AsyncIterator[str]):
    """The work of one :func:`iter_ocr` block, and the texts it has read, oldest first.

    Every task is created in ``group`` and kept in ``_running`` until it is done, so that
    :meth:`stop` can cancel them all and the iterator knows when nothing more can come.
    """

    def __init__(
        self,
        group: asyncio.TaskGroup,
        screenshot: Callable[[], Awaitable[Image.Image]],
        variants: bool,
        delays: tuple[float, ...],
        seen: set[bytes],
    ) -> None:
        self._group = group
        self._screenshot = screenshot
        self._variants: tuple[Variant, ...] = VARIANTS if variants else VARIANTS[:1]
        self._delays = delays
        self._seen = seen
        self._texts: collections.deque[str] = collections.deque()
        self._running: set[asyncio.Task[Any]] = set()
        self._progress = asyncio.Event()  # set when a task ends (a pass, after adding its text)
        self._spawn(self._drive())

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = self._group.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        self._progress.set()

    def stop(self) -> None:
        """Cancel every task still running; the group waits for them."""
        for task in self._running:
            task.cancel()

    async def _drive(self) -> None:
        """Take a screenshot now and one at each delay after now; start the passes on each."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._shoot(start)
        for delay in self._delays:
            await asyncio.sleep(max(0.0, start + delay - loop.time()))
            await self._shoot(start)

    async def _shoot(self, start: float) -> None:
        image = await self._screenshot()
        digest = await asyncio.to_thread(_digest, image)
        if digest in self._seen:
            log.debug(
                "screen unchanged after %.1fs, not read again",
                asyncio.get_running_loop().time() - start,
            )
            return
        self._seen.add(digest)
        prepared = Prepared(image, self._spawn)
        if len(self._variants) > 1:
            prepared.start_enhancing()  # overlaps with the raw pass
        for variant in self._variants:
            self._spawn(self._read(prepared, variant))

    async def _read(self, prepared: Prepared, variant: Variant) -> None:
        self._texts.append(await read(prepared, variant))

    async def __anext__(self) -> str:
        while not self._texts:
            if not self._running:
                raise StopAsyncIteration
            self._progress.clear()
            await self._progress.wait()
        return self._texts.popleft()


@contextlib.asynccontextmanager
async def iter_ocr(
    screenshot: Callable[[], Awaitable[Image.Image]],
    variants: bool = True,
    rescreen_delays: Sequence[float] = (1.0, 2.0, 4.0),
    seen: set[bytes] | None = None,
) -> AsyncIterator[AsyncIterator[str]]:
    """Read the screen, yielding each OCR text as soon as its pass finishes.

    Takes a screenshot right away and OCRs it (raw, and the two preprocessed variants when
    ``variants``); then takes another screenshot at each of ``rescreen_delays`` seconds after
    the start and OCRs it the same way, unless that exact image was read already. The texts
    end when every pass has finished. Typical use stops at the first match::

        async with iter_ocr(machine_screenshot) as texts:
            async for text in texts:
                if pattern.search(text):
                    break

    Leaving the block, by ``break``, ``return``, an exception or cancellation, cancels the
    passes still pending and kills their tesseract processes; the block ends once they are
    reaped. When a screenshot or a pass fails, the other passes are stopped the same way and
    its error (a :class:`MachineError` for tesseract's) is raised from the ``async with``.

    ``seen`` holds digests of the images read so far; the stream adds to it. Passing the same
    set to successive streams reads each image once over all of them (a blinking cursor
    alternates between two images, which are then read once each).
    """
    delays = tuple(float(d) for d in rescreen_delays)
    if any(not math.isfinite(d) or d < 0 for d in delays):
        raise ValueError(f"rescreen_delays must be finite and >= 0, not {rescreen_delays!r}")
    tesseract()  # fail before taking any screenshot
    async with passes() as group:
        stream = _Stream(group, screenshot, variants, delays, seen if seen is not None else set())
        try:
            yield stream
        finally:
            stream.stop()
