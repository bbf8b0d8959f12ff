"""Container benchmark: a systemd-nspawn container of the debian-container guest, one run.

Run by hand as root (not a test): ``.venv/bin/python bench/containers.py [-n 200] [--starts 5]
[--many 8]``. Prints medians of: the guest build when cached, container start to the first
command's answer (the container's systemd booting to READY=1 included), ``succeed("true")`` (one
``nsenter`` with nixpkgs' prelude, which sources /etc/profile), ``shutdown()`` and ``release()``.
Then ``--many`` containers up at once: all started together (``start_all()``), the time until
every one has answered, each one's memory (the proportional set size of the processes in its
PID namespace, systemd-nspawn not counted) and ``succeed("true")`` on each in turn while all run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from nixos_repl.guests import build_debian_container
from nixos_repl.loop import run_sync
from nixos_repl.machine import NspawnMachine
from nixos_repl.registry import Registry


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.1f} ms  (n={len(samples)})"


def pss_kib(leader: int) -> int:
    """The proportional set size (KiB) of every process in ``leader``'s PID namespace."""
    namespace = os.readlink(f"/proc/{leader}/ns/pid")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != namespace:
                continue
            rollup = (entry / "smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(
            int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")
        )
    return total


def many(scripts: list[Path], n: int) -> None:
    """``len(scripts)`` containers up at once, in one registry."""
    tmp = Path(tempfile.mkdtemp(prefix="nixos-repl-bench-"))
    try:
        with Registry(
            containers=[(p.name[4:-7], p) for p in scripts], tmp_dir=tmp, out_dir=tmp
        ) as reg:
            containers = reg.machines_nspawn

            async def all_answer() -> None:
                await asyncio.gather(*(c.aio.succeed("true") for c in containers))

            t = time.perf_counter()
            reg.start_all()
            started = time.perf_counter() - t
            run_sync(all_answer())
            answered = time.perf_counter() - t
            memory = [pss_kib(c.lifecycle.leader or 0) / 1024 for c in containers]
            trues = []
            for _ in range(n):
                for c in containers:
                    t = time.perf_counter()
                    c.succeed("true")
                    trues.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    count = len(scripts)
    print(f"{count} containers: start_all()    {started * 1000:8.1f} ms")
    print(f"{count} containers: all answered   {answered * 1000:8.1f} ms")
    print(
        f"{count} containers: memory each    {statistics.median(memory):8.1f} MiB"
        f"  (min {min(memory):.1f}, max {max(memory):.1f}, total {sum(memory):.0f} MiB)"
    )
    print(f'{count} containers: succeed("true") {median_ms(trues)}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--many", type=int, default=8, help="containers up at once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    builds = []
    for _ in range(3):
        t = time.perf_counter()
        (script,) = build_debian_container(["ct1"], args.guests)
        builds.append(time.perf_counter() - t)
    tmp = Path(tempfile.mkdtemp(prefix="nixos-repl-bench-"))
    starts, trues, shutdowns, releases = [], [], [], []
    try:
        for i in range(args.starts):
            ct = NspawnMachine(str(script), tmp_dir=tmp, out_dir=tmp)
            t = time.perf_counter()
            ct.succeed("true")
            starts.append(time.perf_counter() - t)
            if i == 0:
                for _ in range(args.n):
                    t = time.perf_counter()
                    ct.succeed("true")
                    trues.append(time.perf_counter() - t)
            t = time.perf_counter()
            if i % 2:
                ct.release()
                releases.append(time.perf_counter() - t)
            else:
                ct.shutdown()
                shutdowns.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"guest build (cached)          {median_ms(builds)}")
    print(f"start to first command        {median_ms(starts)}")
    print(f'succeed("true")               {median_ms(trues)}')
    print(f"shutdown() (poweroff)         {median_ms(shutdowns)}")
    print(f"release() (SIGTERM)           {median_ms(releases)}")
    ratio = statistics.median(starts) / statistics.median(trues)
    print(f"start : succeed(true)         {ratio:8.1f}x")
    if args.many:
        names = [f"ct{i}" for i in range(1, args.many + 1)]
        many(build_debian_container(names, args.guests), max(1, args.n // args.many))


if __name__ == "__main__":
    main()
