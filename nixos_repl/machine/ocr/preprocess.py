"""Pillow preprocessing: nixpkgs' ImageMagick command, and the images handed to tesseract.

nixpkgs converts the screenshot with ``magick convert -filter Catrom -density 72 -resample 300
-contrast -normalize -despeckle -type grayscale -sharpen 1 -posterize 3 [-negate] -gamma 100
-blur 1x65535``. The same steps are done here with Pillow: the part shared by the positive and the
negative variant (:func:`enhance`) once per screenshot, the thresholding (:func:`binarize`) per
variant. Images reach tesseract as uncompressed PNM (:func:`pnm`).
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal

from PIL import Image, ImageFilter

__all__ = [
    "DENSITY",
    "SCALE",
    "VARIANTS",
    "Prepared",
    "Spawn",
    "Variant",
    "binarize",
    "enhance",
    "pnm",
    "preprocess",
]

DENSITY: Final = 300  # dpi ImageMagick records in the preprocessed PNGs nixpkgs feeds tesseract
SCALE: Final = DENSITY / 72  # ImageMagick ``-density 72 -resample 300``

Variant = Literal["raw", "positive", "negative"]
"""Which image a pass reads: the screenshot as is, or preprocessed, with or without negating."""
VARIANTS: Final[tuple[Variant, ...]] = ("raw", "positive", "negative")


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


def enhance(image: Image.Image) -> Image.Image:
    """The part of the preprocessing shared by the positive and the negative variant.

    Grayscale, contrast, normalize, upscale by :data:`SCALE` (bicubic), despeckle (median) and
    sharpen; the result is a large grayscale image.
    """
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


def binarize(enhanced: Image.Image, negate: bool) -> Image.Image:
    """Posterize an image from :func:`enhance`, optionally negate it, keep only black as black."""
    # ``-blur 1x65535``: radius 1 with a huge sigma is a 3x3 box blur.
    return enhanced.point(_THRESHOLD[negate]).filter(ImageFilter.BoxBlur(1))


def preprocess(image: Image.Image, negate: bool) -> Image.Image:
    """Pillow version of nixpkgs' ImageMagick preprocessing; returns a grayscale image.

    Upscale by 300/72 (bicubic), contrast, normalize, despeckle (median), sharpen, posterize to
    three levels, optionally negate, then a gamma that keeps only black as black and a slight
    blur. Dark text on a light background survives the positive variant, light text on a dark
    background the negative one.
    """
    return binarize(enhance(image), negate)


def pnm(image: Image.Image) -> bytes:
    """``image`` as binary PGM or PPM: no compression to spend time on, and leptonica reads it."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PPM")  # P5 for "L", P6 for "RGB"
    return buf.getvalue()


Spawn = Callable[[Coroutine[Any, Any, Image.Image]], asyncio.Future[Image.Image]]
"""How :class:`Prepared` starts its background work: a TaskGroup's ``create_task``, typically."""


class Prepared:
    """One screenshot and its copy from :func:`enhance`, computed at most once, off the loop.

    The passes over the variants of one screenshot share it: the enhancing, started early
    (:meth:`start_enhancing`) as a task that ``spawn`` creates and owns, overlaps with the raw
    pass. Pillow runs in threads, so the loop stays free meanwhile.
    """

    def __init__(self, image: Image.Image, spawn: Spawn) -> None:
        self.image = image
        self._spawn = spawn
        self._enhanced: asyncio.Future[Image.Image] | None = None

    def start_enhancing(self) -> asyncio.Future[Image.Image]:
        """Start the shared preprocessing in a thread, once; the future of its result."""
        if self._enhanced is None:
            self._enhanced = self._spawn(asyncio.to_thread(enhance, self.image))
        return self._enhanced

    async def pnm(self, variant: Variant) -> bytes:
        """The PNM bytes of ``variant``, encoded in a thread."""
        if variant == "raw":
            return await asyncio.to_thread(pnm, self.image)
        # Shielded: the other variant may still need it when this pass is cancelled.
        enhanced = await asyncio.shield(self.start_enhancing())
        return await asyncio.to_thread(lambda: pnm(binarize(enhanced, variant == "negative")))
