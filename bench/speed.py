"""Speed benchmark without KVM: commands, boot, turbo, waits and many machines, one run.

Run by hand (not a test): ``.venv/bin/python bench/speed.py [--guests DIR] [-n 100] [--no-debian]
[--machines 1,2,4,8]``. Everything runs under TCG. A/B comparisons alternate in batches of 10 and
report medians over all samples, so load from other processes hits both sides alike.

Prints, for the tiny and the debian guest: ``succeed("true")``; boot to backdoor and
``succeed("true")`` with TCG turbo on and off; how long ``wait_until_succeeds`` /
``wait_for_unit`` take to see a condition that becomes true after 2 s; all-up time of 1/2/4/8
tiny machines against the same QEMUs started by hand; the driver's own CPU while 8 machines idle.
The comparison with nixpkgs' own driver is ``bench/anchor.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nixos_repl import Machine, Registry
from nixos_repl.guests import build_debian, build_tiny
from nixos_repl.machine.process import driver_qemu_options
from nixos_repl.machine.turbo import turbo_env

BATCH = 10


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def ab(fns: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Call each function ``n`` times, alternating in batches; returns the samples (seconds)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, n // BATCH)):
        for name, fn in fns.items():
            for _ in range(BATCH):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return samples


def commands(vm: Machine, n: int, label: str) -> None:
    samples = ab({"ours": lambda: vm.succeed("true")}, n)["ours"]
    print(f"[{label}] succeed('true'): {ms(samples):.2f} ms (median of {len(samples)})")


def boot_and_command(script: Path, name: str, turbo: str, n: int) -> tuple[float, float]:
    os.environ["NIXOS_REPL_TURBO"] = turbo
    try:
        with Registry.from_start_scripts([script]) as registry:
            vm = registry[name]
            t = time.perf_counter()
            vm.connect()
            boot = time.perf_counter() - t
            vm.succeed("true")
            cmd = ms(ab({"x": lambda: vm.succeed("true")}, n)["x"])
            return boot, cmd
    finally:
        os.environ.pop("NIXOS_REPL_TURBO", None)


def turbo(script: Path, name: str, n: int, label: str, rounds: int) -> None:
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for _ in range(rounds):
        on.append(boot_and_command(script, name, "1", n))
        off.append(boot_and_command(script, name, "0", n))
    for what, runs in (("on ", on), ("off", off)):
        boot = statistics.median(b for b, _ in runs)
        cmd = statistics.median(c for _, c in runs)
        print(
            f"[{label}] turbo {what}: boot to backdoor {boot:.2f} s, succeed('true') {cmd:.2f} ms"
        )


def reaction(vm: Machine, label: str, unit: bool) -> None:
    """Time to see a condition that becomes true 2 s after the wait starts."""

    def arm(command: str) -> float:
        vm.succeed(f"(sleep 2; {command}) >/dev/null 2>&1 &")
        return time.perf_counter()

    rows: list[tuple[str, float]] = []
    for _ in range(2):
        vm.succeed("rm -f /tmp/flag")
        t = arm("touch /tmp/flag")
        vm.wait_until_succeeds("test -e /tmp/flag")
        rows.append(("wait_until_succeeds", time.perf_counter() - t))
        if unit:  # a unit that is activating for 2 s (ExecStartPre), then active
            start = (
                "systemd-run --no-block --unit=nr-bench --service-type=exec "
                "-p ExecStartPre='/bin/sleep 2' /bin/sleep 600"
            )
            vm.succeed(start)
            t = time.perf_counter()
            vm.wait_for_unit("nr-bench.service")
            rows.append(("wait_for_unit", time.perf_counter() - t))
            vm.succeed("systemctl stop nr-bench.service")
    for what in dict.fromkeys(r[0] for r in rows):
        seen = statistics.median(r[1] for r in rows if r[0] == what) - 2
        print(f"[{label}] {what}: seen {seen * 1000:.0f} ms after the condition holds")


def raw_all_up(scripts: list[Path]) -> float:
    """Start the QEMUs by hand (the same scripts and options), until every backdoor banner."""
    with tempfile.TemporaryDirectory() as tmp:
        procs: list[subprocess.Popen[bytes]] = []
        socks: list[socket.socket] = []
        shells: list[socket.socket] = []
        t = time.perf_counter()
        try:
            for i, script in enumerate(scripts):
                state = Path(tmp) / str(i)
                state.mkdir()
                for sock_name in ("shell", "monitor", "nixos-repl-out", "nixos-repl-ctl"):
                    listener = socket.socket(socket.AF_UNIX)
                    listener.bind(str(state / sock_name))
                    listener.listen(1)
                    socks.append(listener)
                    if sock_name == "shell":
                        shells.append(listener)
                env = {**os.environ, "TMPDIR": str(state), "USE_TMPDIR": "1"}
                env.update(turbo_env(script.name, str(script), env, logging.getLogger("raw")))
                argv = [str(script.resolve()), *driver_qemu_options(state, False, False)]
                quiet = subprocess.DEVNULL
                procs.append(
                    subprocess.Popen(
                        argv, cwd=state, env=env, stdin=quiet, stdout=quiet, stderr=quiet
                    )
                )
            listeners = list(socks)
            for listener in listeners:  # QEMU connects to all four before it runs the guest
                conn, _ = listener.accept()
                socks.append(conn)
                if listener in shells:
                    shells[shells.index(listener)] = conn
            for conn in shells:
                data = b""
                while b"Spawning backdoor root shell" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise RuntimeError("QEMU closed the shell before the banner")
                    data += chunk
            return time.perf_counter() - t
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            for sock in socks:
                sock.close()


def driver_all_up(scripts: list[Path]) -> tuple[float, float]:
    """All-up time through the driver, and the driver's CPU share while they idle for 10 s."""
    with Registry.from_start_scripts(scripts) as registry:
        t = time.perf_counter()
        registry.start_all()
        for vm in registry.machines:
            vm.connect()
        up = time.perf_counter() - t
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
        time.sleep(10)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        share = (usage.ru_utime + usage.ru_stime - cpu0) / (time.perf_counter() - t0)
        return up, share


