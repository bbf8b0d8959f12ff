"""Screenshots as values: PNG bytes that render inline in IPython and Jupyter.

Plain Python on purpose: IPython finds :meth:`Screenshot._repr_png_` by duck typing, so this
module works (and imports fast) without IPython.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from ..files import write_atomic

__all__ = ["PNG_SIGNATURE", "Screenshot", "load_ppm"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def load_ppm(data: bytes) -> Image.Image:
    """Decode a binary PPM (P6), what QEMU's ``screendump`` writes; ValueError for anything else."""
    image = Image.open(io.BytesIO(data))
    if image.format != "PPM":
        raise ValueError(f"expected a PPM image, got {image.format or 'unknown data'}")
    image.load()
    return image


def _encode_png(image: Image.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)  # fast; screenshots are mostly flat colour
    return buf.getvalue()


class Screenshot:
    """A screenshot: PNG bytes, the size, and where it was saved, if anywhere.

    The decoded :attr:`image` is made on first use and cached; treat it as read-only (copy it
    before drawing on it), since :attr:`png` is not re-encoded.
    """

    __slots__ = ("_image", "_path", "_png", "_size")

    def __init__(
        self, png: bytes, size: tuple[int, int], path: str | os.PathLike[str] | None = None
    ) -> None:
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"a screenshot needs a positive size, not {width}x{height}")
        self._png = bytes(png)
        self._size = (int(width), int(height))
        self._path = Path(path) if path is not None else None
        self._image: Image.Image | None = None

    @classmethod
    def from_image(
        cls, image: Image.Image, path: str | os.PathLike[str] | None = None
    ) -> Screenshot:
        """Encode ``image`` as PNG (zlib level 1) and keep ``image`` as the decoded form."""
        shot = cls(_encode_png(image), image.size, path)
        shot._image = image
        return shot

    @classmethod
    def from_ppm(cls, data: bytes, path: str | os.PathLike[str] | None = None) -> Screenshot:
        """From a binary PPM (P6), what QEMU's ``screendump`` writes."""
        return cls.from_image(load_ppm(data), path)

    @property
    def png(self) -> bytes:
        return self._png

    @property
    def image(self) -> Image.Image:
        """The decoded image (Pillow), decoded once."""
        if self._image is None:
            image = Image.open(io.BytesIO(self._png))
            image.load()
            self._image = image
        return self._image

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    @property
    def width(self) -> int:
        return self._size[0]

    @property
    def height(self) -> int:
        return self._size[1]

    @property
    def path(self) -> Path | None:
        """Where this screenshot was stored when it was taken, if it was."""
        return self._path

    def _repr_png_(self) -> bytes:
        return self._png

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG to ``path`` atomically and return ``path`` as a :class:`Path`.

        The bytes go to a temporary file in the same directory, which then replaces ``path``:
        a reader (an image viewer watching the file) never sees half a PNG. The file gets the
        usual permissions (0666 minus the umask).
        """
        target = Path(path)
        write_atomic(target, self._png)
        return target

    def __repr__(self) -> str:
        where = f" {self._path}" if self._path is not None else ""
        return f"<Screenshot {self.width}x{self.height}{where}>"
