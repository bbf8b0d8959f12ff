"""Shell channel benchmark: nixos-repl's command channel against its own floor, one run.

Run by hand (not a test): ``.venv/bin/python bench/shell.py [--guests DIR] [-n 200]``.
Prints medians per command, the floor (a bare echo round trip), 10 MB throughput, a 1 MB command
over the fast port and as one line on hvc0, a 3 MB ``copy_from_host_via_shell``, what the
guest's ``timeout`` costs a command framed as nixpkgs frames it (``timeout 900 bash -c``), and
how far past their timeout a blocking wait and a timed-out command end. The comparison with
nixpkgs' own driver is ``bench/anchor.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from timing import nixpkgs_succeed, roundtrip_raw, row, timed

from nixos_repl import Registry
from nixos_repl.guests import build_tiny
from nixos_repl.loop import run_sync
from nixos_repl.machine.shell import fast as fast_framing


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
        floor = timed(lambda: run_sync(roundtrip_raw(shell, b"echo\n")), args.n)
        # The guest's `timeout`, as nixpkgs' framing runs it for every command with a timeout.
        plain, with_timeout = nixpkgs_succeed(vm), nixpkgs_succeed(vm, timeout=900)
        assert plain("echo hi") == with_timeout("echo hi") == (0, b"aGkK")
        bare = timed(lambda: plain("true"), args.n)
        timed_out = timed(lambda: with_timeout("true"), args.n)

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
        fast_framing.BIG_COMMAND, big_command = 10**9, fast_framing.BIG_COMMAND
        t = time.perf_counter()
        assert vm.succeed(text) == "1000000\n"  # the same framing, but the text on hvc0
        line_cmd = time.perf_counter() - t
        fast_framing.BIG_COMMAND = big_command
        payload = Path(registry.tmp_dir) / "payload"
        payload.write_bytes(os.urandom(3_000_000))
        t = time.perf_counter()
        vm.copy_from_host_via_shell(str(payload), "/tmp/payload")
        copy_3mb = time.perf_counter() - t
        # How far past their timeout a blocking wait and a timed-out command end.
        overrun = {}
        t = time.perf_counter()
        with contextlib.suppress(AssertionError):
            vm.wait_until_succeeds("sleep 1000", timeout=3)
        overrun["wait_until_succeeds, guest loop"] = time.perf_counter() - t - 3
        vm.callbacks.append(lambda: None)  # polling conditions: the host loops
        t = time.perf_counter()
        with contextlib.suppress(AssertionError):
            vm.wait_until_succeeds("sleep 1000", timeout=3)
        overrun["wait_until_succeeds, host loop"] = time.perf_counter() - t - 3
        vm.callbacks.clear()
        t = time.perf_counter()
        vm.execute("exec sleep 20 > /dev/null", timeout=2)
        vm.succeed("true")
        overrun["execute(exec sleep 20 > /dev/null) + next"] = time.perf_counter() - t - 2
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
    print(f"cost of the guest's timeout (nixpkgs' framing): {timed_out[0] - bare[0]:.2f} ms")
    for label, seconds in overrun.items():
        print(f"past its timeout: {label:42s} {seconds:5.2f} s")
    print(f"ratio succeed/floor per command: {ours[0] / floor[0]:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
