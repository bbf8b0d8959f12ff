"""tesseract processes: finding the binary, the engine-mode probe, running, killing, reaping.

One pass (:func:`read`) feeds one variant of a screenshot to one tesseract process on its stdin
and returns what it printed. Passes wait for one of :func:`max_processes` slots, raw passes
first; a cancelled pass kills its process and reaps it before it gives up.

The slots and the engine-mode probe's lock are module-level, created on first use: asyncio
primitives bind to the loop that first waits on them, and all OCR runs on the one I/O loop
(:mod:`nixos_repl.loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import shutil
from collections.abc import AsyncIterator
from typing import Final

from PIL import Image

from nixos_repl.errors import MachineError

from .preprocess import DENSITY, VARIANTS, Prepared, Variant, pnm

__all__ = ["max_processes", "ocr", "ocr_variants", "passes", "read", "tesseract"]

log = logging.getLogger("nixos_repl.ocr")  # not under nixos_repl.machine.<name>

TESSERACT_ARGS: Final = ("-c", "debug_file=/dev/null", "--psm", "11")
PREFERRED_OEM: Final = 2  # legacy + LSTM, what nixpkgs asks for
FALLBACK_OEM: Final = 1  # LSTM only

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


def tesseract() -> str:
    """The path of the tesseract binary on ``PATH``; a :class:`MachineError` when there is none."""
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

    Cancellation often comes twice (a TaskGroup cancels its tasks, then its owner is cancelled
    too); giving up the wait then would leave the zombie and its pipes to the garbage collector.
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


async def _run_tesseract(
    exe: str, oem: int, data: bytes, dpi: int | None = None
) -> tuple[int, bytes, bytes]:
    """Run tesseract on ``data``: its exit code, stdout and stderr.

    Cancelled, or failing while it talks to the process, it kills the process and reaps it.
    """
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
    try:
        out, err = await proc.communicate(data)
    except BaseException as e:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            if await _reap(proc) and not isinstance(e, asyncio.CancelledError):
                raise asyncio.CancelledError from e
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


_engine_modes: dict[tuple[str, str | None], int] = {}


async def _engine_mode(exe: str) -> int:
    """``--oem 2`` if this tesseract and its data can run it, else ``--oem 1`` (probed once)."""
    key = (exe, os.environ.get("TESSDATA_PREFIX"))
    if key in _engine_modes:
        return _engine_modes[key]
    async with _probe_lock():
        if key not in _engine_modes:
            blank = pnm(Image.new("L", (32, 32), 255))
            rc, _, err = await _run_tesseract(exe, PREFERRED_OEM, blank)
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


class PrioritySlots:
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


@functools.cache
def _slots() -> PrioritySlots:
    """The process slots every pass shares, created on first use (on the one I/O loop)."""
    return PrioritySlots(max_processes())


@functools.cache
def _probe_lock() -> asyncio.Lock:
    """Held while probing an engine mode, so that concurrent first passes probe once."""
    return asyncio.Lock()


async def read(prepared: Prepared, variant: Variant) -> str:
    """One pass: the text tesseract reads on ``variant`` of ``prepared``'s screenshot.

    Waits for a process slot (raw passes first), prepares the image in a thread, runs
    tesseract; a non-zero exit is a :class:`MachineError` with tesseract's stderr as a note.
    """
    exe = tesseract()
    oem = await _engine_mode(exe)
    priority = _RAW_PRIORITY if variant == "raw" else _VARIANT_PRIORITY
    async with _slots().hold(priority):
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = await prepared.pnm(variant)
        encoded = loop.time()
        dpi = None if variant == "raw" else DENSITY
        rc, out, err = await _run_tesseract(exe, oem, data, dpi)
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


@contextlib.asynccontextmanager
async def passes() -> AsyncIterator[asyncio.TaskGroup]:
    """An :class:`asyncio.TaskGroup` for OCR passes that raises their failure as it is.

    As with a TaskGroup, a failing task cancels the other tasks and the block's body, and
    leaving the block (normally, by an exception or by cancellation) waits for every task, so
    no tesseract outlives it. What comes out is the first error itself, not an
    :class:`ExceptionGroup` (other errors raised meanwhile are added to it as notes): callers
    catch :class:`MachineError` as with nixpkgs.
    """
    error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as failures:
        error = failures.exceptions[0]
        for other in failures.exceptions[1:]:
            error.add_note(f"another OCR task failed at the same time: {other!r}")
    if error is not None:
        context = error.__context__
        try:
            raise error
        finally:
            # Raising here would chain the cancellation the group sent the body to the error.
            error.__context__ = context


async def ocr(image: Image.Image, variant: Variant = "raw") -> str:
    """The text tesseract reads on ``image`` as it is (nixpkgs' ``get_screen_text``).

    With ``variant`` ``"positive"`` or ``"negative"``, on that preprocessed copy instead (the
    preprocessing counts in the time the pass takes).
    """
    async with passes() as group:
        return await read(Prepared(image, group.create_task), variant)


async def ocr_variants(image: Image.Image) -> list[str]:
    """Texts read on ``image``: raw, positive, negative (``get_screen_text_variants``).

    The three passes run concurrently, within the process limit. When one fails, or the caller
    is cancelled, the others are cancelled and their tesseract processes killed.
    """
    tesseract()
    async with passes() as group:
        prepared = Prepared(image, group.create_task)
        prepared.start_enhancing()
        tasks = [group.create_task(read(prepared, variant)) for variant in VARIANTS]
    return [task.result() for task in tasks]
