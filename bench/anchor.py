"""nixos-repl against nixpkgs' own driver on the same tiny guest, alternating in one run.

Run by hand (not a test)::

    .venv/bin/python bench/anchor.py --nixpkgs-driver DIR [--guests DIR] [-n 200]

``DIR`` is nixpkgs' ``nixos/lib/test-driver/src/test_driver`` (a checkout of nixpkgs, or
``$(nix-build '<nixpkgs>' -A nixosTests.login.driver)/...`` sources); ``NIXOS_REPL_NIXPKGS_DRIVER``
works too. Nothing of it is committed here. Its Python dependencies for ``Machine`` (colorama,
junit-xml, and typing_extensions for ``warnings.deprecated`` on Python < 3.13) go into a venv the
benchmark creates from PyPI (``--venv``, default ``.venv/nixpkgs-driver-venv``); its screenshots
need ``pnmtopng`` (Debian: netpbm).

Two copies of the tiny guest run side by side, one driven by nixos-repl's ``Machine`` in this
process, one by nixpkgs' ``QemuMachine`` in a worker process (``anchor_tasks.py``); every task
runs the same function on both, alternating in batches (the side that goes first alternates
too), so load from other processes hits both alike. Tasks: ``succeed("true")``, 10 MB of
output, a 1 MB command, a ``wait_until_succeeds`` on a condition that becomes true after 2 s plus
a random phase in [0, 1) s (the same phases for both, against nixpkgs' one try a second), and a
screenshot saved as PNG. Each task checks the guest did the work. Prints medians and the ratio
nixpkgs / nixos-repl, with the date, the machine and the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from anchor_tasks import TASKS, short_error

from nixos_repl import Registry
from nixos_repl.guests import build_tiny

HOW_TO_GET = (
    "nixpkgs' driver: pass --nixpkgs-driver DIR or set NIXOS_REPL_NIXPKGS_DRIVER to nixpkgs' "
    "nixos/lib/test-driver/src/test_driver (e.g. from `git clone --depth 1 "
    "https://github.com/NixOS/nixpkgs`)"
)
VENV_PACKAGES = ("colorama", "junit-xml", "typing_extensions")


class Worker:
    """nixpkgs' driver in its own process (its ``test_driver`` would shadow ours here)."""

    def __init__(self, python: Path, driver: Path, script: Path, out: Path, log: IO[str]) -> None:
        tasks = Path(__file__).with_name("anchor_tasks.py")
        self.proc = subprocess.Popen(
            [str(python), str(tasks), str(driver), str(script), str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # its QEMU goes with its process group
        )
        try:
            self.boot = float(self._read()["boot"])
        except BaseException:
            self.kill()
            raise

    def _read(self) -> dict[str, float | str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"nixpkgs' driver exited ({self.proc.wait()}); see its log")
        reply: dict[str, float | str] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"nixpkgs' driver: {reply['error']}")
        return reply

    def run(self, task: str, *args: object) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"task": task, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write('{"task": "quit"}\n')
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """The worker and what it started (its QEMU): they share its process group."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {', '.join(VENV_PACKAGES)} from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES]
        subprocess.run(pip, check=True)
    return python


def machine_type() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return f"{os.cpu_count()} cores, {cpu}; {platform.platform()}; {qemu}; TCG"


Side = Callable[..., float]


def alternate(
    sides: dict[str, Side], task: str, args: list[tuple[object, ...]], batch: int
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Run ``task`` once per ``args`` entry on each side, in batches, alternating who goes first.

    Returns the durations of the runs that did the work, and the errors of those that did not.
    """
    samples: dict[str, list[float]] = {name: [] for name in sides}
    errors: dict[str, list[str]] = {name: [] for name in sides}
    order = list(sides)
    for start in range(0, len(args), batch):
        for name in order:
            for a in args[start : start + batch]:
                try:
                    samples[name].append(sides[name](task, *a))
                except Exception as e:
                    errors[name].append(short_error(e))
        order.reverse()
    return samples, errors


