"""Helpers shared by the benchmarks: repeat a call and report median, min and max; nixpkgs'
framing over our backdoor socket, for the A/B comparisons."""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Callable

from nixos_repl import Machine
from nixos_repl.loop import run_sync
from nixos_repl.machine.shell import ShellChannel

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


async def roundtrip_raw(shell: ShellChannel, line: bytes) -> bytes:
    """Send raw bytes to the backdoor shell and return the next line it prints."""
    await shell.send_raw(line)
    _, reply = await shell.backdoor.read_marker(b"")
    return reply


def nixpkgs_succeed(vm: Machine, timeout: int | None = None) -> Callable[[str], tuple[int, bytes]]:
    """``succeed`` as nixpkgs frames it, over the same backdoor socket; with ``timeout``, as
    nixpkgs frames ``execute`` and each try of a wait (``timeout N bash -c ...``)."""
    shell = vm.shell
    assert shell is not None
    prefix = f"timeout {timeout} " if timeout is not None else ""

    def run(command: str) -> tuple[int, bytes]:
        inner = shlex.quote(f"set -euo pipefail; {command}")
        line = f"{prefix}bash -c {inner} | (base64 -w 0; echo)\n"
        out = run_sync(roundtrip_raw(shell, line.encode()))
        status = run_sync(roundtrip_raw(shell, b"echo ${PIPESTATUS[0]}\n"))
        return int(status), out

    return run
