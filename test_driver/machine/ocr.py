"""``test_driver.machine.ocr``: OCR of a screenshot file, on nixos-repl's OCR passes.

The same passes as ``get_screen_text``: tesseract on the raw image and, with ``variants``, on two
preprocessed ones (contrast-stretched and binarised, then the same negated).
"""

import asyncio
from pathlib import Path

from PIL import Image

from nixos_repl.loop import run_sync
from nixos_repl.machine import ocr

__all__ = ["perform_ocr_on_screenshot", "perform_ocr_variants_on_screenshot"]


def perform_ocr_on_screenshot(screenshot_path: Path, timeout: float | None = None) -> str:
    """The text tesseract reads in the image file (raw pass only)."""
    return perform_ocr_variants_on_screenshot(screenshot_path, False, timeout)[0]


def perform_ocr_variants_on_screenshot(
    screenshot_path: Path, variants: bool = True, timeout: float | None = None
) -> list[str]:
    """The texts read in the image file: the raw pass, then (with ``variants``) the two
    preprocessed ones. After ``timeout`` seconds the passes are stopped and each reads ``""``."""
    with Image.open(screenshot_path) as opened:
        image = opened.convert("RGB")

    async def read() -> list[str]:
        passes = ocr.ocr_variants(image) if variants else _raw(image)
        try:
            return await asyncio.wait_for(passes, timeout)
        except TimeoutError:
            return [""] * (3 if variants else 1)

    return run_sync(read())


async def _raw(image: Image.Image) -> list[str]:
    return [await ocr.ocr(image)]
