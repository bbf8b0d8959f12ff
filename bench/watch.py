"""``%watch`` benchmark on the tiny guest, one run.

Run by hand (not a test): ``.venv/bin/python bench/watch.py [--guests DIR] [-n 300]``.
Prints what one watch costs (a screenshot taken and compared, a changed frame's PNG and its
size), the frames sent per second while the screen changes and while it is idle, and the median
of ``succeed("true")`` with and without a watch running (A/B alternating blocks, the watch at
its default interval and at 50 ms), as a ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from nixos_repl import Registry
from nixos_repl.guests import build_tiny
from nixos_repl.interactive.watch import DEFAULT_INTERVAL_MS, Frame, Watch
from nixos_repl.machine import Machine


def medians(vm: Machine, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        vm.succeed("true")
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def start(vm: Machine, interval_ms: int, sent: list[Frame]) -> Watch:
    watch = Watch(vm, interval_ms / 1000, publish=sent.append)
    watch.frame()
    watch.start()
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=300, help="succeed('true') calls per block")
    args = parser.parse_args()
    os.environ.setdefault("NIXOS_REPL_ACCEL", "tcg")
    logging.basicConfig(level=logging.WARNING)
    (script,) = build_tiny(["vm1"], args.guests)
    out = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    with Registry.from_start_scripts([script], out_dir=out) as registry:
        vm = registry["vm1"]
        vm.succeed("echo 0 > /sys/class/graphics/fbcon/cursor_blink; clear")
        for _ in range(50):
            vm.succeed("true")  # warm up

        # The cost of one screenshot taken and compared, and of a changed frame.
        probe = Watch(vm, 1.0, publish=lambda _: None)
        first = probe.frame()
        assert first is not None and first.png is not None
        n = 40
        t = time.perf_counter()
        for _ in range(n):
            probe.frame()
        compare_ms = (time.perf_counter() - t) * 1000 / n
        sizes, encode = [], []
        for i in range(10):
            vm.succeed(f"echo frame-{i} > /dev/tty1")
            t = time.perf_counter()
            frame = probe.frame()
            if frame is not None and frame.png is not None:
                encode.append((time.perf_counter() - t) * 1000)
                sizes.append(len(frame.png))
        print(f"screen {probe.machine_size()[0]}x{probe.machine_size()[1]}")
        print(f"screenshot taken and compared (idle)   {compare_ms:7.2f} ms")
        print(
            f"changed frame (screenshot + PNG)       {statistics.median(encode):7.2f} ms, "
            f"PNG {statistics.median(sizes) / 1024:.1f} KiB "
            f"(base64 in the message: {statistics.median(sizes) * 4 / 3 / 1024:.1f} KiB)"
        )

        # Frames per second: idle, then while typing.
        for interval in (DEFAULT_INTERVAL_MS, 50):
            sent: list[Frame] = []
            watch = start(vm, interval, sent)
            time.sleep(3)
            idle = len(sent) / 3
            stop = threading.Event()

            def typist(stop: threading.Event = stop) -> None:
                i = 0
                while not stop.is_set():
                    vm.send_chars(f"{i % 10}", delay=None)
                    i += 1
                    time.sleep(0.02)

            typing = threading.Thread(target=typist)
            before = len(sent)
            typing.start()
            time.sleep(3)
            stop.set()
            typing.join()
            changing = (len(sent) - before) / 3
            watch.stop()
            vm.send_key("ctrl-u")
            print(
                f"interval {interval:3d} ms: {idle:.1f} frames/s idle, {changing:.1f} frames/s "
                f"while typing ({watch.grabs} screenshots, "
                f"{watch.grab_time * 1000 / max(watch.grabs, 1):.1f} ms each)"
            )

        # Command latency with and without a watch (A/B alternating blocks).
        for interval in (DEFAULT_INTERVAL_MS, 50):
            without, with_watch = [], []
            for _ in range(3):
                without.append(medians(vm, args.n))
                watch = start(vm, interval, [])
                with_watch.append(medians(vm, args.n))
                watch.stop()
            a, b = statistics.median(without), statistics.median(with_watch)
            print(
                f'succeed("true") median: {a:.2f} ms without, {b:.2f} ms with a watch every '
                f"{interval} ms ({b / a:.2f}x)"
            )
        # The same while the screen changes (typing during both arms).
        stop = threading.Event()

        def typist2() -> None:
            while not stop.is_set():
                vm.send_chars("x", delay=None)
                time.sleep(0.05)

        typing = threading.Thread(target=typist2)
        typing.start()
        without, with_watch = [], []
        for _ in range(3):
            without.append(medians(vm, args.n))
            watch = start(vm, DEFAULT_INTERVAL_MS, [])
            with_watch.append(medians(vm, args.n))
            watch.stop()
        stop.set()
        typing.join()
        a, b = statistics.median(without), statistics.median(with_watch)
        print(
            f'succeed("true") median while typing: {a:.2f} ms without, {b:.2f} ms with a '
            f"changing screen watched every {DEFAULT_INTERVAL_MS} ms ({b / a:.2f}x)"
        )


if __name__ == "__main__":
    main()
