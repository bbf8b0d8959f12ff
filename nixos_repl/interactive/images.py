"""Images in the terminal, through textual-image (a maintained library, no escape codes here).

The terminal is asked what it speaks the first time an image is drawn: Sixel (xterm, foot,
WezTerm, iTerm2, Konsole, VS Code...), the Kitty graphics protocol (kitty), else coloured
half-cells, a preview that works in any terminal with colours. ``NIXOS_REPL_IMAGES`` forces
one: ``sixel``, ``kitty``, ``halfcell``, ``unicode`` or ``none``.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from typing import IO, Any

__all__ = ["IMAGES_ENV", "render_png", "renderer_name"]

IMAGES_ENV = "NIXOS_REPL_IMAGES"
# At most this many terminal columns wide (a screenshot is 4:3 or 16:10).
MAX_COLUMNS = 100


def _renderer() -> Any:
    forced = os.environ.get(IMAGES_ENV, "").lower()
    if forced in ("", "auto"):
        from textual_image.renderable import Image

        return Image
    from textual_image import renderable

    return {
        "sixel": renderable.SixelImage,
        "kitty": renderable.TGPImage,
        "halfcell": renderable.HalfcellImage,
        "unicode": renderable.UnicodeImage,
    }.get(forced)


def renderer_name() -> str:
    """Which way images are drawn here: ``SixelImage``, ``TGPImage``, ``HalfcellImage``..."""
    if os.environ.get(IMAGES_ENV, "").lower() == "none":
        return "none"
    cls = _renderer()
    return f"{cls.__module__.rsplit('.', 1)[-1]}" if cls is not None else "none"


def _fit_height(png: bytes, rows: int) -> int:
    """The widest image (in columns) that fits ``rows`` rows (a cell is about twice as high as
    wide)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    return max(int(rows * 2 * width / max(height, 1)), 10)


def render_png(png: bytes, stream: IO[str] | None = None, columns: int | None = None) -> bool:
    """Draw ``png`` on the terminal; False when images are turned off, the output is not a
    terminal, or nothing can draw."""
    out = stream if stream is not None else sys.__stdout__ or sys.stdout
    if os.environ.get(IMAGES_ENV, "").lower() == "none" or not out.isatty():
        return False
    image_class = _renderer()
    if image_class is None:
        return False
    from rich.console import Console

    size = shutil.get_terminal_size((80, 24))
    width = columns or min(size.columns - 1, MAX_COLUMNS, _fit_height(png, size.lines - 4))
    console = Console(file=out, force_terminal=True, width=width + 1)
    console.print(image_class(io.BytesIO(png), width=width))
    out.flush()
    return True
