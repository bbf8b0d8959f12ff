"""Screen and keyboard of a machine: screenshots, keys and OCR, over QMP.

nixpkgs goes through the human monitor for these; here QMP is used, which is faster and reports
errors:

* ``screenshot`` asks QEMU for a PPM over QMP ``screendump`` and converts it with Pillow (no
  ``pnmtopng`` fork). ``screenshot()`` without a name returns the :class:`Screenshot` unsaved,
  for inline display.
* ``send_key`` uses QMP ``send-key`` with a 10 ms hold time (HMP ``sendkey`` holds 100 ms), and
  an unknown key name raises ``ValueError`` instead of being ignored.
* ``wait_for_text`` reads screenshots as the OCR passes finish and stops at the first match; at
  the deadline it cancels the running passes, so it ends within its timeout plus one raw pass.

As nixpkgs' ``send_monitor_command`` does, every screendump and key press made for a call of
the API first runs ``before_action`` (the machine's polling conditions), so a failing condition
stops a ``screenshot`` or a ``send_key`` the way it stops a ``succeed``. ``image()`` alone
skips them: it is the live view's, not a test action.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from PIL import Image

from ..errors import MachineError, QMPAPIError
from . import ocr
from .keys import CHAR_TO_KEY, key_to_qmp
from .lifecycle import Lifecycle
from .screenshot import Screenshot, load_ppm
from .timing import Duration, nested, seconds, timed_out

__all__ = ["Screen", "screenshot_path"]

T = TypeVar("T")

# QMP ``send-key`` hold time: how long each key stays pressed (HMP ``sendkey`` uses 100 ms).
KEY_HOLD_MS: Final = 10
# Within one wait_for_text attempt, fresh screenshots this long after its start.
OCR_RESCREEN: Final = (1.0, 2.0, 4.0)


def screenshot_path(filename: str, out_dir: Path) -> str:
    """nixpkgs' naming rules: add ``.png`` if the name has no ``.``; put it in ``out_dir`` if
    it has no ``/``."""
    if "." not in filename:
        filename += ".png"
    if "/" not in filename:
        filename = os.path.join(out_dir, filename)
    return filename


def _load(ppm: Path) -> Image.Image:
    try:
        return load_ppm(ppm.read_bytes())
    except ValueError as e:
        raise MachineError(f"QEMU's screendump is unreadable: {e}") from e


def _convert(ppm: Path, target: str | None) -> Screenshot:
    """Decode QEMU's PPM, encode the PNG, and save it to ``target`` if given (one thread hop)."""
    shot = Screenshot.from_image(_load(ppm), target)
    if target is not None:
        shot.save(target)
    return shot


