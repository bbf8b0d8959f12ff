"""Rich display for the front ends: screenshots render inline through ``_repr_png_``."""

from __future__ import annotations

from ..machine.screenshot import PNG_SIGNATURE, Screenshot

__all__ = ["PNG_SIGNATURE", "Screenshot"]
