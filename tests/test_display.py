"""Screenshot values: PNG encoding, PPM input, atomic saves, inline rendering (no VM)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from nixos_repl.interactive.display import PNG_SIGNATURE, Screenshot


def sample(size: tuple[int, int] = (320, 200)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle((10, 10, 100, 50), fill=(170, 170, 170))
    return image


def test_from_image_round_trip() -> None:
    image = sample()
    shot = Screenshot.from_image(image)
    assert shot.png.startswith(PNG_SIGNATURE)
    decoded = Image.open(io.BytesIO(shot.png))
    assert decoded.size == (320, 200)
    assert decoded.convert("RGB").tobytes() == image.tobytes()
    assert (shot.size, shot.width, shot.height) == ((320, 200), 320, 200)
    assert shot.path is None


def test_image_is_decoded_lazily_and_cached() -> None:
    original = Screenshot.from_image(sample())
    shot = Screenshot(original.png, original.size)
    image = shot.image
    assert image is shot.image
    assert image.size == (320, 200)
    assert image.convert("RGB").tobytes() == sample().tobytes()


def test_from_ppm() -> None:
    buf = io.BytesIO()
    sample((64, 48)).save(buf, "PPM")
    data = buf.getvalue()
    assert data.startswith(b"P6")
    shot = Screenshot.from_ppm(data, path=Path("/tmp/x.png"))
    assert shot.size == (64, 48)
    assert shot.image.tobytes() == sample((64, 48)).tobytes()
    assert Image.open(io.BytesIO(shot.png)).size == (64, 48)
    assert shot.path == Path("/tmp/x.png")


def test_from_ppm_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="PPM"):
        Screenshot.from_ppm(Screenshot.from_image(sample()).png)


def test_repr_png() -> None:
    shot = Screenshot.from_image(sample())
    png = shot._repr_png_()
    assert isinstance(png, bytes)
    assert png.startswith(PNG_SIGNATURE)


def test_repr() -> None:
    shot = Screenshot.from_image(sample((1280, 800)), path=Path("/out/x.png"))
    assert repr(shot) == "<Screenshot 1280x800 /out/x.png>"
    assert repr(Screenshot.from_image(sample())) == "<Screenshot 320x200>"


def test_save_is_atomic_and_returns_the_path(tmp_path: Path) -> None:
    shot = Screenshot.from_image(sample())
    target = tmp_path / "shot.png"
    target.write_bytes(b"old contents")
    replaced_inode = target.stat().st_ino
    old_umask = os.umask(0o022)
    try:
        result = shot.save(target)
    finally:
        os.umask(old_umask)
    assert result == target
    assert target.read_bytes() == shot.png
    assert target.stat().st_ino != replaced_inode  # replaced, not rewritten in place
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shot.png"]  # no temporary left behind
    assert shot.save(str(tmp_path / "again.png")) == tmp_path / "again.png"


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    shot = Screenshot.from_image(sample())
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OSError):
        shot.save(tmp_path / "dir.png")  # cannot replace a directory with a file
    assert [p.name for p in tmp_path.iterdir()] == ["dir.png"]


def test_modes_png_cannot_store_are_converted() -> None:
    shot = Screenshot.from_image(Image.new("CMYK", (8, 8)))
    assert Image.open(io.BytesIO(shot.png)).mode == "RGB"