class Screen:
    """What a person sees and types on one machine, through its QMP session."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        out_dir: Path,
        before_action: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._lifecycle = lifecycle
        self._out_dir = out_dir
        self._before_action = before_action
        self.log = lifecycle.log
        self.name = lifecycle.name

    # -- screenshots ---------------------------------------------------------------------------

    async def _before(self) -> None:
        if self._before_action is not None:
            await self._before_action()

    async def _dump(self, convert: Callable[[Path], T]) -> T:
        """QMP ``screendump`` to a PPM in the state dir, then ``convert(ppm)`` in a thread."""
        ppm = self._lifecycle.state_dir / f"screendump-{secrets.token_hex(6)}.ppm"
        # Shielded: if the caller is cancelled meanwhile, QEMU still writes the file, which is
        # then removed when the command completes.
        dump = asyncio.ensure_future(
            self._lifecycle.qmp_execute("screendump", {"filename": str(ppm)})
        )
        try:
            await asyncio.shield(dump)
        except asyncio.CancelledError:
            dump.add_done_callback(lambda f: _discard(f, ppm))
            raise
        except QMPAPIError as e:
            _unlink(ppm)
            raise MachineError(
                f"{self.name}: QEMU could not take a screenshot: {e.description} "
                "(does the machine have a display device?)"
            ) from e
        except BaseException:
            _unlink(ppm)
            raise
        try:
            return await asyncio.to_thread(convert, ppm)
        finally:
            _unlink(ppm)

    async def image(self) -> Image.Image:
        """A fresh screenshot as a Pillow image (for OCR: no PNG encoding); runs no
        ``before_action``."""
        return await self._dump(_load)

    async def _action_image(self) -> Image.Image:
        await self._before()
        return await self._dump(_load)

    async def screenshot(self, filename: str | None = None) -> Screenshot:
        await self._before()
        if filename is None:
            return await self._dump(lambda ppm: _convert(ppm, None))
        path = screenshot_path(filename, self._out_dir)
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise MachineError(
                f"{self.name}: cannot save screenshot {path}: the directory {directory} does "
                "not exist (create it, or pass a name without '/' to use the output directory)"
            )
        with nested(self.log, f"making screenshot {path}", {"image": os.path.basename(path)}):
            return await self._dump(lambda ppm: _convert(ppm, path))

    # -- keys ----------------------------------------------------------------------------------

    async def _press(self, keys: list[dict[str, object]], delay: float | None) -> None:
        await self._before()
        await self._lifecycle.qmp_execute("send-key", {"keys": keys, "hold-time": KEY_HOLD_MS})
        if delay:
            await asyncio.sleep(delay)

    async def send_key(self, key: str, delay: Duration | None, log: bool | None) -> None:
        wait = seconds(delay)
        keys = key_to_qmp(key)
        if not log:
            await self._press(keys, wait)
            return
        with nested(self.log, f"sending key {CHAR_TO_KEY.get(key, key)!r}"):
            await self._press(keys, wait)

    async def send_chars(self, chars: str, delay: Duration | None) -> None:
        wait = seconds(delay)
        sequence = []
        for i, char in enumerate(chars):
            try:
                sequence.append(key_to_qmp(char))
            except ValueError as e:
                raise ValueError(
                    f"send_chars(): cannot type {char!r} (position {i} of {chars!r}), "
                    f"nothing was sent: {e}"
                ) from None
        with nested(self.log, f"sending keys {chars!r}"):
            for keys in sequence:
                await self._press(keys, wait)

    # -- OCR -----------------------------------------------------------------------------------

    async def text(self) -> str:
        return await ocr.ocr(await self._action_image())

    async def text_variants(self) -> list[str]:
        return await ocr.ocr_variants(await self._action_image())

    async def _ocr_attempt(
        self, pattern: re.Pattern[str], delays: tuple[float, ...], seen: set[bytes]
    ) -> bool:
        async with ocr.iter_ocr(self._action_image, True, delays, seen) as texts:
            async for text in texts:
                if pattern.search(text):
                    return True
        return False

    async def wait_for_text(self, regex: str, timeout: Duration) -> None:
        limit = seconds(timeout)
        assert limit is not None
        pattern = re.compile(regex)
        with nested(self.log, f"waiting for {regex} to appear on screen"):
            start = time.monotonic()
            seen: set[bytes] = set()  # images read already, over all attempts
            while (remaining := limit - (time.monotonic() - start)) > 0:
                delays = tuple(d for d in OCR_RESCREEN if d < remaining)
                deadline = asyncio.timeout(remaining)
                attempt_start = time.monotonic()
                try:
                    async with deadline:
                        if await self._ocr_attempt(pattern, delays, seen):
                            return
                        # At most one attempt a second (nixpkgs' retry cadence).
                        await asyncio.sleep(max(0.0, attempt_start + 1.0 - time.monotonic()))
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    break
            texts = [await self.text()]
            if any(pattern.search(text) for text in texts):
                return
            self.log.info("Last OCR attempt failed. Text was: %s", texts)
            raise timed_out(start, limit)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _discard(done: asyncio.Future[Any], path: Path) -> None:
    """Done-callback of an abandoned screendump: remove its file, swallow its outcome."""
    if not done.cancelled():
        done.exception()
    _unlink(path)
