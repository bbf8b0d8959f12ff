"""Helpers shared by the test modules: processes, interrupts, rendered screens, batch runs,
Jupyter kernels, tmux, JupyterLab in headless chromium. Fixtures here are imported by the
modules that use them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel
from PIL import Image, ImageDraw, ImageFont

from nixos_repl.files import cache_dir

__all__ = [
    "BIN",
    "CHROMEDRIVER",
    "CHROMIUM",
    "SUITE_GUESTS",
    "TOKEN",
    "BatchRun",
    "Kernel",
    "Tmux",
    "children_named",
    "console",
    "free_port",
    "install_kernelspec",
    "interrupt_after",
    "keep_guests",
    "kernel_env",
    "leftovers",
    "machines_config",
    "no_live_tesseract",
    "processes_mentioning",
    "qemu_alive",
    "qemus_under",
    "replay",
    "run_batch",
    "tesseract_children",
    "text_of",
    "wait_for_no_qemu",
    "wait_until",
    "write_notebook",
]


# The guests' start scripts, kept between runs: the boot cache's key names a start script by path.
SUITE_GUESTS = cache_dir() / "test-suite" / "guests"


def keep_guests(built: Path) -> Path:
    """The start scripts built in ``built``, at a path named after their contents (the same in
    every run that builds the same guests, another one when a guest changes)."""
    files = sorted(p for p in built.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    target = SUITE_GUESTS / digest.hexdigest()[:16]
    if not target.is_dir():
        SUITE_GUESTS.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=SUITE_GUESTS))
        for file in files:
            shutil.copy2(file, tmp / file.name)
        try:
            tmp.rename(target)
        except OSError:  # another run put the same scripts there first
            shutil.rmtree(tmp)
    return target


def qemu_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def interrupt_after(delay: float) -> threading.Timer:
    """Deliver a real SIGINT to the main thread after ``delay`` seconds, as Ctrl-C does."""
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


FONT_PATHS = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationMono-Regular.ttf",
]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_PATHS:
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size + 16)


def console(*lines: str, size: int = 32) -> Image.Image:
    """Light grey text on black, 1280x800, like a Linux virtual console."""
    image = Image.new("RGB", (1280, 800), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((24, 24 + row * size * 5 // 4), line, fill=(170, 170, 170), font=font(size))
    return image


def children_named(name: str) -> list[tuple[int, str]]:
    """(pid, state) of this process's children called ``name``, zombies included."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1 : data.rindex(")")]
        state, ppid = data[data.rindex(")") + 2 :].split()[:2]
        if comm == name and int(ppid) == me:
            found.append((int(entry), state))
    return found


def start_processes(path: Path) -> list[int]:
    """Pids of the processes a machine's start left (its launcher or reaper) whose command line
    names ``path`` (its state directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"nixos-repl-start" in args and any(str(path).encode() in arg for arg in args):
            found.append(int(entry))
    return found


def tesseract_children() -> list[tuple[int, str]]:
    """(pid, state) of this process's tesseract children, zombies included."""
    return children_named("tesseract")


async def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def no_live_tesseract() -> bool:
    return all(state == "Z" for _, state in tesseract_children())


BIN = Path(sys.executable).parent


@dataclass
class BatchRun:
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path

    def junit(self) -> dict[str, str | None]:
        """Case name -> failure message (None when the case passed)."""
        root = ET.parse(self.out_dir / "junit.xml").getroot()
        suite = root.find("testsuite")
        assert suite is not None and suite.get("name") == "NixOS integration test"
        cases = {}
        for case in suite.iter("testcase"):
            failure = case.find("failure")
            cases[str(case.get("name"))] = None if failure is None else failure.get("message")
        return cases

    def bang_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("!!! ")]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live (not zombie) processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            found.append(cmdline)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def container_leftovers(tmp: Path, leaders: Sequence[int] = ()) -> list[str]:
    """What a run in ``tmp`` may have left: processes naming it (systemd-nspawn, journalctl,
    QEMU), container leaders, mounts under it."""
    found = processes_mentioning(str(tmp))
    found += [f"container leader {pid}" for pid in leaders if _alive(pid)]
    mounts = Path("/proc/mounts").read_text()
    found += [line for line in mounts.splitlines() if str(tmp) in line]
    return found


def wait_for_no_container_leftovers(
    tmp: Path, leaders: Sequence[int] = (), timeout: float = 10
) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := container_leftovers(tmp, leaders)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def container_guests(factory: pytest.TempPathFactory, *names: str) -> Path:
    """A directory with a ``run-<name>-nspawn`` script per name (debian-container guests; the
    root file system is built once and cached)."""
    from nixos_repl.guests import build_debian_container

    out = factory.mktemp("containers")
    build_debian_container(list(names), out)
    return out


# Tests of systemd-nspawn containers: real ones, as root, with systemd-nspawn installed.
NEEDS_CONTAINERS = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(
        shutil.which("systemd-nspawn") is None,
        reason="systemd-nspawn is missing (Debian: apt-get install systemd-container)",
    ),
]


def leftovers(tmp: Path) -> list[str]:
    """QEMU and vde_switch processes of this run (found by its private directory), from /proc."""
    return [
        cmdline
        for cmdline in processes_mentioning(str(tmp))
        if "qemu-system" in cmdline or "vde_switch" in cmdline
    ]


