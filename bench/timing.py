"""Helpers shared by the benchmarks: repeat a call and report median, min and max."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

Figures = tuple[float, float, float]


def timed(fn: Callable[[], object], n: int) -> Figures:
    """Call ``fn`` ``n`` times; returns (median, min, max) in milliseconds."""
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000, min(samples) * 1000, max(samples) * 1000


def row(label: str, figures: Figures, width: int = 34) -> str:
    median, low, high = figures
    return f"{label:{width}s} median {median:7.2f} ms  (min {low:.2f}, max {high:.2f})"
