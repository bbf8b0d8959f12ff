"""Shell channel benchmark: nixos-repl's command channel against its own floor, one run.

Run by hand (not a test): ``.venv/bin/python bench/shell.py [--guests DIR] [-n 200]``.
Prints medians per command, the floor (a bare echo round trip), 10 MB throughput, a 1 MB command
over the fast port and as one line on hvc0, and a 3 MB ``copy_from_host_via_shell``. The
comparison with nixpkgs' own driver is ``bench/anchor.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from timing import row, timed

from nixos_repl import Registry
from nixos_repl.guests import build_tiny
from nixos_repl.loop import run_sync
from nixos_repl.machine import shell as shell_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("NIXOS_REPL_ACCEL", "tcg")
    logging.basicConfig(level=logging.WARNING)
    (script,) = build_tiny(["vm1"], args.guests)
    with Registry.from_start_scripts([script]) as registry:
        vm = registry["vm1"]
        t = time.perf_counter()
        vm.connect()
        boot = time.perf_counter() - t
        shell = vm.shell
        assert shell is not None
        ours = timed(lambda: vm.succeed("true"), args.n)
        floor = timed(lambda: run_sync(shell.roundtrip_raw(b"echo\n")), args.n)

        big = "head -c 10000000 /dev/zero | tr '\\0' a"
        t = time.perf_counter()
        out = vm.succeed(big)
        ours_mb = len(out) / (time.perf_counter() - t) / 1e6
        assert len(out) == 10_000_000
        # 1 MB of command text: over the out port, and as one line on hvc0.
        text = "x='" + "x" * 1_000_000 + "'; echo ${#x}"
        t = time.perf_counter()
        assert vm.succeed(text) == "1000000\n"
        ours_cmd = time.perf_counter() - t
        shell_module.BIG_COMMAND, big_command = 10**9, shell_module.BIG_COMMAND
        t = time.perf_counter()
        assert vm.succeed(text) == "1000000\n"  # the same framing, but the text on hvc0
        line_cmd = time.perf_counter() - t
        shell_module.BIG_COMMAND = big_command
        payload = Path(registry.tmp_dir) / "payload"
        payload.write_bytes(os.urandom(3_000_000))
        t = time.perf_counter()
        vm.copy_from_host_via_shell(str(payload), "/tmp/payload")
        copy_3mb = time.perf_counter() - t
        status = Path(f"/proc/{vm.pid}/status").read_text().splitlines()
        rss_mib = int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024

    print(f"framing: {'fast (nixos-repl ports)' if shell.fast else 'compatible'}")
    print(f"boot to connected backdoor: {boot:.2f} s; QEMU RSS {rss_mib:.0f} MiB")
    print(row("succeed('true')", ours))
    print(row("floor (bare echo)", floor))
    print(f"10 MB read                 {ours_mb:6.2f} MB/s")
    print(f"1 MB command, fast port     {ours_cmd:6.2f} s")
    print(f"1 MB command, hvc0 line     {line_cmd:6.2f} s ({line_cmd / ours_cmd:.1f}x)")
    print(f"copy_from_host_via_shell of 3 MB: {copy_3mb:.2f} s")
    print(f"ratio succeed/floor per command: {ours[0] / floor[0]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
