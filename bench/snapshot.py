"""Snapshot benchmark: save and in-place restore against a cold boot, one run, TCG.

Run by hand (not a test): ``.venv/bin/python bench/snapshot.py [-n 20] [--debian]``.

Prints, for the tiny guest (and the Debian guest with ``--debian``): boot to the first command
(the cold start a restore replaces), ``snapshot()``, ``restore()``, ``restore()`` followed by the
first command (the first command after a restore pays for TCG's emptied translation cache), the
size of one saved state against the RAM the guest uses, and the ratios. Every restore is checked:
a file written after the snapshot must be gone, or the run fails. The restore is timed alone: the
command before it, which may still pay for the guest's reaction to the previous restore (systemd
reading the mount table after the shares came back), is not counted. Beside the restore's wall time,
the CPU time QEMU spent on it (loading, and running the guest's steps after it): on a machine
shared with other QEMUs the wall time stretches with the load, QEMU's CPU time much less.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from timing import timed

from nixos_repl import Machine, Registry
from nixos_repl.guests import build_debian, build_tiny


def median_ms(fn: Callable[[], object], n: int) -> float:
    return timed(fn, n)[0]


def qemu_cpu(vm: Machine) -> float:
    """Seconds of CPU that the machine's QEMU (all its threads) has used so far."""
    total = 0
    for stat in Path(f"/proc/{vm.pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError):
            total += int(stat.read_text().split()[0])
    return total / 1e9


def used_mib(vm: Machine) -> float:
    info = dict(line.split(":", 1) for line in vm.succeed("cat /proc/meminfo").splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemFree"].split()[0])
    return kib / 1024


def measure(script: Path, out: Path, n: int, label: str) -> None:
    with Registry.from_start_scripts([script], out_dir=out) as reg:
        (vm,) = reg.machines
        start = time.perf_counter()
        vm.succeed("true")
        boot = (time.perf_counter() - start) * 1000
        vm.snapshot("bench")
        save = median_ms(lambda: vm.snapshot("bench"), n)

        def rewind() -> tuple[float, float, float]:
            """One rewind of a changed guest: wall and QEMU CPU ms of ``restore()`` alone, and
            wall ms of ``restore()`` and the first command after it."""
            vm.succeed("touch /root/after-snapshot")  # untimed: it may pay for the last rewind
            cpu, start = qemu_cpu(vm), time.perf_counter()
            vm.restore("bench")
            wall, cpu = time.perf_counter() - start, qemu_cpu(vm) - cpu
            if vm.execute("test -e /root/after-snapshot")[0] == 0:
                raise SystemExit(f"[{label}] a restore did not rewind the guest")
            return wall * 1000, cpu * 1000, (time.perf_counter() - start) * 1000

        rewind()
        samples = [rewind() for _ in range(n)]
        restore_only, restore_cpu, restore_first = (
            statistics.median(s[i] for s in samples) for i in range(3)
        )
        command = median_ms(lambda: vm.succeed("true"), n)
        (info,) = [s for s in vm.snapshots() if s.label == "bench"]
        used = used_mib(vm)
        file_mib = vm.lifecycle.snapshots.path.stat().st_size / 2**20

        def fork() -> None:
            vm.crash()
            vm.restore("bench")
            if vm.succeed("echo forked") != "forked\n":
                raise SystemExit(f"[{label}] a fork did not answer")

        fork_first = median_ms(fork, max(3, n // 4))
    print(f"[{label}] boot to first command: {boot:.0f} ms (cold, once)")
    print(f"[{label}] snapshot(): median {save:.0f} ms")
    print(
        f"[{label}] restore(): median {restore_only:.0f} ms (QEMU CPU {restore_cpu:.0f} ms); "
        f"restore() + first command: {restore_first:.0f} ms (a later command: {command:.1f} ms)"
    )
    print(
        f"[{label}] restore is {boot / restore_only:.1f}x faster than booting; "
        f"restore + first command {boot / restore_first:.1f}x"
    )
    print(
        f"[{label}] fork (QEMU started from the saved state) to the first command: "
        f"{fork_first:.0f} ms, {boot / fork_first:.1f}x faster than booting"
    )
    print(
        f"[{label}] one saved state: {info.size / 2**20:.1f} MiB of machine state for "
        f"{used:.1f} MiB of guest RAM in use (the snapshot file: {file_mib:.1f} MiB)"
    )


def batch_twice(script: Path, tmp: Path, label: str) -> None:
    """A one-machine ``--batch`` run twice with a boot cache: the second starts from the first's
    saved boot."""
    test = tmp / f"{label}-test.py"
    test.write_text('machine.succeed("true")\nmachine.succeed("uname -a")\n')
    cache = tmp / f"{label}-cache"
    times = []
    for run in ("first", "second"):
        out = tmp / f"{label}-{run}"
        out.mkdir()
        start = time.perf_counter()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "nixos-repl"), "--batch", str(test),
             "--start-scripts", str(script), "--boot-cache", str(cache), "-o", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"[{label}] --batch failed:\n{result.stderr}")
    print(
        f"[{label}] --batch of a one-machine script with --boot-cache: first run {times[0]:.2f} s, "
        f"second {times[1]:.2f} s ({times[0] / times[1]:.1f}x faster)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="samples per figure (default 20)")
    parser.add_argument("--debian", action="store_true", help="also the Debian guest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        guests = Path(tmp) / "guests"
        build_tiny(["tiny"], guests)
        measure(guests / "run-tiny-vm", Path(tmp), args.n, "tiny")
        batch_twice(guests / "run-tiny-vm", Path(tmp), "tiny")
        if args.debian:
            build_debian(["deb"], guests)
            measure(guests / "run-deb-vm", Path(tmp), args.n, "debian")
            batch_twice(guests / "run-deb-vm", Path(tmp), "debian")
        else:
            print("[debian] not measured (pass --debian; the first build takes ~75 s)")


if __name__ == "__main__":
    main()