def many(guests: Path, counts: list[int]) -> None:
    names = [f"m{i}" for i in range(1, max(counts) + 1)]
    scripts = build_tiny(names, guests / "many")
    for count in counts:
        chosen = scripts[:count]
        raw = raw_all_up(chosen)
        ours, cpu = driver_all_up(chosen)
        extra = (ours / raw - 1) * 100
        print(f"[tiny] {count} machine(s) all up: driver {ours:.2f} s, by hand {raw:.2f} s "
              f"({extra:+.0f} %); driver CPU while idle {cpu * 100:.2f} %")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests"))
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="boots per turbo setting")
    parser.add_argument("--no-debian", action="store_true")
    parser.add_argument("--machines", default="1,2,4,8", help="'' to skip")
    parser.add_argument("--no-tiny", action="store_true")
    args = parser.parse_args()
    os.environ["NIXOS_REPL_ACCEL"] = "tcg"
    logging.basicConfig(level=logging.WARNING)
    print(f"load average at start: {os.getloadavg()}")

    if not args.no_tiny:
        (tiny,) = build_tiny(["vm1"], args.guests)
        with Registry.from_start_scripts([tiny]) as registry:
            vm = registry["vm1"]
            vm.connect()
            commands(vm, args.n, "tiny")
            reaction(vm, "tiny", unit=False)
        turbo(tiny, "vm1", args.n // 2, "tiny", args.rounds)

    if not args.no_debian:
        (deb,) = build_debian(["deb1"], args.guests / "debian")
        with Registry.from_start_scripts([deb]) as registry:
            vm = registry["deb1"]
            vm.connect()
            commands(vm, args.n, "debian")
            reaction(vm, "debian", unit=True)
        turbo(deb, "deb1", args.n // 2, "debian", args.rounds)

    if args.machines:
        many(args.guests, [int(c) for c in args.machines.split(",")])
    print(f"load average at end: {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
