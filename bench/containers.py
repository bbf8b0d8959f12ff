"""Container benchmark: a systemd-nspawn container of the debian-container guest, one run.

Run by hand as root (not a test): ``.venv/bin/python bench/containers.py [-n 200] [--starts 5]``.
Prints medians of: the guest build when cached, container start to the first command's answer
(the container's systemd booting to READY=1 included), ``succeed("true")`` (one ``nsenter``
with nixpkgs' prelude, which sources /etc/profile), ``shutdown()`` and ``release()``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from nixos_repl.guests import build_debian_container
from nixos_repl.machine import NspawnMachine


def median_ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.1f} ms  (n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
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


if __name__ == "__main__":
    main()
