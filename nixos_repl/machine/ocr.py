"""Screen OCR with tesseract, as nixpkgs' test driver does it, but asynchronous and cancellable.

nixpkgs runs ``tesseract <png> - --oem 2 -c debug_file=/dev/null --psm 11`` on the raw
screenshot and, for ``get_screen_text_variants``/``wait_for_text``, on two ImageMagick-processed
copies (upscaled to 300 dpi, contrast-stretched, posterized; one of them negated). Here the
preprocessing is done with Pillow and the image reaches tesseract uncompressed on its stdin.

Differences from nixpkgs, all deliberate:

* ``--oem 2`` needs the legacy engine in ``eng.traineddata``; Debian's data ships only the LSTM
  model. This is probed once per tesseract binary and ``--oem 1`` is used when ``2`` fails.
* tesseract runs with ``OMP_THREAD_LIMIT=1`` unless the environment sets it: its OpenMP code
  asks for more threads than a small machine has, which made some passes several times slower.
* At most ``max(1, cpus // 2)`` tesseract processes run at once per event loop; raw passes go
  before preprocessed ones, so a fresh screenshot is read before the variants of an old one.
* The preprocessed images are passed with ``--dpi 300``, the density ImageMagick records in the
  PNGs nixpkgs feeds tesseract; the raw screenshot, like nixpkgs', carries none.
* Cancelling any of the coroutines kills the tesseract processes it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import io
import itertools
import logging
import math
import os
import shutil
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal

from PIL import Image, ImageFilter

from nixos_repl.errors import MachineError

__all__ = ["OcrStream", "iter_ocr", "max_processes", "ocr", "ocr_variants", "preprocess"]

log = logging.getLogger(__name__)

TESSERACT_ARGS: Final = ("-c", "debug_file=/dev/null", "--psm", "11")
PREFERRED_OEM: Final = 2  # legacy + LSTM, what nixpkgs asks for
FALLBACK_OEM: Final = 1  # LSTM only
SCALE: Final = 300 / 72  # ImageMagick ``-density 72 -resample 300``
VARIANT_DPI: Final = 300  # what ImageMagick records in the preprocessed PNGs

Variant = Literal["raw", "positive", "negative"]
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "positive", "negative")

_RAW_PRIORITY: Final = 0
_VARIANT_PRIORITY: Final = 1


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_processes() -> int:
    """How many tesseract processes may run at once: ``max(1, cpus // 2)``."""
    return max(1, _cpu_count() // 2)


# --- preprocessing ------------------------------------------------------------------------------


def _contrast_lut() -> list[int]:
    # ImageMagick ``-contrast``: b + 0.5 * (0.5 * (sin(pi * (b - 0.5)) + 1) - b), b in [0, 1].
    lut = []
    for v in range(256):
        b = v / 255
        b += 0.5 * (0.5 * (math.sin(math.pi * (b - 0.5)) + 1.0) - b)
        lut.append(round(min(max(b, 0.0), 1.0) * 255))
    return lut


def _threshold_lut(negate: bool) -> list[int]:
    # ``-posterize 3 [-negate] -gamma 100``: three levels (0, 128, 255), then a gamma so
    # strong that every level but black ends up (nearly) white.
    lut = []
    for v in range(256):
        level = round(v * 2 / 255) * 255 / 2
        if negate:
            level = 255 - level
        lut.append(round(255 * (level / 255) ** (1 / 100)))
    return lut


_CONTRAST: Final = _contrast_lut()
_THRESHOLD: Final = {False: _threshold_lut(False), True: _threshold_lut(True)}


def _normalize(gray: Image.Image) -> Image.Image:
    """ImageMagick ``-normalize``: stretch so the darkest 2% go black and the lightest 1% white.

    When the text is less than 1% of the screen (a few words on a black console) that would
    stretch the background alone; then the full range is stretched instead.
    """
    histogram = gray.histogram()
    total = sum(histogram)
    used = [v for v, count in enumerate(histogram) if count]
    if not used:
        return gray
    lo, hi = used[0], used[-1]
    below = 0
    for v, count in enumerate(histogram):
        below += count
        if below > total * 0.02:
            lo = v
            break
    above = 0
    for v in range(255, -1, -1):
        above += histogram[v]
        if above > total * 0.01:
            hi = v
            break
    if hi <= lo:
        lo, hi = used[0], used[-1]
    if hi <= lo:
        return gray
    scale = 255 / (hi - lo)
    return gray.point([min(255, max(0, round((v - lo) * scale))) for v in range(256)])


def _enhance(image: Image.Image) -> Image.Image:
    """The part of the preprocessing shared by the positive and the negative variant."""
    gray = image.convert("L")
    # Point operations commute with resampling (up to bicubic overshoot): do them on the
    # small image. ``-normalize`` stretches 2% black / 1% white like ImageMagick does.
    gray = _normalize(gray.point(_CONTRAST))
    width, height = gray.size
    big = gray.resize(
        (max(1, round(width * SCALE)), max(1, round(height * SCALE))),
        Image.Resampling.BICUBIC,  # Catmull-Rom, ImageMagick's ``Catrom``
    )
    return big.filter(ImageFilter.MedianFilter(3)).filter(ImageFilter.SHARPEN)


def _binarize(enhanced: Image.Image, negate: bool) -> Image.Image:
    # ``-blur 1x65535``: radius 1 with a huge sigma is a 3x3 box blur.
    return enhanced.point(_THRESHOLD[negate]).filter(ImageFilter.BoxBlur(1))


def preprocess(image: Image.Image, negate: bool) -> Image.Image:
    """Pillow version of nixpkgs' ImageMagick preprocessing; returns a grayscale image.

    Upscale by 300/72 (bicubic), contrast, normalize, despeckle (median), sharpen, posterize to
    three levels, optionally negate, then a gamma that keeps only black as black and a slight
    blur. Dark text on a light background survives the positive variant, light text on a dark
    background the negative one.
    """
    return _binarize(_enhance(image), negate)


def _pnm(image: Image.Image) -> bytes:
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PPM")  # P5/P6: no compression to spend time on, leptonica reads it
    return buf.getvalue()


# --- running tesseract --------------------------------------------------------------------------


def _tesseract() -> str:
    exe = shutil.which("tesseract")
    if exe is None:
        raise MachineError("OCR requested but `tesseract` is not available")
    return exe


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: parallelism comes from running passes side by side, and
    # tesseract's OpenMP loops ask for more threads than there are CPUs, which on a busy
    # (or virtual) machine turns a 2 s pass into a 10 s one now and then.
    env.setdefault("OMP_THREAD_LIMIT", "1")
    return env


async def _reap(proc: asyncio.subprocess.Process, timeout: float = 5.0) -> bool:
    """Wait for a killed process to be reaped, even through further cancellations.

    Cancellation often comes twice (a ``gather`` cancels its children, then their owner does);
    giving up the wait then would leave the zombie and its pipes to the garbage collector.
    Returns whether a cancellation was held back meanwhile.
    """
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(proc.wait())
    deadline = loop.time() + timeout
    cancelled = False
    while not waiter.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("tesseract (pid %d) did not exit after SIGKILL", proc.pid)
            waiter.cancel()
            break
        try:
            await asyncio.wait([waiter], timeout=remaining)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


async def _run(
    exe: str,
    oem: int,
    data: bytes,
    dpi: int | None = None,
    procs: set[asyncio.subprocess.Process] | None = None,
) -> tuple[int, bytes, bytes]:
    args = ["-", "-", "--oem", str(oem), *TESSERACT_ARGS]
    if dpi is not None:
        args += ["--dpi", str(dpi)]
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_environment(),
        )
    except FileNotFoundError as e:
        raise MachineError("OCR requested but `tesseract` is not available") from e
    if procs is not None:
        procs.add(proc)
    try:
        out, err = await proc.communicate(data)
    except BaseException as e:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            if await _reap(proc) and not isinstance(e, asyncio.CancelledError):
                raise asyncio.CancelledError from e
        raise
    finally:
        if procs is not None:
            procs.discard(proc)
    assert proc.returncode is not None
    return proc.returncode, out, err


_engine_modes: dict[tuple[str, str | None], int] = {}


async def _engine_mode(exe: str) -> int:
    """``--oem 2`` if this tesseract and its data can run it, else ``--oem 1`` (probed once)."""
    key = (exe, os.environ.get("TESSDATA_PREFIX"))
    if key in _engine_modes:
        return _engine_modes[key]
    async with _loop_state().probe_lock:
        if key not in _engine_modes:
            blank = _pnm(Image.new("L", (32, 32), 255))
            rc, _, err = await _run(exe, PREFERRED_OEM, blank)
            if rc == 0:
                _engine_modes[key] = PREFERRED_OEM
            else:
                log.debug(
                    "%s cannot run --oem %d (exit code %d: %s); using --oem %d",
                    exe,
                    PREFERRED_OEM,
                    rc,
                    err.decode(errors="replace").strip().replace("\n", " "),
                    FALLBACK_OEM,
                )
                _engine_modes[key] = FALLBACK_OEM
    return _engine_modes[key]


class _Slots:
    """A semaphore whose waiters are served by priority (lower first), then FIFO."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0:  # free slots imply nobody is waiting: _release hands slots over
            self._free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._order), fut))
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # handed a slot just as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


@dataclass
class _LoopState:
    slots: _Slots = field(default_factory=lambda: _Slots(max_processes()))
    probe_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_loop_states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
    weakref.WeakKeyDictionary()
)


def _loop_state() -> _LoopState:
    loop = asyncio.get_running_loop()
    state = _loop_states.get(loop)
    if state is None:
        state = _loop_states[loop] = _LoopState()
    return state


class _Prepared:
    """One screenshot and its preprocessed base image, computed at most once."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self._enhanced: asyncio.Future[Image.Image] | None = None

    def start_enhancing(self) -> asyncio.Future[Image.Image]:
        """Start the shared preprocessing in a thread (it overlaps with the raw pass)."""
        if self._enhanced is None:
            self._enhanced = asyncio.ensure_future(asyncio.to_thread(_enhance, self.image))
            # Mark a failure as seen even when every pass was cancelled before awaiting it.
            self._enhanced.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._enhanced

    async def pnm(self, variant: Variant) -> bytes:
        if variant == "raw":
            return await asyncio.to_thread(_pnm, self.image)
        # Shielded: the other variant may still need it when this pass is cancelled.
        enhanced = await asyncio.shield(self.start_enhancing())
        return await asyncio.to_thread(lambda: _pnm(_binarize(enhanced, variant == "negative")))


async def _pass(
    prepared: _Prepared,
    variant: Variant,
    procs: set[asyncio.subprocess.Process] | None = None,
) -> str:
    exe = _tesseract()
    oem = await _engine_mode(exe)
    priority = _RAW_PRIORITY if variant == "raw" else _VARIANT_PRIORITY
    async with _loop_state().slots.hold(priority):
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = await prepared.pnm(variant)
        encoded = loop.time()
        dpi = None if variant == "raw" else VARIANT_DPI
        rc, out, err = await _run(exe, oem, data, dpi, procs)
        log.debug(
            "OCR %s pass: %.2fs preparing, %.2fs tesseract --oem %d",
            variant,
            encoded - started,
            loop.time() - encoded,
            oem,
        )
    if rc != 0:
        error = MachineError(f"OCR failed with exit code {rc}")
        stderr = err.decode(errors="replace").strip()
        if stderr:
            error.add_note(f"tesseract: {stderr}")
        raise error
    return out.decode(errors="replace")


# --- public API ---------------------------------------------------------------------------------


async def ocr(image: Image.Image) -> str:
    """The text tesseract reads on ``image`` as it is (nixpkgs' ``get_screen_text``)."""
    return await _pass(_Prepared(image), "raw")


async def ocr_variants(image: Image.Image) -> list[str]:
    """Texts read on ``image``: raw, positive, negative (``get_screen_text_variants``).

    The three passes run concurrently, within the process limit.
    """
    _tesseract()
    prepared = _Prepared(image)
    prepared.start_enhancing()
    tasks = [asyncio.create_task(_pass(prepared, variant)) for variant in VARIANTS]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        # On failure or cancellation, stop the other passes (killing their tesseract) too.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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


async def _ocr_job(state: _StreamState, prepared: _Prepared, variant: Variant) -> None:
    try:
        text = await _pass(prepared, variant, state.procs)
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
        prepared = _Prepared(image)
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
            _tesseract()  # fail before taking any screenshot
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
