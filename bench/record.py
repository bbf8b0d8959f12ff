"""Recording benchmark: what the session log costs per action, in time and in bytes. One run.

Run by hand (not a test): ``.venv/bin/python bench/record.py [-n 400]``. Prints:

* the observer path alone, no guest: an action reported to a session log (JSON line written
  and flushed) against the same action with no observer, in microseconds;
* ``vm1.succeed("true")`` on a tiny guest with the session log attached and without,
  alternating A/B, medians, and the difference;
* bytes per action in the log: a ``succeed`` with its cell context, outputs off and on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nixos_repl import Registry
from nixos_repl.guests import build_tiny
from nixos_repl.machine.actions import ActionObserver, observing
from nixos_repl.record import SessionLog


def alternate(a: Callable[[], object], b: Callable[[], object], n: int) -> tuple[float, float]:
    """Medians (seconds) of ``a`` and ``b``, called alternately ``n`` times each."""
    sa, sb = [], []
    for _ in range(n):
        t = time.perf_counter()
        a()
        sa.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        sb.append(time.perf_counter() - t)
    return statistics.median(sa), statistics.median(sb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=400, help="calls per variant")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixos-repl-bench-record-"))

    # -- the observer path alone ------------------------------------------------------------
    log = SessionLog(work / "alone.jsonl")
    log.begin_cell(1, "%succeed vm1 true")
    with_log: list[ActionObserver] = [log.observe]
    without: list[ActionObserver] = []

    def report(observers: list[ActionObserver]) -> Callable[[], None]:
        def call() -> None:
            with observing(observers, "vm1", "succeed", ("true",), {}) as action:
                if action is not None:
                    action.result = ""

        return call

    plain, logged = alternate(report(without), report(with_log), args.n * 10)
    print(f"observer path, no guest ({args.n * 10} calls each, medians):")
    print(f"  no observer        {plain * 1e6:8.1f} us")
    print(f"  session log        {logged * 1e6:8.1f} us   (+{(logged - plain) * 1e6:.1f} us)")
    log.close()

    # -- on a guest ---------------------------------------------------------------------------
    scripts = build_tiny(["vm1"], work / "guests")
    out = work / "out"
    out.mkdir()
    with Registry.from_start_scripts(scripts, out_dir=out) as registry:
        vm1 = registry["vm1"]
        vm1.connect()
        for _ in range(20):
            vm1.succeed("true")
        session = SessionLog(out / "session.jsonl")
        session.begin_cell(7, "%succeed vm1 true")

        def off() -> None:
            registry.observers.clear()
            vm1.succeed("true")

        def on() -> None:
            registry.observers[:] = [session.observe]
            vm1.succeed("true")

        a, b = alternate(off, on, args.n)
        registry.observers.clear()
        print(f'vm1.succeed("true") on a tiny guest ({args.n} calls each, A/B alternating):')
        print(f"  not recorded       {a * 1000:8.3f} ms")
        print(f"  recorded           {b * 1000:8.3f} ms   ({(b - a) * 1e6:+.1f} us, "
              f"{b / a:.3f}x)")  # fmt: skip

        size_before = session.path.stat().st_size
        registry.observers[:] = [session.observe]
        for _ in range(100):
            vm1.succeed("echo hello")
        quiet = (session.path.stat().st_size - size_before) / 100
        session.outputs = True
        size_before = session.path.stat().st_size
        for _ in range(100):
            vm1.succeed("echo hello")
        loud = (session.path.stat().st_size - size_before) / 100
        registry.observers.clear()
        session.close()
        print("bytes per action in the session log (succeed('echo hello')):")
        print(f"  outputs off        {quiet:8.0f} B")
        print(f"  outputs on         {loud:8.0f} B")


if __name__ == "__main__":
    main()
