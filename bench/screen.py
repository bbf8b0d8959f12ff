"""Screen and keyboard benchmark on the tiny guest, one run.

Run by hand (not a test): ``.venv/bin/python bench/screen.py [--guests DIR] [-n 20] [-k 50]``.
Prints the median of ``n`` inline screenshots end to end (``screenshot()``: QMP ``screendump``,
PPM decode, PNG encode), the same saved to a file, the median of ``k`` ``send_key`` calls, and the
time of one OCR pass per variant, with the target for inline screenshots.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from timing import row, timed

from nixos_repl import Registry
from nixos_repl.guests import build_tiny
from nixos_repl.loop import run_sync
from nixos_repl.machine import ocr

TARGET_SCREENSHOT_MS = 25.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=20, help="screenshots")
    parser.add_argument("-k", type=int, default=50, help="send_key calls")
    args = parser.parse_args()
    os.environ.setdefault("NIXOS_REPL_ACCEL", "tcg")
    logging.basicConfig(level=logging.WARNING)
    (script,) = build_tiny(["vm1"], args.guests)
    out = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    try:
        with Registry.from_start_scripts([script], out_dir=out) as registry:
            vm = registry["vm1"]
            vm.succeed("true")  # boot and connect
            vm.send_chars("echo keys-ok hello 42\n")
            vm.wait_until_tty_matches("1", "\nkeys-ok hello 42", timeout=30)
            size = vm.screenshot().size

            inline = timed(vm.screenshot, args.n)
            saved = timed(lambda: vm.screenshot("bench"), args.n)
            keys = timed(lambda: vm.send_key("shift", log=False), args.k)
            keys_nodelay = timed(lambda: vm.send_key("shift", delay=None, log=False), args.k)
            t = time.perf_counter()
            vm.send_chars("# the quick brown fox\n")
            chars = (time.perf_counter() - t) * 1000 / len("# the quick brown fox\n")

            image = vm.screenshot().image
            passes = {}
            if shutil.which("tesseract") is not None:
                run_sync(ocr.ocr(image))  # probe the engine mode once
                for variant in ocr.VARIANTS:
                    t = time.perf_counter()
                    text = run_sync(ocr.ocr(image, variant))
                    passes[variant] = (time.perf_counter() - t, "keys-ok" in text)
                t = time.perf_counter()
                run_sync(ocr.ocr_variants(image))
                all_variants = time.perf_counter() - t
                t = time.perf_counter()
                vm.wait_for_text("keys-ok", timeout=60)
                wait_for_text = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)

    print(f"guest screen: {size[0]}x{size[1]}, cpus: {len(os.sched_getaffinity(0))}")
    print(row("screenshot() inline (QMP->PNG)", inline))
    print(row("screenshot('bench') saved", saved))
    print(row("send_key (10 ms delay)", keys))
    print(row("send_key (delay=None)", keys_nodelay))
    print(f"{'send_chars, per character':34s} {chars:7.2f} ms")
    verdict = "meets" if inline[0] <= TARGET_SCREENSHOT_MS else "MISSES"
    print(f"inline screenshot target {TARGET_SCREENSHOT_MS:.0f} ms: {verdict} ({inline[0]:.2f} ms)")
    if passes:
        for variant, (secs, found) in passes.items():
            print(f"OCR pass {variant:9s} {secs:6.2f} s  (reads keys-ok: {found})")
        print(f"OCR all variants (in parallel) {all_variants:6.2f} s")
        print(f"wait_for_text('keys-ok')       {wait_for_text:6.2f} s")
    else:
        print("OCR: tesseract not installed, skipped")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