def report(label: str, samples: dict[str, list[float]], errors: dict[str, list[str]]) -> None:
    cells = []
    for name in ("nixos-repl", "nixpkgs"):
        done = samples[name]
        cell = f"{name} {statistics.median(done) * 1000:9.2f} ms" if done else f"{name} {'-':>12s}"
        cells.append(cell)
    ours, theirs = samples["nixos-repl"], samples["nixpkgs"]
    ratio = (
        f"ratio {statistics.median(theirs) / statistics.median(ours):6.2f}x"
        if ours and theirs
        else "no ratio"
    )
    count = len(ours) + len(errors["nixos-repl"])
    print(f"{label:34s} {'   '.join(cells)}   {ratio}   (medians of {count})", flush=True)
    for name, failed in errors.items():
        if failed:
            print(f"{'':34s} {name} FAILED {len(failed)}/{count}: {failed[0]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nixpkgs-driver", type=Path, default=None)
    parser.add_argument("--venv", type=Path, default=Path(".venv/nixpkgs-driver-venv"))
    parser.add_argument("--guests", type=Path, default=Path(".venv/guests/anchor"))
    parser.add_argument("-n", type=int, default=200, help="succeed('true') calls per side")
    parser.add_argument("--big", type=int, default=4, help="10 MB reads and 1 MB commands")
    parser.add_argument("--waits", type=int, default=8)
    parser.add_argument("--shots", type=int, default=20)
    args = parser.parse_args()
    os.environ["NIXOS_REPL_ACCEL"] = "tcg"
    logging.basicConfig(level=logging.WARNING)
    driver_dir = args.nixpkgs_driver or os.environ.get("NIXOS_REPL_NIXPKGS_DRIVER")
    if driver_dir is None or not (Path(driver_dir) / "machine").is_dir():
        sys.exit(f"{HOW_TO_GET}; nothing compared.")
    python = ensure_venv(args.venv)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine_type()}")
    print(f"load average at start: {os.getloadavg()}", flush=True)

    scripts = {s.name: s for s in build_tiny(["vm1", "nix1"], args.guests)}
    ours_script, theirs_script = scripts["run-vm1-vm"], scripts["run-nix1-vm"]
    out = args.guests.resolve() / "out"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="anchor-")  # state of our side
    log_path = out / "nixpkgs-driver.log"
    with open(log_path, "w") as log, Registry.from_start_scripts([ours_script]) as registry:
        worker = Worker(python, Path(driver_dir).resolve(), theirs_script.resolve(), out, log)
        try:
            vm = registry["vm1"]
            t = time.perf_counter()
            vm.connect()
            boot = time.perf_counter() - t
            sides: dict[str, Callable[..., float]] = {
                "nixos-repl": lambda task, *a: TASKS[task](vm, *a),
                "nixpkgs": worker.run,
            }
            rng = random.Random(1)
            plan: list[tuple[str, str, list[tuple[object, ...]], int]] = [
                ("exit_status", "execute('echo out; exit 3')", [()], 1),
                ("succeed_true", "succeed('true')", [()] * args.n, 10),
                ("read_10mb", "10 MB of output", [()] * args.big, 1),
                ("long_command", "1 MB command", [(1_000_000,)] * args.big, 1),
                ("long_command", "100 kB command", [(100_000,)] * args.big, 1),
                (
                    "wait_2s",
                    "wait_until_succeeds after true",
                    [(2 + rng.random(),) for _ in range(args.waits)],
                    1,
                ),
                (
                    "screenshot",
                    "screenshot to PNG",
                    [(str(out / f"shot-{i % 2}.png"),) for i in range(args.shots)],
                    5,
                ),
            ]
            print(f"boot to backdoor: nixos-repl {boot:.2f} s, nixpkgs {worker.boot:.2f} s")
            for task, label, task_args, batch in plan:
                samples, errors = alternate(sides, task, task_args, batch)
                if task == "exit_status":  # a check, not a figure
                    failed = {name: e for name, e in errors.items() if e}
                    print(f"{label} == (3, 'out\\n'): {failed or 'both'}", flush=True)
                    continue
                report(label, samples, errors)
                if task == "read_10mb" and all(samples.values()):
                    mbs = [10 / statistics.median(samples[k]) for k in ("nixos-repl", "nixpkgs")]
                    print(f"{'':34s} = {mbs[0]:.2f} MB/s against {mbs[1]:.2f} MB/s", flush=True)
        finally:
            worker.close()
    print(f"load average at end: {os.getloadavg()}; nixpkgs' driver log: {log_path}")
    print("not compared: boot under load (each booted alone), OCR, keys, Debian/systemd waits")


if __name__ == "__main__":
    main()
