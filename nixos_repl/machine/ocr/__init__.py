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
* At most ``max(1, cpus // 2)`` tesseract processes run at once; raw passes go before
  preprocessed ones, so a fresh screenshot is read before the variants of an old one.
* The preprocessed images are passed with ``--dpi 300``, the density ImageMagick records in the
  PNGs nixpkgs feeds tesseract; the raw screenshot, like nixpkgs', carries none.
* Cancelling any of the coroutines, or leaving an :func:`iter_ocr` block early, kills the
  tesseract processes it started, and returns once they are reaped.
* :func:`iter_ocr` yields texts as the passes finish, takes fresh screenshots 1, 2 and 4 s in
  (like nixpkgs' streamed OCR still in review), and skips an image it has read already;
  merged nixpkgs reads every variant of one screenshot per try, a try a second.

The package is split by concern: :mod:`.preprocess` (Pillow, the ImageMagick steps),
:mod:`.tesseract` (the binary, its processes and the passes, each under an
:class:`asyncio.TaskGroup`), :mod:`.stream` (the streaming reader behind :func:`iter_ocr`).
All of it runs on the one I/O loop (:mod:`nixos_repl.loop`).
"""

from __future__ import annotations

from .preprocess import VARIANTS, Variant, preprocess
from .stream import iter_ocr
from .tesseract import max_processes, ocr, ocr_variants

__all__ = [
    "VARIANTS",
    "Variant",
    "iter_ocr",
    "max_processes",
    "ocr",
    "ocr_variants",
    "preprocess",
]
