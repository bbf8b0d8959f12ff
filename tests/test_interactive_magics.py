"""The IPython extension in a plain InteractiveShell: magics, errors, completion, quiet serial,
live status lines, Ctrl-C. One driver with vm1 and vm2 is booted for the whole module."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.completer import provisionalcompleter
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from nixos_repl import Driver, DriverConfig, MachineConfig
from nixos_repl.interactive import session as session_mod
from nixos_repl.interactive.display import Execution, MachineTable, Output, Screenshot
from nixos_repl.interactive.live import PlainSink
from nixos_repl.interactive.session import Session

from .helpers import interrupt_after


class RecordingSink(PlainSink):
    """Log lines to a buffer, and every status line shown."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        super().__init__(self.buffer)
        self.shown: list[str] = []
        self.hidden = 0

    def show(self, text: str) -> None:
        self.shown.append(text)

    def hide(self) -> None:
        self.hidden += 1


Shell = tuple[Any, Session, "RecordingSink"]


@pytest.fixture(scope="module")
def shell(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shell]:
    out = tmp_path_factory.mktemp("magics-out")
    config = DriverConfig(
        vms={n: MachineConfig(n, guest_dir / f"run-{n}-vm") for n in ("vm1", "vm2")},
        vlans=[1],
    )
    sink = RecordingSink()
    # Its own directory for sockets, VLAN switches and state: the session's registry of
    # conftest runs vm1 and vm2 on VLAN 1 too.
    tmp = tmp_path_factory.mktemp("magics-rt")
    session = Session(Driver(config, out_dir=out, interactive=True, tmp_dir=tmp), sink)
    session_mod.set_current(session)
    ip: Any = InteractiveShell.instance()
    ip.history_manager.enabled = False
    ip.extension_manager.load_extension("nixos_repl")
    try:
        yield ip, session, sink
    finally:
        ip.extension_manager.unload_extension("nixos_repl")
        InteractiveShell.clear_instance()
        session.close()


def run(ip: Any, source: str) -> tuple[Any, str, str]:
    """Run a cell; returns (result, stdout, stderr)."""
    with capture_output() as captured:
        result = ip.run_cell(source, store_history=True)
    return result, captured.stdout, captured.stderr


def test_machines_start_and_table(shell: Shell) -> None:
    ip, session, _ = shell
    result, _, _ = run(ip, "%machines")
    assert isinstance(result.result, MachineTable)
    result, _, _ = run(ip, "%start --all")
    assert result.success
    assert all(m.state == "up" for m in session.machines)
    table = run(ip, "%machines")[0].result
    assert [r.name for r in table.rows] == ["vm1", "vm2"]
    assert all(r.state == "up" and r.pid for r in table.rows)
    assert "vm1" in table.text() and "up" in table.text()
    assert "<table" in table._repr_html_()


def test_succeed_takes_the_line_raw(shell: Shell) -> None:
    ip, _, _ = shell
    result, stdout, _ = run(ip, "%succeed vm1 echo $HOME 'a  b' {x} \"$((1+2))\"")
    assert result.success
    assert isinstance(result.result, Output)
    assert result.result == "/root a  b {x} 3\n"
    assert "/root a  b {x} 3" in stdout  # shown as text, not as a repr


def test_execute_and_fail(shell: Shell) -> None:
    ip, _, _ = shell
    result = run(ip, "%execute vm2 echo hi; exit 3")[0]
    assert result.result == Execution(3, "hi\n")
    assert run(ip, "%fail vm1 false")[0].success


def test_cell_magic_runs_one_script(shell: Shell) -> None:
    ip, _, _ = shell
    result = run(ip, "%%sh vm1\nx=one\necho $x\necho two")[0]
    assert result.result == "one\ntwo\n"


def test_unknown_machine_is_one_line(shell: Shell) -> None:
    ip, _, _ = shell
    result, stdout, stderr = run(ip, "%succeed vm3 true")
    assert not result.success
    text = (stdout + stderr).strip()
    assert text.splitlines() == ["UsageError: no machine named 'vm3' (known machines: vm1, vm2)"]
    assert run(ip, "%succeed vm1 true")[0].success


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("%succeed", "usage: %succeed NAME CMD..."),
        ("%succeed vm1", "usage: %succeed NAME CMD..."),
        ("%wait_for_unit vm1", "usage: %wait_for_unit [--user USER] [--timeout TIMEOUT] NAME UNIT"),
        ("%screenshot", "usage: %screenshot NAME [FILE]"),
        ("%keys vm1", "usage: %keys NAME KEY [KEY ...]"),
    ],
)
def test_missing_arguments_show_the_usage(shell: Shell, line: str, expected: str) -> None:
    ip, _, _ = shell
    result, stdout, stderr = run(ip, line)
    assert not result.success
    lines = (stdout + stderr).strip().splitlines()
    assert lines[0].startswith("UsageError: ")
    assert lines[-1] == expected


def test_a_failing_command_names_machine_command_status_output(
    shell: Shell,
) -> None:
    ip, _, _ = shell
    result, stdout, stderr = run(ip, "vm1.succeed('echo the-output; exit 4')")
    assert not result.success
    text = stdout + stderr
    assert "command `echo the-output; exit 4` failed (exit code 4)" in text
    assert "machine: vm1" in text
    assert "the-output" in text
    assert "console (last" in text
    assert "nixos_repl/machine" not in text and "asyncio" not in text  # no internal frames
    assert run(ip, "%succeed vm1 echo still-here")[0].result == "still-here\n"


