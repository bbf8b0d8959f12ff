"""The terminal REPL driven through tmux, as a person uses it: start, magics, Ctrl-C during a
long command, a screenshot, ``%shell`` with Ctrl-C in the guest and Ctrl-] back, attaching the
same shell from another terminal, completion, and leaving with no QEMU left. Also the
non-terminal paths: the demo's scripted tour and ``nixos-test-driver --interactive``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import BIN, Tmux, qemus_under

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


@pytest.fixture
def tmux(tmp_path: Path, guest_dir: Path, repl_env: dict[str, str]) -> Iterator[Tmux]:
    out = tmp_path / "out"
    out.mkdir()
    scripts = f"{guest_dir / 'run-vm1-vm'} {guest_dir / 'run-vm2-vm'}"
    command = f"{BIN / 'nixos-repl'} --start-scripts {scripts} --vlans 1 -o {out}"
    session = Tmux(tmp_path / "tmux.sock", command, tmp_path, repl_env)
    try:
        yield session
    finally:
        session.close()


def test_the_terminal_repl(tmux: Tmux, tmp_path: Path, repl_env: dict[str, str]) -> None:
    runtime = Path(repl_env["XDG_RUNTIME_DIR"])
    tmux.wait_for(r"In \[1\]:", timeout=30)
    assert "Machines: vm1, vm2" in tmux.screen()

    # A magic boots both machines; the next one runs a command.
    tmux.type("%start --all")
    tmux.wait_for(r"In \[2\]:", timeout=120)
    tmux.type("%succeed vm1 echo hello-$((6*7))")
    tmux.wait_for(r"Out\[2\]: hello-42")

    # Ctrl-C during a long command: back at the prompt at once, and the next command works.
    tmux.type("%succeed vm1 sleep 100")
    tmux.wait_for(r"vm1: must succeed: sleep 100 \(\d")  # the live status line
    start = time.monotonic()
    tmux.send("C-c")
    tmux.wait_for(r"KeyboardInterrupt[^\n]*\n(.*\n)*In \[4\]:", timeout=10)
    assert time.monotonic() - start < 2.5
    tmux.type("%succeed vm1 echo after-ctrl-c; pgrep -x sleep || echo no-sleep")
    tmux.wait_for(r"Out\[4\]:\s+after-ctrl-c\s+no-sleep")

    # A screenshot: drawn in the terminal (half-cells here), its PNG saved and named.
    tmux.type("%screenshot vm1")
    screen = tmux.wait_for(r"<Screenshot 1280x800 (\S+\.png)>")
    path = Path(re.findall(r"<Screenshot 1280x800 (\S+\.png)>", screen)[-1])
    assert path.parent == tmp_path / "out" and path.is_file()
    assert "▀" in screen or "▄" in screen

    # %shell: a real tty (job control, Ctrl-C to the guest's job), Ctrl-] back to the REPL.
    tmux.type("%shell vm1")
    tmux.wait_for(r"root shell on /dev/hvc\d+; Ctrl-\] returns\]\s*\n.*# ")
    tmux.type("echo in-guest-$((2+3)); tty")
    tmux.wait_for(r"in-guest-5\s*\n/dev/hvc1")
    tmux.type("sleep 30")
    time.sleep(0.5)
    tmux.send("C-c")
    tmux.type("echo after-guest-ctrl-c")
    tmux.wait_for(r"\nafter-guest-ctrl-c", timeout=5)
    tmux.send("C-]")
    tmux.wait_for(r"detached; vm1's shell keeps running\]\s*\n(.*\n)*In \[\d+\]:", timeout=10)
    tmux.type("%succeed vm1 echo back-in-the-repl")
    tmux.wait_for(r"Out\[\d+\]: back-in-the-repl")

    # The same guest shell from another terminal, through the socket alone.
    state_dir = runtime / "vm-state-vm1"
    tmux.window("other", f"{BIN / 'nixos-repl'} shell vm1 --state-dir {state_dir}; sleep 600")
    tmux.wait_for(r"attached to the guest tty", target="other")
    tmux.send("Enter", target="other")
    tmux.type("echo from-$((1+1))-terminals", target="other")
    tmux.wait_for(r"\nfrom-2-terminals", target="other")
    tmux.send("C-]", target="other")
    tmux.wait_for(r"\[detached\]", target="other")

    # Tab completes machine names.
    tmux.send("-l", "%console v")
    tmux.send("Tab")
    tmux.wait_for(r"vm1\s+vm2|vm1[^\n]*\n[^\n]*vm2", timeout=10)
    tmux.send("C-c")

    # Leaving stops the machines and says so; no QEMU is left.
    tmux.wait_for(r"\nIn \[\d+\]: *\n", timeout=10)
    assert qemus_under(runtime)
    tmux.send("C-d")
    tmux.wait_for(r"stopped vm1, vm2: no machine left running\s*\nEXIT=0", timeout=30)
    assert qemus_under(runtime) == []
    assert (tmp_path / ".nixos-test-history").exists()


@pytest.mark.vm
def test_demo_tour_without_a_terminal(tmp_path: Path, repl_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(BIN / "nixos-repl"), "--demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **repl_env},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "running the scripted tour" in out
    assert re.search(r"Out\[\d+\]:\s+a cell runs as one script on vm2", out)
    assert "<Screenshot 1280x800" in out and (tmp_path / "demo-out" / "tour-vm1.png").is_file()
    assert "['vm1\\n', 'vm2\\n']" in out  # the async twins on two machines at once
    assert "stopped vm1: no machine left running" in out
    assert qemus_under(Path(repl_env["XDG_RUNTIME_DIR"])) == []


def test_nixos_test_driver_interactive_opens_the_repl(
    tmp_path: Path, guest_dir: Path, repl_env: dict[str, str]
) -> None:
    cells = "%succeed vm1 echo via-the-driver\n\nprint(type(vm1).__name__)\n"
    result = subprocess.run(
        [str(BIN / "nixos-test-driver"), "--interactive",
         "--start-scripts", str(guest_dir / "run-vm1-vm")],
        input=cells,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **repl_env},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Out[1]: via-the-driver" in result.stdout
    assert "QemuMachine" in result.stdout or "Machine" in result.stdout
    assert "leaving: stopping vm1" in result.stdout
    assert qemus_under(Path(repl_env["XDG_RUNTIME_DIR"])) == []
