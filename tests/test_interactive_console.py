"""``nixos-repl console --existing`` through tmux, on a kernel a notebook would own (started
with jupyter_client): it sees the notebook's variables and machines, Ctrl-C interrupts a guest
command, leaving keeps the kernel, and bad connection files are one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from .helpers import BIN, Kernel, Tmux, kernel_env, machines_config, text_of

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class NotebookKernel(Kernel):
    """A kernel started the way a notebook server starts it, with a known connection file."""

    def __init__(self, env: dict[str, str], runtime: Path) -> None:
        self.km = KernelManager(
            kernel_name="nixos-repl", connection_file=str(runtime / "kernel-nb.json")
        )
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)


@pytest.fixture
def notebook(jupyter_path: Path, guest_dir: Path, tmp_path: Path) -> Iterator[tuple[Kernel, Path]]:
    runtime = tmp_path / "jupyter-runtime"
    runtime.mkdir()
    xdg = tmp_path / "rt"
    xdg.mkdir()
    k = NotebookKernel(kernel_env(xdg, machines_config(guest_dir, tmp_path, ("vm1",))), runtime)
    try:
        yield k, runtime
    finally:
        k.shutdown()


def console_env(tmp_path: Path, runtime: Path) -> dict[str, str]:
    import os

    return {
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "TERM": "screen",
        "HOME": str(tmp_path),  # console history of its own
        "PATH": os.environ["PATH"],
    }


def test_console_sees_the_notebook_kernel(notebook: tuple[Kernel, Path], tmp_path: Path) -> None:
    k, runtime = notebook
    reply, outputs = k.run("from_the_notebook = 6 * 7\n%succeed vm1 echo booted")
    assert reply["status"] == "ok", text_of(outputs)
    connection = runtime / "kernel-nb.json"
    assert connection.is_file()

    tmux = Tmux(
        tmp_path / "tmux.sock",
        f"{BIN / 'nixos-repl'} console --existing {connection}",
        tmp_path,
        console_env(tmp_path, runtime),
    )
    try:
        tmux.wait_for(r"In \[\d+\]:", timeout=30)
        tmux.type("print('seen:', from_the_notebook)")
        tmux.wait_for(r"seen: 42")
        # The same machines: a magic on the notebook's vm1, and its state.
        tmux.type("%succeed vm1 echo from-console-$((1+1))")
        tmux.wait_for(r"from-console-2")
        # What the console defines, the notebook sees.
        tmux.type("from_the_console = 'hello'")
        time.sleep(0.5)
        reply, outputs = k.run("print(from_the_console)")
        assert "hello" in text_of(outputs)

        # Ctrl-C stops a guest command started from the console.
        tmux.type("%succeed vm1 sleep 100")
        time.sleep(1.5)
        started = time.monotonic()
        tmux.send("C-c")
        tmux.wait_for(r"KeyboardInterrupt", timeout=10)
        assert time.monotonic() - started < 5
        tmux.wait_for(r"In \[\d+\]:\s*$", timeout=10)
        tmux.type("%succeed vm1 pgrep -x sleep || echo no-sleep")
        tmux.wait_for(r"\bno-sleep")

        # Leaving (even with `exit`) detaches: the kernel and its machine go on.
        tmux.type("exit")
        tmux.wait_for(r"EXIT=0", timeout=15)
    finally:
        tmux.close()
    reply, outputs = k.run("%succeed vm1 echo still-$((3*3))")
    assert reply["status"] == "ok" and "still-9" in text_of(outputs)

    # Without a file: the newest kernel of the runtime directory.
    tmux = Tmux(
        tmp_path / "tmux2.sock",
        f"{BIN / 'nixos-repl'} console --existing",
        tmp_path,
        console_env(tmp_path, runtime),
    )
    try:
        tmux.wait_for(r"In \[\d+\]:", timeout=30)
        tmux.type("print('again:', from_the_notebook + 1)")
        tmux.wait_for(r"again: 43")
        tmux.send("C-d")
        tmux.wait_for(r"EXIT=0", timeout=15)
    finally:
        tmux.close()
    assert k.run("print(1)")[0]["status"] == "ok"


def run_console(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "nixos-repl"), "console", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_console_bad_input(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    env = console_env(tmp_path, runtime)

    result = run_console("--existing", str(tmp_path / "missing.json"), env=env)
    assert result.returncode == 1
    assert "no connection file" in result.stderr and "missing.json" in result.stderr

    result = run_console("--existing", env=env)
    assert result.returncode == 1
    assert f"no running kernel found in {runtime}" in result.stderr

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    result = run_console("--existing", str(corrupt), env=env)
    assert result.returncode == 1
    assert "is not a kernel connection file" in result.stderr

    # A kernel that is gone: its file remains, nothing answers.
    stale = tmp_path / "kernel-gone.json"
    stale.write_text(
        json.dumps(
            {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5,
             "ip": "127.0.0.1", "key": "k", "transport": "tcp", "signature_scheme": "hmac-sha256",
             "kernel_name": "nixos-repl"}
        )
    )  # fmt: skip
    started = time.monotonic()
    result = run_console("--existing", str(stale), env=env)
    assert result.returncode == 1
    assert "does not answer" in result.stderr and "still running" in result.stderr
    assert "nothing listens on its shell port 1" in result.stderr
    assert time.monotonic() - started < 30

    result = run_console(env=env)
    assert result.returncode == 2 and "--existing" in result.stderr
