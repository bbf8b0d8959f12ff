"""Recording a session in a real kernel, exporting it, and replaying the export with --batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from nixos_repl.interactive.session import OUT_DIR

from .helpers import (
    BIN,
    Kernel,
    kernel_env,
    leftovers,
    machines_config,
    replay,
    text_of,
)


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of a session log, parsed (a line that does not parse fails the test)."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


def session_log(directory: Path) -> Path:
    logs = sorted(directory.glob("session-*.jsonl"))
    assert len(logs) == 1, logs
    return logs[0]


def export(source: Path, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "nixos-repl"), "export", str(source), "-o", str(target), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_session_is_recorded_exported_and_replays_green(
    jupyter_path: Path, guest_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    runtime = tmp_path / "rt"
    runtime.mkdir()
    config = machines_config(guest_dir, tmp_path, ("vm1", "vm2"))
    k = Kernel(kernel_env(runtime, config), cwd=work)
    try:
        cells = [
            "%start --all",
            "%succeed vm1 echo $((40 + 2))-secret > /tmp/f; cat /tmp/f",
            'x = vm1.succeed("cat /tmp/f")  # plain Python\nassert x == f"{6 * 7}-secret\\n"',
            '%%sh vm2\necho "it\'s $(hostname)"\nfor i in 1 2; do echo line $i; done',
            "status, output = %execute vm2 exit 3",
            "%succeed vm1 true\n%succeed vm1 exit 4\n%succeed vm1 touch /tmp/never",
            "%screenshot vm1 first",
            "%keys vm1 ctrl-l\n%type vm1 echo typed\\n",
            "await vm1.aio.succeed('test -e /tmp/f')",
            "%fail vm1 test -e /tmp/never",
            "%record",
        ]
        for cell in cells:
            reply, outputs = k.run(cell)
            if "exit 4" not in cell:
                assert reply["status"] == "ok", (cell, text_of(outputs))
        assert "recording on (without command outputs)" in text_of(outputs)
        log = session_log(work / OUT_DIR)
        lines = records(log)
        assert lines[0]["kind"] == "session" and lines[0]["machines"]["vm1"].endswith("run-vm1-vm")
        actions = [r for r in lines if r["kind"] == "action"]
        calls = [(r["machine"], r["action"]) for r in actions]
        assert ("vm1", "connect") in calls and ("vm2", "connect") in calls
        # magics and plain Python alike; nested calls (execute inside succeed) not repeated
        assert calls.count(("vm1", "execute")) == 0 and ("vm2", "execute") in calls
        plain = next(r for r in actions if r["args"] == ["cat /tmp/f"])
        assert plain["ok"] and plain["status"] == 0 and plain["output_size"] == len("42-secret\n")
        assert "x = vm1.succeed" in next(
            r["source"] for r in lines if r["kind"] == "cell" and r["cell"] == plain["cell"]
        )
        failed = next(r for r in actions if r["args"] == ["exit 4"])
        assert not failed["ok"] and failed["status"] == 4 and "failed" in failed["error"]
        end = next(r for r in lines if r["kind"] == "cell_end" and r["cell"] == failed["cell"])
        assert end == {"kind": "cell_end", "cell": failed["cell"], "ok": False,
                       "error": end["error"], "line": 2}  # fmt: skip
        assert ("vm1", "screenshot") in calls and ("vm1", "send_key") in calls
        assert all(isinstance(r["duration"], float) and "T" in r["time"] for r in actions)
        assert "42-secret" not in log.read_text()  # no outputs unless asked

        reply, outputs = k.run("%record --outputs")
        assert "with command outputs" in text_of(outputs)
        k.run("%succeed vm1 echo now-visible")
        assert records(log)[-2]["output"] == "now-visible\n"
        k.run("%record --no-outputs")

        target = work / "testScript.py"
        reply, outputs = k.run(f"%export {target}")
        assert reply["status"] == "ok", text_of(outputs)
        assert f"wrote {target}" in text_of(outputs)
        # the kernel keeps going after the export
        assert k.run("%succeed vm1 true")[0]["status"] == "ok"
    finally:
        k.shutdown()

    script = target.read_text()
    assert "nixos_repl" not in script.replace("exported by nixos-repl", "").replace(
        "nixos-repl --batch", ""
    )
    assert "%" not in "\n".join(line for line in script.splitlines() if not line.startswith("#"))
    for expected in (
        "start_all()",
        'vm1.succeed("echo $((40 + 2))-secret > /tmp/f; cat /tmp/f")',
        'x = vm1.succeed("cat /tmp/f")  # plain Python',
        'vm2.succeed("""echo "it\'s $(hostname)"\nfor i in 1 2; do echo line $i; done\n""")',
        'status, output = vm2.execute("exit 3")',
        f"# failed in cell {failed['cell']}: RequestedAssertionFailed: command `exit 4` failed "
        "(exit code 4):",
        "# %succeed vm1 exit 4",
        "# %succeed vm1 touch /tmp/never",
        'vm1.screenshot("first")',
        'vm1.send_key("ctrl-l")',
        'vm1.send_chars("echo typed\\n")',
        "vm1.succeed('test -e /tmp/f')",
        'vm1.fail("test -e /tmp/never")',
    ):
        assert expected in script, (expected, script)
    assert "%export" not in script  # the exporting cell is not part of it
    replay(target, guest_dir, tmp_path, ("vm1", "vm2"))

    # the same log, exported from the command line, with the failure kept as an assertion
    kept = tmp_path / "kept.py"
    result = export(log, kept, "--keep-failures")
    assert result.returncode == 0, result.stderr
    assert 'vm1.fail("exit 4")' in kept.read_text()
    replay(kept, guest_dir, tmp_path, ("vm1", "vm2"))


def test_a_killed_kernel_leaves_a_log_that_replays(
    jupyter_path: Path, guest_dir: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    runtime = tmp_path / "rt"
    runtime.mkdir()
    config = machines_config(guest_dir, tmp_path, ("vm1",))
    k = Kernel(kernel_env(runtime, config), cwd=work)
    try:
        assert k.run("%succeed vm1 echo one > /tmp/one")[0]["status"] == "ok"
        assert k.run("n = 2")[0]["status"] == "ok"
        # a cell killed in its third action
        k.kc.execute(
            'vm1.succeed("echo two > /tmp/two")\n'
            'vm1.succeed(f"test $(cat /tmp/two) = two && echo {n}")\n'
            'vm1.succeed("sleep 60")\n'
        )
        log = session_log(work / OUT_DIR)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(r["kind"] == "action" for r in records(log)) >= 3:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # inside "sleep 60"
        pid = k.km.provisioner.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)
    deadline = time.monotonic() + 20
    while leftovers(runtime) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(runtime) == [], "QEMU outlived the killed kernel"
    lines = records(log)  # every line parses
    assert lines[-1]["kind"] == "action"
    assert lines[-1]["args"] == ["test $(cat /tmp/two) = two && echo 2"]
    target = tmp_path / "cut.py"
    result = export(log, target)
    assert result.returncode == 0, result.stderr
    script = target.read_text()
    assert re.search(r"# cell \d+ was cut short; the actions it had finished:\n", script)
    assert 'vm1.succeed("echo two > /tmp/two")' in script
    assert "sleep 60" not in script
    replay(target, guest_dir, tmp_path, ("vm1",))
