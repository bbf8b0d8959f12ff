"""The work both drivers do in ``bench/anchor.py``, and the worker that runs nixpkgs' driver.

Standard library only: the same task functions time nixos-repl's ``Machine`` in the benchmark's
process and nixpkgs' ``QemuMachine`` in a worker process (``python anchor_tasks.py DRIVER_DIR
START_SCRIPT OUT_DIR``, run with the venv that has nixpkgs' dependencies). Each task returns its
duration in seconds and checks that the machine really did the work (output bytes, status,
a PNG on disk): a task that did not raises.

The worker reads one JSON request a line on stdin (``{"task": NAME, "args": [...]}``) and
answers one JSON line on stdout (``{"seconds": S}`` or ``{"error": MESSAGE}``); its driver's log
goes to stderr.
"""

from __future__ import annotations

import json
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEN_MB = 10_000_000
FLAG = "/tmp/anchor-flag"


class WorkNotDone(RuntimeError):
    """The driver returned, but the guest did not do what the task asked."""


def succeed_true(vm: Any) -> float:
    t = time.perf_counter()
    out = vm.succeed("true")
    seconds = time.perf_counter() - t
    if out != "":
        raise WorkNotDone(f"succeed('true') returned {out!r}")
    return seconds


def read_10mb(vm: Any) -> float:
    t = time.perf_counter()
    out = vm.succeed(f"head -c {TEN_MB} /dev/zero | tr '\\0' a")
    seconds = time.perf_counter() - t
    if len(out) != TEN_MB or out.strip("a"):
        raise WorkNotDone(f"10 MB read returned {len(out)} characters")
    return seconds


def long_command(vm: Any, size: int) -> float:
    """A command of ``size`` bytes that prints how much of its text the guest shell saw."""
    command = f"x='{'x' * size}'; echo ${{#x}}"
    t = time.perf_counter()
    status, out = vm.execute(command)
    seconds = time.perf_counter() - t
    if (status, out) != (0, f"{size}\n"):
        raise WorkNotDone(f"exit status {status}, output {out[:40]!r}")
    return seconds


def wait_2s(vm: Any, delay: float) -> float:
    """How long after a condition holds ``wait_until_succeeds`` sees it; true ``delay`` s in."""
    vm.succeed(f"rm -f {FLAG}; (sleep {delay:.3f}; touch {FLAG}) >/dev/null 2>&1 &")
    t = time.perf_counter()
    vm.wait_until_succeeds(f"test -e {FLAG}")
    seconds = time.perf_counter() - t - delay
    status, _ = vm.execute(f"test -e {FLAG}")
    if status != 0:
        raise WorkNotDone("wait_until_succeeds returned before the flag existed")
    return seconds


def screenshot(vm: Any, path: str) -> float:
    Path(path).unlink(missing_ok=True)
    t = time.perf_counter()
    vm.screenshot(path)
    seconds = time.perf_counter() - t
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise WorkNotDone(f"{path} is not a PNG ({len(data)} bytes)")
    return seconds


def exit_status(vm: Any) -> float:
    """Not timed for the report: a status other than 0 must come back as it is."""
    t = time.perf_counter()
    status, out = vm.execute("echo out; exit 3")
    if (status, out) != (3, "out\n"):
        raise WorkNotDone(f"execute('echo out; exit 3') returned {(status, out)!r}")
    return time.perf_counter() - t


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 200 else f"{text[:120]} ... {text[-60:]}"


TASKS: dict[str, Callable[..., float]] = {
    "succeed_true": succeed_true,
    "read_10mb": read_10mb,
    "long_command": long_command,
    "wait_2s": wait_2s,
    "screenshot": screenshot,
    "exit_status": exit_status,
}


def load_nixpkgs_machine(driver_dir: Path) -> tuple[Any, Any]:
    """nixpkgs' ``QemuMachine`` and ``TerminalLogger`` from a ``test_driver`` source directory.

    The package's ``__init__`` (the command line: ptpython, remote-pdb, ...) is not run: the
    benchmark needs the machine module and what it imports (colorama, junit-xml).
    """
    if not hasattr(warnings, "deprecated"):  # Python < 3.13; nixpkgs pins a newer Python
        import typing_extensions

        warnings.deprecated = typing_extensions.deprecated  # type: ignore[attr-defined]
    package = types.ModuleType("test_driver")
    package.__path__ = [str(driver_dir)]
    sys.modules["test_driver"] = package
    machine = __import__("test_driver.machine", fromlist=["QemuMachine"])
    logger = __import__("test_driver.logger", fromlist=["TerminalLogger"])
    return machine.QemuMachine, logger.TerminalLogger


def worker(driver_dir: Path, start_script: Path, out_dir: Path) -> None:
    qemu_machine, terminal_logger = load_nixpkgs_machine(driver_dir)
    tmp_dir = out_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    vm = qemu_machine(out_dir, tmp_dir, str(start_script), terminal_logger())
    try:
        t = time.perf_counter()
        vm.connect()
        print(json.dumps({"boot": time.perf_counter() - t}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            if request["task"] == "quit":
                break
            try:
                reply: dict[str, object] = {"seconds": TASKS[request["task"]](vm, *request["args"])}
            except Exception as e:  # reported to the benchmark
                reply = {"error": short_error(e)}
            print(json.dumps(reply), flush=True)
    finally:
        # nixpkgs' release() signals the `sh -c` it started QEMU with; on a host whose /bin/sh
        # does not exec its last command (dash), QEMU would outlive it: quit QEMU first.
        vm.crash()
        vm.release()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