def run_batch(
    command: Sequence[str],
    out_dir: Path,
    runtime_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> BatchRun:
    environ = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), **(env or {})}
    proc = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        env=environ,
        cwd=out_dir,
        timeout=timeout,
    )
    return BatchRun(proc.returncode, proc.stdout, proc.stderr, out_dir)


def install_kernelspec(prefix: Path) -> Path:
    """``nixos-repl kernel install --prefix``; returns the JUPYTER_PATH entry that has it."""
    subprocess.run(
        [str(BIN / "nixos-repl"), "kernel", "install", "--prefix", str(prefix)],
        check=True,
        capture_output=True,
    )
    path = prefix / "share" / "jupyter"
    spec = json.loads((path / "kernels" / "nixos-repl" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    assert (path / "kernels" / "nixos-repl" / "logo-64x64.png").is_file()
    return path


def machines_config(
    guest_dir: Path,
    directory: Path,
    names: tuple[str, ...],
    containers: Sequence[Path] = (),
) -> Path:
    """A driverConfiguration.json: the tiny guests ``names``, and the containers whose
    ``run-<name>-nspawn`` scripts are ``containers``."""
    config = {
        "vms": {n: {"name": n, "start_script": str(guest_dir / f"run-{n}-vm")} for n in names},
        "containers": {
            s.name[len("run-") : -len("-nspawn")]: {"start_script": str(s)} for s in containers
        },
        "vlans": [1],
        "global_timeout": 3600,
        "enable_ssh_backdoor": False,
        "test_script": "interactive",
    }
    path = directory / "driverConfiguration.json"
    path.write_text(json.dumps(config))
    return path


def kernel_env(runtime: Path, config: Path | None) -> dict[str, str]:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "NIXOS_REPL_ACCEL": "tcg"}
    env.pop("NIXOS_REPL_CONFIG", None)
    if config is not None:
        env["NIXOS_REPL_CONFIG"] = str(config)
    return env


def qemus_under(path: Path) -> list[str]:
    result = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if str(path) in line]


def wait_for_no_qemu(path: Path, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := qemus_under(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class Kernel:
    """A running nixos-repl kernel and a client, with helpers to run code."""

    def __init__(self, env: dict[str, str], cwd: Path | None = None) -> None:
        # The output directory (session logs, screenshots) is the kernel's working directory.
        cwd = cwd or Path(tempfile.mkdtemp(prefix="nixos-repl-kernel-"))
        self.cwd = cwd
        self.km, self.kc = start_new_kernel(kernel_name="nixos-repl", env=env, cwd=str(cwd))

    def run(self, code: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        outputs: list[dict[str, Any]] = []

        def hook(msg: dict[str, Any]) -> None:
            kinds = ("stream", "error", "execute_result", "display_data", "update_display_data")
            if msg["msg_type"] in kinds:
                outputs.append({"type": msg["msg_type"], **msg["content"]})

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], outputs

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def text_of(outputs: list[dict[str, Any]]) -> str:
    parts = []
    for o in outputs:
        if o["type"] == "stream":
            parts.append(o["text"])
        elif o["type"] == "error":
            parts.append("\n".join(o["traceback"]))
        else:
            parts.append(o["data"].get("text/plain", ""))
    return "\n".join(parts)


class Tmux:
    """One tmux server with one window running ``command``."""

    def __init__(self, socket: Path, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.socket = socket
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        shell = f"cd {shlex.quote(str(cwd))} && env {exports} {command}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-x", "120", "-y", "50", "-s", "main", shell)

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, check=True
        )
        return result.stdout

    def window(self, name: str, command: str) -> None:
        self.tmux("new-window", "-d", "-n", name, command)

    def send(self, *keys: str, target: str = "main") -> None:
        self.tmux("send-keys", "-t", target, *keys)

    def type(self, text: str, target: str = "main") -> None:
        self.tmux("send-keys", "-t", target, "-l", text)
        self.send("Enter", target=target)

    def screen(self, target: str = "main") -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-300", "-t", target)

    def wait_for(self, pattern: str, timeout: float = 60, target: str = "main") -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(target)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen after {timeout} s:\n{text}")
            time.sleep(0.05)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True)


CHROMIUM = shutil.which("chromium")


CHROMEDRIVER = shutil.which("chromedriver")


BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)


TOKEN = "nixos-repl-browser-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_notebook(path: Path, *sources: str) -> None:
    cells: list[dict[str, Any]] = [
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": source}
        for source in sources
    ]  # fmt: skip
    path.write_text(
        json.dumps(
            {
                "cells": cells,
                "metadata": {
                    "kernelspec": {
                        "name": "nixos-repl",
                        "display_name": "nixos-repl",
                        "language": "python",
                    },
                    "language_info": {"name": "python"},
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )


def replay(script: Path, guest_dir: Path, tmp_path: Path, names: tuple[str, ...]) -> str:
    """``nixos-repl --batch script`` on the tiny guests; returns stderr, asserts exit 0."""
    out, runtime = tmp_path / "replay-out", tmp_path / "replay-rt"
    out.mkdir(exist_ok=True)
    runtime.mkdir(exist_ok=True)
    command = [
        str(BIN / "nixos-repl"), "--batch", str(script), "--vlans", "1",
        "--start-scripts", *(str(guest_dir / f"run-{n}-vm") for n in names),
    ]  # fmt: skip
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "NIXOS_REPL_ACCEL": "tcg"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out, timeout=300)
    assert proc.returncode == 0, f"{script.read_text()}\n{proc.stderr[-3000:]}"
    assert leftovers(runtime) == []
    return proc.stderr