def test_a_raising_cell_keeps_the_shell(
    shell: Shell,
) -> None:
    ip, _, _ = shell
    result, stdout, stderr = run(ip, "1 / 0")
    assert not result.success and "ZeroDivisionError" in stdout + stderr
    assert run(ip, "%succeed vm2 echo ok")[0].result == "ok\n"


def test_console_and_screenshot(shell: Shell) -> None:
    ip, session, _ = shell
    tail = run(ip, "%console vm1 -n 5")[0].result
    assert isinstance(tail, Output) and len(tail.splitlines()) <= 5
    shot = run(ip, "%screenshot vm1")[0].result
    assert isinstance(shot, Screenshot)
    assert shot.path is not None and shot.path.exists()
    assert shot.path.parent == session.driver.out_dir
    assert shot.path.name.startswith("vm1-")
    data, _ = ip.display_formatter.format(shot)
    assert "image/png" in data
    named = run(ip, "%screenshot vm1 named-shot")[0].result
    assert named.path == session.driver.out_dir / "named-shot.png"


def test_console_shows_the_last_non_empty_lines(shell: Shell) -> None:
    ip, _, _ = shell
    run(ip, "%succeed vm1 printf 'tail-a\\n\\n\\ntail-b\\n\\n\\r\\n' > /dev/ttyS0")
    assert run(ip, "vm1.wait_for_console_text('tail-b')")[0].success
    time.sleep(0.5)  # the empty lines after it
    assert run(ip, "%console vm1 -n 2")[0].result.splitlines() == ["tail-a", "tail-b"]


def test_keys_and_type(shell: Shell) -> None:
    ip, _, _ = shell
    assert run(ip, "%type vm1 echo typed-$((6*7))\\n")[0].success
    assert run(ip, "vm1.wait_until_tty_matches('1', 'typed-42', timeout=30)")[0].success
    assert run(ip, "%keys vm1 ctrl-l")[0].success


def test_machines_add_binds_the_namespace(shell: Shell, guest_dir: Path) -> None:
    ip, session, _ = shell
    result = run(ip, f"%machines add solo {guest_dir / 'run-solo-vm'}")[0]
    assert [r.name for r in result.result.rows] == ["solo", "vm1", "vm2"]
    assert ip.user_ns["solo"] is session.machine("solo")
    assert ip.user_ns["solo"].state == "defined"
    assert run(ip, "%machines add")[0].success is False


def test_completion(shell: Shell) -> None:
    ip, _, _ = shell

    def complete(text: str) -> list[str]:
        with provisionalcompleter():
            return [c.text for c in ip.Completer.completions(text, len(text))]

    assert complete("%succeed v") == ["vm1", "vm2"]
    assert "vm2" in complete("%start vm1 ") and "vm1" not in complete("%start vm1 ")
    assert complete("%start --") == ["--all"]
    assert complete("%console vm1 -") == ["-n"]
    assert complete("%wait_for_unit vm1 foo --t") == ["--timeout"]
    assert complete("%machines a") == ["add"]


def test_serial_is_quiet_until_asked(shell: Shell) -> None:
    ip, session, sink = shell
    marker = "serial-marker-1"
    run(ip, f"%succeed vm1 echo {marker} > /dev/ttyS0")
    run(ip, f"vm1.wait_for_console_text('{marker}')")
    session.presenter.sync()
    assert marker not in sink.buffer.getvalue()
    run(ip, "serial_stdout_on()")
    try:
        run(ip, "%succeed vm1 echo serial-marker-2 > /dev/ttyS0")
        run(ip, "vm1.wait_for_console_text('serial-marker-2')")
        session.presenter.sync()
        assert "vm1 # serial-marker-2" in sink.buffer.getvalue()
    finally:
        run(ip, "serial_stdout_off()")


def test_a_long_wait_shows_a_status_line(
    shell: Shell,
) -> None:
    ip, _, sink = shell
    sink.shown.clear()
    hidden = sink.hidden
    run(ip, "%succeed vm1 echo booting-line > /dev/ttyS0; sleep 1.5")
    assert sink.shown, "no status line during a 1.5 s command"
    assert all(s.startswith("vm1: must succeed: echo booting-line") for s in sink.shown)
    assert "booting-line" in sink.shown[-1].partition(" · ")[2]  # the last console line
    assert sink.hidden > hidden  # removed when done
    sink.shown.clear()
    run(ip, "%succeed vm1 true")
    assert sink.shown == []  # quick commands never show one


def test_ctrl_c_returns_at_once_and_the_next_command_works(
    shell: Shell,
) -> None:
    ip, _, _ = shell
    timer = interrupt_after(1.0)
    start = time.monotonic()
    try:
        result, stdout, stderr = run(ip, "%succeed vm1 sleep 100")
    finally:
        timer.cancel()
    assert time.monotonic() - start < 3.0
    assert not result.success
    assert "KeyboardInterrupt" in stdout + stderr
    assert run(ip, "%succeed vm1 echo after")[0].result == "after\n"
    assert run(ip, "%succeed vm1 pgrep -x sleep || echo none")[0].result == "none\n"
