"""Screen, keyboard and QEMU-side controls of a machine (QMP and HMP backends).

``ScreenMixin`` is one of the parts ``Machine`` is composed from.
"""

from __future__ import annotations


class ScreenMixin:
    """What a person sees and types: screenshots, keys, OCR, TTYs, port forwards, links."""
