"""Shell channel benchmark: our framing against nixpkgs' framing on the same guest, one run.

Run by hand (not a test): ``.venv/bin/python bench/shell.py [--guests DIR] [-n 200]``.
Prints medians per command, the floor (a bare echo round trip), 10 MB throughput and ratios, and
how far past their timeout a blocking wait and a timed-out command end.
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
        nixpkgs = nixpkgs_succeed(vm)

        assert nixpkgs("echo hi") == (0, b"aGkK")
        ours = timed(lambda: vm.succeed("true"), args.n)
        theirs = timed(lambda: nixpkgs("true"), args.n)
        with_timeout = nixpkgs_succeed(vm, timeout=900)
        theirs_timeout = timed(lambda: with_timeout("true"), args.n)
        floor = timed(lambda: run_sync(roundtrip_raw(shell, b"echo\n")), args.n)

        big = "head -c 10000000 /dev/zero | tr '\\0' a"
        t = time.perf_counter()
        out = vm.succeed(big)
        ours_mb = len(out) / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        _, encoded = nixpkgs(big)
        theirs_mb = len(encoded) * 3 / 4 / (time.perf_counter() - t) / 1e6
        # 1 MB of command text: over the out port (ours) and over hvc0, as nixpkgs sends it.
        text = ": '" + "x" * 1_000_000 + "'"
        t = time.perf_counter()
        vm.succeed(text)
        ours_cmd = time.perf_counter() - t
        t = time.perf_counter()
        nixpkgs(text)
        theirs_cmd = time.perf_counter() - t
        fast_framing.BIG_COMMAND, big_command = 10**9, fast_framing.BIG_COMMAND
        t = time.perf_counter()
        vm.succeed(text)  # the same framing, but the text on hvc0
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
    print(row("succeed('true'), ours", ours))
    print(row("succeed('true'), nixpkgs", theirs))
    print(row("execute('true'), nixpkgs (timeout 900)", theirs_timeout))
    print(row("floor (bare echo)", floor))
    print(f"10 MB read, ours           {ours_mb:6.2f} MB/s")
    print(f"10 MB read, nixpkgs        {theirs_mb:6.2f} MB/s")
    print(f"1 MB command, ours          {ours_cmd:6.2f} s")
    print(f"1 MB command, nixpkgs       {theirs_cmd:6.2f} s ({theirs_cmd / ours_cmd:.1f}x)")
    print(f"1 MB command, hvc0 line     {line_cmd:6.2f} s ({line_cmd / ours_cmd:.1f}x)")
    print(f"copy_from_host_via_shell of 3 MB: {copy_3mb:.2f} s")
    for label, seconds in overrun.items():
        print(f"past its timeout: {label:42s} {seconds:5.2f} s")
    print(f"ratio nixpkgs/ours per command: {theirs[0] / ours[0]:.2f}x")
    print(f"cost of nixpkgs' guest-side timeout: {theirs_timeout[0] - theirs[0]:.2f} ms")
    print(f"ratio ours/floor per command:   {ours[0] / floor[0]:.2f}x")
    print(f"ratio ours/nixpkgs throughput:  {ours_mb / theirs_mb:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
