"""systemd-nspawn containers in the front ends, for real: the magics through a Jupyter kernel,
``%machines`` with kinds, the one-line refusal of magics a container cannot serve, ``%shell``
through a real terminal (tmux), and a session with a VM and a container exported and replayed
by ``--batch`` (the testScript, an .ipy file and a notebook). Nothing of a run is left in the
process table or /proc/mounts afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import (
    BIN,
    NEEDS_CONTAINERS,
    Kernel,
    Tmux,
    container_guests,
    kernel_env,
    machines_config,
    processes_mentioning,
    run_batch,
    text_of,
    wait_for_no_container_leftovers,
    write_notebook,
)

pytestmark = NEEDS_CONTAINERS


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return container_guests(tmp_path_factory, "ct1", "ct2")


@pytest.fixture(scope="module")
def ct_kernel(
    jupyter_path: Path, guest_dir: Path, ct_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Kernel, Path]]:
    """A kernel whose configuration has the VM vm1 (never started here) and the container ct1."""
    directory = tmp_path_factory.mktemp("ct-kernel")
    runtime = directory / "rt"
    runtime.mkdir()
    config = machines_config(guest_dir, directory, ("vm1",), [ct_dir / "run-ct1-nspawn"])
    kernel = Kernel(kernel_env(runtime, config))
    try:
        yield kernel, runtime
    finally:
        kernel.shutdown()
        assert wait_for_no_container_leftovers(runtime) == []


def ok(kernel: Kernel, code: str) -> str:
    """Run ``code``, which must succeed; its output and result (not the live status lines)."""
    reply, outputs = kernel.run(code)
    assert reply["status"] == "ok", text_of(outputs)
    return text_of([o for o in outputs if o["type"] in ("stream", "execute_result")])


def test_magics_on_a_container_in_the_kernel(ct_kernel: tuple[Kernel, Path]) -> None:
    k, _ = ct_kernel
    table = ok(k, "%machines")
    assert re.search(r"machine\s+kind\s+state", table), table
    assert re.search(r"\nct1\s+container\s+(defined|off)", table), table
    assert re.search(r"\nvm1\s+vm\s+defined", table), table
    # Completion offers the container with the VM.
    k.kc.complete("%succeed c")
    assert k.kc.get_shell_msg(timeout=10)["content"]["matches"] == ["ct1"]

    ok(k, "%start ct1")
    assert ok(k, "%succeed ct1 hostname; echo $USER") == "ct1\nroot"
    assert ok(k, "%execute ct1 echo out; exit 3") == "out\n[exit status 3]"
    ok(k, "%fail ct1 false")
    assert ok(k, "%%sh ct1\necho one\necho two") == "one\ntwo"
    ok(k, "%wait_for_unit ct1 multi-user.target")
    # The journal is the container's console.
    ok(k, "%succeed ct1 logger -t probe marker-in-the-journal")
    assert ok(k, "%wait_for_console ct1 probe.*marker").endswith("marker")
    assert "marker-in-the-journal" in ok(k, "%console ct1 -n 50")
    assert ok(k, "ct1.succeed('echo from-python')") == "'from-python\\n'"
    assert re.search(r"\nct1\s+container\s+up\s+\S+ s\s+\d+", ok(k, "%machines"))

    # A failing command is explained as on a VM, and the kernel goes on.
    reply, outputs = k.run("%succeed ct1 echo said-this; exit 4")
    assert reply["status"] == "error" and reply["ename"] == "RequestedAssertionFailed"
    assert "failed (exit code 4)" in text_of(outputs) and "said-this" in text_of(outputs)

    # No terminal to attach in a notebook: how to enter the container from one.
    hint = ok(k, "%shell ct1")
    assert "ct1: a container; open a root login shell" in hint
    assert re.search(r"nsenter --target \d+ --mount", hint), hint

    ok(k, "%shutdown ct1")
    assert re.search(r"\nct1\s+container\s+off", ok(k, "%machines"))


def test_machines_add_defines_a_container(ct_kernel: tuple[Kernel, Path], ct_dir: Path) -> None:
    k, _ = ct_kernel
    table = ok(k, f"%machines add ct2 {ct_dir / 'run-ct2-nspawn'}")
    assert re.search(r"\nct2\s+container\s+defined", table), table
    assert ok(k, "ct2.succeed('hostname')") == "'ct2\\n'"
    assert ok(k, "type(ct2).__name__, [m.name for m in machines]") == (
        "('NspawnMachine', ['ct1', 'ct2', 'vm1'])"
    )
    reply, outputs = k.run(f"%machines add ct1 {ct_dir / 'run-ct1-nspawn'}")
    assert reply["status"] == "error"
    assert "a machine named 'ct1' already exists" in text_of(outputs)
    ok(k, "%shutdown ct2")


QEMU_ONLY = [
    ("%screenshot ct1", "no screen or keyboard"),
    ("%keys ct1 ret", "no screen or keyboard"),
    ("%type ct1 hello", "no screen or keyboard"),
    ("%watch ct1", "no screen or keyboard"),
    ("%crash ct1", "no crash()"),
    ("%snapshot ct1", "no snapshots"),
    ("%restore ct1 booted", "no snapshots"),
    ("%snapshots ct1", "no snapshots"),
]


@pytest.mark.parametrize(("line", "missing"), QEMU_ONLY, ids=[q[0] for q in QEMU_ONLY])
def test_what_a_container_lacks_is_one_line(
    ct_kernel: tuple[Kernel, Path], line: str, missing: str
) -> None:
    k, _ = ct_kernel
    reply, outputs = k.run(line)
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    text = text_of(outputs).strip()
    magic = line.split()[0]
    assert text.startswith(f"UsageError: {magic}: ct1 is a container, which has {missing}"), text
    assert len(text.splitlines()) == 1, text
    assert ok(k, "2 + 2") == "4"


@pytest.fixture
def repl(tmp_path: Path, ct_dir: Path, repl_env: dict[str, str]) -> Iterator[Tmux]:
    """The terminal REPL on ct1 in tmux, at its first prompt; nothing of it is left after."""
    command = f"{BIN / 'nixos-repl'} --start-scripts {ct_dir / 'run-ct1-nspawn'}"
    tmux = Tmux(tmp_path / "tmux.sock", command, tmp_path, {**repl_env, "NIXOS_REPL_RECORD": "0"})
    try:
        tmux.wait_for(r"In \[1\]:", timeout=30)
        yield tmux
    finally:
        tmux.close()
    assert wait_for_no_container_leftovers(Path(repl_env["XDG_RUNTIME_DIR"]), timeout=30) == []


def one_more(tmux: Tmux, pattern: str, action: Callable[[], None], timeout: float = 60) -> None:
    """Do ``action``, then wait until the screen shows ``pattern`` once more than before (the
    screen keeps what earlier steps showed)."""
    before = len(re.findall(pattern, tmux.screen()))
    action()
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, tmux.screen())) <= before:
        assert time.monotonic() < deadline, f"no new {pattern!r}:\n{tmux.screen()}"
        time.sleep(0.05)


def shell_with_a_job(tmux: Tmux, job: str) -> None:
    """``%shell ct1``, and ``job`` in the background of that shell."""
    prompt = r"root shell in the container; Ctrl-D or Ctrl-\] returns\]\s*\n[^\n]*ct1[^\n]*# "
    one_more(tmux, prompt, lambda: tmux.type("%shell ct1"))
    one_more(tmux, r"\[1\] \d+\s*\n[^\n]*ct1[^\n]*# ", lambda: tmux.type(f"{job} &"))


def test_shell_in_a_container_through_a_terminal(repl: Tmux) -> None:
    # A login shell of root in the container, with job control.
    shell_with_a_job(repl, "sleep 300")
    repl.type("echo in-$((2+3)) $(hostname) $USER $HOME")
    repl.wait_for(r"in-5 ct1 root /root\s*\n")
    repl.type("sleep 101")
    deadline = time.monotonic() + 10
    while not processes_mentioning("sleep 101") and time.monotonic() < deadline:
        time.sleep(0.05)  # the container's processes are in the host's process table
    repl.send("C-c")
    repl.type("echo after-ctrl-c; stty size")
    repl.wait_for(r"\nafter-ctrl-c\s*\n50 120", timeout=10)
    # Ctrl-D ends the shell: back at the prompt, the background sleep gone with it.
    repl.send("C-d")
    repl.wait_for(r"ct1: the shell exited; nothing of it is left running\]\s*\nIn \[2\]:")
    repl.type("%succeed ct1 pgrep -x sleep || echo no-sleep")
    repl.wait_for(r"Out\[2\]: no-sleep")
    # Ctrl-] ends it too.
    shell_with_a_job(repl, "sleep 400")
    repl.send("C-]")
    repl.wait_for(r"ct1: ended the shell; nothing of it is left running\]\s*\nIn \[4\]:")
    repl.type("%succeed ct1 pgrep -x sleep || echo no-sleep")
    repl.wait_for(r"Out\[4\]: no-sleep")
    repl.send("C-d")
    repl.wait_for(r"stopped ct1: no machine left running\s*\nEXIT=0", timeout=30)


def test_closing_the_terminal_during_shell_leaves_nothing(repl: Tmux) -> None:
    shell_with_a_job(repl, "sleep 500")
    # The fixture closes the terminal now: the REPL dies of SIGHUP, with no clean-up of its
    # own, and still the container powers off and no process or mount of it is left.


# Cells of a session on a VM and a container (blank lines part the cells of a piped REPL).
SESSION = [
    "%start vm1 ct1",
    "%succeed vm1 echo vm-says-hi",
    "%succeed ct1 echo ct-says-hi > /etc/marker; cat /etc/marker",
    "%%sh ct1\ntest -e /etc/marker\ngrep -q hi /etc/marker",
    'ct1.wait_for_unit("multi-user.target")',
    "%execute ct1 exit 3",
    "%fail ct1 test -e /nonexistent",
    "%shutdown ct1",
]


def test_a_session_with_a_vm_and_a_container_exports_and_replays(
    tmp_path: Path, guest_dir: Path, ct_dir: Path
) -> None:
    scripts = [str(guest_dir / "run-vm1-vm"), str(ct_dir / "run-ct1-nspawn")]
    runtime = tmp_path / "rt"
    runtime.mkdir()
    cells = [*SESSION[:3], "%screenshot ct1", *SESSION[3:], "%export exported.py"]
    session = subprocess.run(
        [str(BIN / "nixos-repl"), "--start-scripts", *scripts],
        input="\n\n".join(cells) + "\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=kernel_env(runtime, None),
        timeout=300,
    )
    assert session.returncode == 1, session.stdout[-3000:]  # the refused %screenshot
    assert "Out[2]: vm-says-hi" in session.stdout and "ct-says-hi" in session.stdout
    assert "wrote exported.py" in session.stdout, session.stdout[-3000:]
    assert wait_for_no_container_leftovers(runtime) == []

    # The session log has the container's actions, as a VM's (the registry's observers).
    (log,) = tmp_path.glob("session-*.jsonl")
    actions = [json.loads(line) for line in log.read_text().splitlines()]
    recorded = [(a.get("machine"), a.get("action"), a.get("status")) for a in actions]
    assert ("ct1", "execute", 3) in recorded and ("vm1", "succeed", 0) in recorded
    exported = (tmp_path / "exported.py").read_text()
    assert 'vm1.succeed("echo vm-says-hi")' in exported
    assert 'ct1.succeed("echo ct-says-hi > /etc/marker; cat /etc/marker")' in exported
    assert 'ct1.execute("exit 3")' in exported and "ct1.shutdown()" in exported
    # nixpkgs' containers have no connect(): only the VM is waited for so.
    assert "ct1.start()" in exported and "vm1.connect()" in exported
    assert "ct1.connect()" not in exported
    assert "# %screenshot ct1" in exported  # failed: kept as a comment
    replay_line = re.search(r"# replay: nixos-repl --batch THIS_FILE (.*)", exported)
    assert replay_line is not None, exported
    by_name = sorted(scripts, key=lambda s: Path(s).name)  # the machines' order: ct1, vm1
    assert replay_line.group(1).split() == ["--start-scripts", *by_name]

    # The export, the same cells as an .ipy file and as a notebook, replayed by --batch.
    (tmp_path / "cells.ipy").write_text("\n# %%\n".join(SESSION) + "\n")
    write_notebook(tmp_path / "cells.ipynb", *SESSION)
    for source in ("exported.py", "cells.ipy", "cells.ipynb"):
        out = tmp_path / f"replay-{source.replace('.', '-')}"
        out.mkdir()
        command = [str(BIN / "nixos-repl"), "--batch", str(tmp_path / source)]
        run = run_batch([*command, *replay_line.group(1).split()], out, runtime)
        assert run.returncode == 0, f"{source}:\n{run.stderr[-3000:]}"
        assert "must succeed: echo ct-says-hi" in run.stdout + run.stderr, run.stderr[-3000:]
        assert wait_for_no_container_leftovers(runtime) == []
