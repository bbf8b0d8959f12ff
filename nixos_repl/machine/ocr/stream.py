"""The streaming reader behind :func:`iter_ocr`: texts as the OCR passes finish."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from PIL import Image

from .preprocess import VARIANTS, Prepared, Variant
from .tesseract import read, tesseract

__all__ = ["OcrStream", "iter_ocr"]

log = logging.getLogger(__name__)


@dataclass
class _Failure:
    error: BaseException


class _End:
    pass


_END: Final = _End()


@dataclass
class _StreamState:
    """What a stream's tasks share; deliberately holds no reference to the stream itself, so
    that a consumer dropping the stream (``break``) lets it be finalized right away."""

    queue: asyncio.Queue[str | _Failure | _End] = field(default_factory=asyncio.Queue)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    procs: set[asyncio.subprocess.Process] = field(default_factory=set)

    def kill(self) -> None:
        """Synchronously kill every running tesseract and cancel every task."""
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for task in list(self.tasks):
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                task.cancel()


async def _ocr_job(state: _StreamState, prepared: Prepared, variant: Variant) -> None:
    try:
        text = await read(prepared, variant, state.procs)
    except Exception as e:
        state.queue.put_nowait(_Failure(e))
    else:
        state.queue.put_nowait(text)


def _digest(image: Image.Image) -> bytes:
    header = f"{image.mode} {image.size} ".encode()
    return hashlib.blake2b(header + image.tobytes(), digest_size=16).digest()


async def _drive(
    state: _StreamState,
    screenshot: Callable[[], Awaitable[Image.Image]],
    variants: bool,
    delays: tuple[float, ...],
    seen: set[bytes],
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    jobs: list[asyncio.Task[None]] = []

    async def shoot() -> None:
        image = await screenshot()
        digest = await asyncio.to_thread(_digest, image)
        if digest in seen:
            log.debug("screen unchanged after %.1fs, not read again", loop.time() - start)
            return
        seen.add(digest)
        prepared = Prepared(image)
        if variants:
            prepared.start_enhancing()
        for variant in VARIANTS if variants else VARIANTS[:1]:
            job = asyncio.create_task(_ocr_job(state, prepared, variant))
            state.tasks.add(job)
            job.add_done_callback(state.tasks.discard)
            jobs.append(job)

    try:
        await shoot()
        for delay in delays:
            await asyncio.sleep(max(0.0, start + delay - loop.time()))
            await shoot()
        if jobs:
            await asyncio.wait(jobs)
    except Exception as e:
        state.queue.put_nowait(_Failure(e))
    else:
        state.queue.put_nowait(_END)


class OcrStream(AsyncIterator[str]):
    """Texts read on a machine's screen, in the order the OCR passes finish.

    Returned by :func:`iter_ocr`. Stopping early, by ``break``, ``aclose()`` or leaving an
    ``async with`` block, cancels the remaining passes and kills their tesseract processes.
    """

    def __init__(
        self,
        screenshot: Callable[[], Awaitable[Image.Image]],
        variants: bool,
        delays: tuple[float, ...],
        seen: set[bytes] | None = None,
    ) -> None:
        self._screenshot = screenshot
        self._variants = variants
        self._delays = delays
        self._seen = seen if seen is not None else set()
        self._state = _StreamState()
        self._driver: asyncio.Task[None] | None = None
        self._closed = False

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        if self._driver is None:
            tesseract()  # fail before taking any screenshot
            self._driver = asyncio.create_task(
                _drive(self._state, self._screenshot, self._variants, self._delays, self._seen)
            )
            self._state.tasks.add(self._driver)
        item = await self._state.queue.get()
        if isinstance(item, str):
            return item
        await self.aclose()
        if isinstance(item, _Failure):
            raise item.error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop: cancel pending passes, kill their tesseract processes and wait for them."""
        self._closed = True
        tasks = list(self._state.tasks)
        self._state.kill()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> OcrStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        state: _StreamState | None = getattr(self, "_state", None)
        if state is not None:
            state.kill()


def iter_ocr(
    screenshot: Callable[[], Awaitable[Image.Image]],
    variants: bool = True,
    rescreen_delays: Sequence[float] = (1.0, 2.0, 4.0),
    seen: set[bytes] | None = None,
) -> OcrStream:
    """Read the screen, yielding each OCR text as soon as its pass finishes.

    Takes a screenshot right away and OCRs it (raw, and the two preprocessed variants when
    ``variants``); then takes another screenshot at each of ``rescreen_delays`` seconds after
    the start and OCRs it the same way, unless that exact image was read already. Ends when
    every pass has finished. Typical use stops at the first match::

        async with iter_ocr(machine_screenshot) as texts:
            async for text in texts:
                if pattern.search(text):
                    break

    ``seen`` holds digests of the images read so far; the stream adds to it. Passing the same
    set to successive streams reads each image once over all of them (a blinking cursor
    alternates between two images, which are then read once each).
    """
    delays = tuple(float(d) for d in rescreen_delays)
    if any(not math.isfinite(d) or d < 0 for d in delays):
        raise ValueError(f"rescreen_delays must be finite and >= 0, not {rescreen_delays!r}")
    return OcrStream(screenshot, variants, delays, seen)
