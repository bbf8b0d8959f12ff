"""Export as pure logic: magics to calls, failures, cut-short cells, literals and bad input."""

from __future__ import annotations

import ast
import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest

from nixos_repl.export import (
    Cell,
    ExportError,
    export_cells,
    export_file,
    py_str,
    read_ipy,
    translate_cell,
)
from nixos_repl.machine.actions import Action, ActionObserver, observing
from nixos_repl.record import SessionLog, decode_value, encode_value

from .helpers import BIN


def code(cells: list[Cell], keep_failures: bool = False) -> str:
    """The exported script without its header comments."""
    text = export_cells(cells, keep_failures=keep_failures).text
    return "\n".join(line for line in text.splitlines() if not line.startswith("# A NixOS"))


def one(source: str) -> str:
    statements = translate_cell(source)
    return "\n".join("\n".join(s.commented()) if s.problem else s.text for s in statements)


@pytest.mark.parametrize(
    "text",
    ["plain", 'say "hi"', "it's", "both ' and \"", "a\\b", "tab\there", "end\n", "x\ny\n",
     'ends with "', 'has """ inside\nand more', "\x1b[0m", "é ünï"],
)  # fmt: skip
def test_literals_round_trip(text: str) -> None:
    literal = py_str(text)
    assert ast.literal_eval(literal) == text


def test_literals_read_as_written() -> None:
    assert py_str("echo hi") == '"echo hi"'
    assert py_str('echo "hi"') == "'echo \"hi\"'"
    assert py_str("type\n") == '"type\\n"'
    assert py_str("a\nb\n") == '"""a\nb\n"""'


def test_magics_become_the_calls_they_wrap() -> None:
    assert one("%succeed vm1 echo \"a b\" 'c' $HOME {x}") == (
        'vm1.succeed("echo \\"a b\\" \'c\' $HOME {x}")'
    )
    assert one("%fail vm1 false") == 'vm1.fail("false")'
    assert one("status, out = %execute my-vm exit 3") == 'status, out = my_vm.execute("exit 3")'
    assert one("%%sh vm2\necho 1\necho 2\n") == 'vm2.succeed("""echo 1\necho 2\n""")'
    assert one("%wait_for_unit vm1 sshd.service --timeout 30 --user alice") == (
        'vm1.wait_for_unit("sshd.service", user="alice", timeout=30)'
    )
    assert one("%wait_for_console vm1 login:\\s*$") == 'vm1.wait_for_console_text("login:\\\\s*$")'
    assert one("%type vm1 root\\n") == 'vm1.send_chars("root\\n")'
    assert one("%keys vm1 ctrl-alt-f2 ret") == 'vm1.send_key("ctrl-alt-f2")\nvm1.send_key("ret")'
    assert one("%screenshot vm1 boot") == 'vm1.screenshot("boot")'
    assert one("%screenshot vm1\n%screenshot vm1") == (
        'vm1.screenshot("vm1-1")\nvm1.screenshot("vm1-2")'
    )
    assert one("%start vm1 vm2") == "vm1.start()\nvm2.start()\nvm1.connect()\nvm2.connect()"
    assert one("%start --all").startswith("start_all()\n")
    assert one("%shutdown vm1\n%crash vm2") == "vm1.shutdown()\nvm2.crash()"
    assert one("if ok:\n    %succeed vm1 true\n    %console vm1") == (
        'if ok:\n    vm1.succeed("true")\n    pass  # %console vm1: it shows console lines'
    )
    assert one("await vm1.aio.succeed('x')") == "vm1.succeed('x')"
    assert one("await asyncio.gather(vm1.aio.wait_for_unit('a'), vm2.aio.succeed('b'))") == (
        "vm1.wait_for_unit('a')\nvm2.succeed('b')"
    )
    assert one("%record --outputs\n%export x.py\n%load_ext nixos_repl") == ""


def test_what_cannot_be_exported_is_a_comment() -> None:
    assert one("%machines") == "# not exported (%machines: it shows the machines):\n# %machines"
    assert one("!ls -l").startswith("# not exported (!ls -l: a host shell command")
    assert one("x = %console vm1").endswith("\n# x = %console vm1")
    assert one("%time vm1.succeed('x')").startswith("# not exported (%time")
    assert one("vm1.succeed?").startswith("# not exported (%pinfo")
    assert one("r = await f()").startswith("# not exported (top-level await")
    assert one("def f(:\n  pass").startswith("# syntax error")
    assert one("%succeed vm1").startswith("# not exported (%succeed vm1: missing")


def test_failures_are_comments_or_opposite_assertions() -> None:
    error = "RequestedAssertionFailed: command `exit 4` failed (exit code 4)"
    cell = Cell(
        3, "%succeed vm1 true\nvm1.succeed('exit 4')\n%succeed vm1 touch x", False, error, 2
    )
    text = code([cell])
    assert f"vm1.succeed(\"true\")\n# failed in cell 3: {error}:\n# vm1.succeed('exit 4')" in text
    assert "# not run (cell 3 failed above):\n# %succeed vm1 touch x" in text
    kept = code([cell], keep_failures=True)
    assert f"# this failed in cell 3 ({error}):\nvm1.fail('exit 4')" in kept
    failed_fail = Cell(4, "%fail vm1 true", False, "RequestedAssertionFailed: ...", 1)
    assert 'vm1.succeed("true")' in code([failed_fail], keep_failures=True)
    other = Cell(5, "vm1.wait_for_file('/x')", False, "RequestedAssertionFailed: timed out", 1)
    assert "# vm1.wait_for_file('/x')" in code([Cell(1, "x = 1"), other], keep_failures=True)


def test_a_cut_short_cell_becomes_its_finished_actions() -> None:
    cell = Cell(7, "vm1.succeed('a')\nvm1.succeed('sleep 60')", finished=False)
    cell.actions = [
        {"machine": "vm1", "action": "succeed", "args": ["a"], "kwargs": {}, "ok": True},
        {"machine": "vm1", "action": "wait_for_unit", "args": ["x"],
         "kwargs": {"timeout": {"timedelta": 3.0}}, "ok": True},
        {"machine": None, "action": "start_all", "args": [], "kwargs": {}, "ok": True},
        {"machine": "vm1", "action": "succeed", "args": ["b"], "kwargs": {}, "ok": False,
         "error": "RequestedAssertionFailed: boom"},
    ]  # fmt: skip
    text = export_cells([cell]).text
    assert "import datetime\n" in text
    assert (
        '# cell 7 was cut short; the actions it had finished:\nvm1.succeed("a")\n'
        'vm1.wait_for_unit("x", timeout=datetime.timedelta(seconds=3.0))\nstart_all()\n'
        '# failed: vm1.succeed("b"): RequestedAssertionFailed: boom\n'
    ) in text


def test_the_session_log_format(tmp_path: Path) -> None:
    log = SessionLog(tmp_path / "s.jsonl", machines={"vm1": "/x/run-vm1-vm"})
    observers: list[ActionObserver] = [log.observe]
    log.begin_cell(1, "%succeed vm1 echo secret")
    with observing(observers, "vm1", "succeed", ("echo secret",), {}) as action:
        assert action is not None
        action.result = "secret\n"
        with observing(observers, "vm1", "execute", ("nested",)) as inner:
            assert inner is None  # inside another action: not reported
    log.end_cell(True)
    log.begin_cell(2, "vm1.execute('exit 3')")
    log.observe(Action("vm1", "execute", ("exit 3",), {"timeout": dt.timedelta(seconds=2)}, 0.0,
                       result=(3, "out")))  # fmt: skip
    with pytest.raises(AssertionError), observing(observers, "vm1", "fail", ("true",)):
        raise AssertionError("command `true` unexpectedly succeeded")
    log.end_cell(False, "AssertionError: ...", 1)
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["session", "cell", "action", "cell_end", "cell",
                                         "action", "action", "cell_end"]  # fmt: skip
    assert lines[2]["output_size"] == 7 and "output" not in lines[2] and lines[2]["status"] == 0
    assert "secret\n" not in (tmp_path / "s.jsonl").read_text()
    assert lines[5]["status"] == 3 and lines[5]["kwargs"] == {"timeout": {"timedelta": 2.0}}
    assert lines[6]["status"] == 0 and lines[6]["ok"] is False
    assert lines[7] == {"kind": "cell_end", "cell": 2, "ok": False, "error": "AssertionError: ...",
                        "line": 1}  # fmt: skip
    log.outputs = True
    log.observe(Action("vm1", "succeed", ("x",), {}, 0.0, result="shown\n"))
    assert json.loads((tmp_path / "s.jsonl").read_text().splitlines()[-1])["output"] == "shown\n"
    log.close()
    assert decode_value(encode_value(dt.timedelta(seconds=5))) == dt.timedelta(seconds=5)
    assert encode_value(object())["repr"].startswith("<object")
    out = tmp_path / "t.py"
    exported = export_file(tmp_path / "s.jsonl", out)
    assert exported.statements == 2  # the cell, and the action outside any cell
    assert 'vm1.succeed("echo secret")' in out.read_text()
    assert "# replay: nixos-repl --batch THIS_FILE --start-scripts /x/run-vm1-vm" in out.read_text()


def test_ipy_cells_split_at_percent_markers(tmp_path: Path) -> None:
    path = tmp_path / "t.ipy"
    path.write_text("%start --all\n# %%\n%%sh vm1\necho hi\n# %% second\nx = 1\n")
    cells = read_ipy(path)
    assert [(c.number, c.first_line) for c in cells] == [(1, 1), (2, 3), (3, 6)]
    assert cells[1].source == "%%sh vm1\necho hi\n"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "nixos-repl"), *args], capture_output=True, text=True)


def test_bad_input_is_one_clear_message_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.py"
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text('{"kind": "session"}\n{not json\n{"kind": "cell"}\n')
    no_code = tmp_path / "empty.ipynb"
    markdown = [{"cell_type": "markdown", "source": "# hi"}]
    no_code.write_text(json.dumps({"cells": markdown, "metadata": {}, "nbformat": 4}))
    broken_nb = tmp_path / "broken.ipynb"
    broken_nb.write_text('{"cells": [')
    empty_session = tmp_path / "empty.jsonl"
    empty_session.write_text('{"kind": "session", "version": 1, "machines": {}}\n')
    only_show = tmp_path / "show.jsonl"
    only_show.write_text(
        '{"kind": "session", "version": 1}\n{"kind": "cell", "cell": 1, "source": "%machines"}\n'
        '{"kind": "cell_end", "cell": 1, "ok": true}\n'
    )
    cases = {
        tmp_path / "missing.jsonl": "missing.jsonl: no such file",
        corrupt: "bad.jsonl: line 2 is not JSON",
        no_code: "empty.ipynb: the notebook has no code cells",
        broken_nb: "broken.ipynb: not a notebook: invalid JSON",
        tmp_path / "notes.txt": "unknown format '.txt'; export takes .jsonl (a session log), "
        ".ipynb (a notebook) or .ipy",
        empty_session: "nothing to export: ",
        only_show: "nothing to export: the session",
        tmp_path: "unknown format",
    }
    (tmp_path / "notes.txt").write_text("hello")
    for source, message in cases.items():
        result = cli("export", str(source), "-o", str(out))
        assert result.returncode == 1, (source, result.stderr)
        assert message in result.stderr and result.stderr.startswith("nixos-repl: error: ")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    assert list(tmp_path.glob(".out.py.*")) == []
    result = cli("export", str(only_show))
    assert result.returncode == 2 and "-o/--output" in result.stderr
    ipy = tmp_path / "ok.ipy"
    ipy.write_text("%succeed vm1 true\n")
    with pytest.raises(ExportError, match="cannot write"):
        export_file(ipy, tmp_path / "no" / "dir.py")


def test_a_cut_last_line_is_ignored(tmp_path: Path) -> None:
    log = tmp_path / "s.jsonl"
    log.write_text(
        '{"kind": "session", "version": 1}\n{"kind": "cell", "cell": 1, "source": "x = 1"}\n'
        '{"kind": "cell_end", "cell": 1, "ok": true}\n{"kind": "act'
    )
    assert export_file(log, tmp_path / "t.py").statements == 1


def test_a_cell_tagged_no_export_runs_but_is_not_exported(tmp_path: Path) -> None:
    path = tmp_path / "t.ipynb"
    cells = [
        {"cell_type": "code", "metadata": {"tags": ["no-export"]}, "outputs": [],
         "source": "from nixos_repl.guests import build_tiny"},
        {"cell_type": "code", "metadata": {}, "outputs": [], "source": "%succeed vm1 true"},
    ]  # fmt: skip
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4}))
    out = tmp_path / "t.py"
    export_file(path, out)
    assert "nixos_repl" not in out.read_text().replace("by nixos-repl", "")
    assert 'vm1.succeed("true")' in out.read_text()


def test_names_outside_nixpkgs_are_listed(tmp_path: Path) -> None:
    from nixos_repl.config import DriverConfig
    from nixos_repl.driver import Driver
    from nixos_repl.export import nixpkgs_symbols

    driver = Driver(DriverConfig(), out_dir=tmp_path, tmp_dir=tmp_path)
    assert set(driver.symbol_names()) | {"machine"} == nixpkgs_symbols()
    cells = [
        Cell(1, "import json\nfor m in machines:\n    m.succeed('true')\n"
             "server.wait_for_unit('x')\nvlan1.stop()\ndata = json.loads(helper(vm1))"),
        Cell(2, "%machines add vm3 ./run-vm3-vm\ndef f(a, *, b=2):\n    return a + b + len(data)"),
    ]  # fmt: skip
    exported = export_cells(cells)
    assert exported.unknown == ["helper", "vm1"]
    assert "# machines: server\n" in exported.text
    assert "# note: not nixpkgs test symbols nor defined here: helper, vm1\n" in exported.text
    assert "# not exported (%machines add vm3 ./run-vm3-vm: a test defines its machines" in (
        exported.text
    )
    known = export_cells(cells[:1], machines={"vm1": "/x/run-vm1-vm"}, vlans=[1])
    assert known.unknown == ["helper", "server"]
    assert "--start-scripts /x/run-vm1-vm --vlans 1\n" in known.text
    script = tmp_path / "t.ipy"
    script.write_text("%succeed vm1 true\nprint(undefined_thing)\n")
    result = cli("export", str(script), "-o", str(tmp_path / "t.py"))
    assert result.returncode == 0
    assert "warning: " in result.stderr and "undefined_thing" in result.stderr


def test_a_cell_number_that_comes_again_starts_a_new_cell(tmp_path: Path) -> None:
    log = tmp_path / "s.jsonl"
    records = [
        {"kind": "session", "version": 1},
        {"kind": "cell", "cell": 4, "source": "a = 1"},
        {"kind": "cell_end", "cell": 4, "ok": True},
        {"kind": "cell", "cell": 4, "source": "%succeed vm1 echo $a"},
        {"kind": "action", "cell": 4, "machine": "vm1", "action": "succeed", "args": ["x"]},
        {"kind": "cell_end", "cell": 4, "ok": True},
        {"kind": "cell", "cell": 5, "source": "%export t.py"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    exported = export_file(log, tmp_path / "t.py", skip_cells=[5])
    assert exported.statements == 2
    assert 'a = 1\n\n# cell 4\nvm1.succeed("echo $a")\n' in (tmp_path / "t.py").read_text()
    log.write_text('{"kind": "session"}\n{"kind": "cell"}\n')
    with pytest.raises(ExportError, match="line 2 is not a valid 'cell' record"):
        export_file(log, tmp_path / "t.py")


def test_any_status_and_output_pair_is_recorded_as_status_and_size(tmp_path: Path) -> None:
    log = SessionLog(tmp_path / "s.jsonl")
    log.observe(Action("vm1", "systemctl", ("is-active x",), {}, 0.0, result=(3, "inactive\n")))
    log.observe(Action("vm1", "get_unit_info", ("x",), {}, 0.0, result={"Id": "secret"}))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines[1]["status"] == 3 and lines[1]["output_size"] == 9
    assert "inactive" not in json.dumps(lines[1]) and "secret" not in json.dumps(lines[2])


def test_export_never_writes_over_what_it_reads(tmp_path: Path) -> None:
    log = tmp_path / "session.jsonl"
    log.write_text(
        '{"kind": "session", "version": 1}\n{"kind": "cell", "cell": 1, "source": "x = 1"}\n'
        '{"kind": "cell_end", "cell": 1, "ok": true}\n'
    )
    before = log.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(log)
    (tmp_path / "hard.jsonl").hardlink_to(log)
    (tmp_path / "sub").mkdir()
    for target in ("session.jsonl", "link.jsonl", "hard.jsonl", "sub/../session.jsonl"):
        result = cli("export", str(log), "-o", str(tmp_path / target))
        assert result.returncode == 1, (target, result.stderr)
        assert "session.jsonl itself: writing the testScript there would destroy" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert log.read_bytes() == before
    result = cli("export", str(tmp_path / "link.jsonl"), "-o", str(log))
    assert result.returncode == 1 and log.read_bytes() == before
    assert list(tmp_path.glob(".*")) == []


def test_a_last_line_cut_inside_a_character_is_recovered(tmp_path: Path) -> None:
    log = tmp_path / "s.jsonl"
    cut = '{"kind": "cell", "cell": 2, "source": "echo é"}'.encode()
    cut = cut[: cut.index("é".encode()) + 1]  # the first of é's two bytes
    log.write_bytes(
        b'{"kind": "session", "version": 1}\n{"kind": "cell", "cell": 1, "source": "x = 1"}\n'
        b'{"kind": "cell_end", "cell": 1, "ok": true}\n' + cut
    )
    result = cli("export", str(log), "-o", str(tmp_path / "t.py"))
    assert result.returncode == 0, result.stderr
    assert "ignoring a last line cut short" in result.stderr
    assert "x = 1\n" in (tmp_path / "t.py").read_text()
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"kind": "session", "version": 1}\n"\xc3"\n')  # not the last line
    result = cli("export", str(broken), "-o", str(tmp_path / "u.py"))
    assert result.returncode == 1 and "not a text file (not UTF-8)" in result.stderr


# -- the surviving timeline --------------------------------------------------------------------

REWOUND = [
    Cell(1, "%start vm1\n%snapshot vm1 base"),
    Cell(2, "%succeed vm1 rm -rf /etc\nx = 1\nvm2.succeed('true')"),
    Cell(3, "%restore vm1 base\n%succeed vm1 ls /etc\n%snapshots"),
]


def test_export_leaves_out_what_a_restore_undid() -> None:
    text = export_cells(REWOUND).text
    assert "rm -rf /etc" not in text, "undone on vm1"
    assert "x = 1" in text and "vm2.succeed('true')" in text, "the host and vm2 were not rewound"
    assert 'vm1.succeed("ls /etc")' in text, "after the restore: the surviving timeline"
    assert '# vm1.snapshot("base")' in text and '# vm1.restore("base")' in text
    code = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not any("snapshot" in line or "restore" in line for line in code), "nixpkgs has none"
    compile(text, "t.py", "exec")


def test_keep_undone_keeps_them_as_comments() -> None:
    text = export_cells(REWOUND, keep_undone=True).text
    assert '# undone by vm1.restore("base") in cell 3:\n# vm1.succeed("rm -rf /etc")' in text


def test_restoring_every_machine_undoes_the_steps_on_any_machine() -> None:
    cells = [
        Cell(1, "%snapshot --all net\nvm1.succeed('a')\nvm2.succeed('b')\ny = 2"),
        Cell(2, "%restore --all net\nvm1.succeed('c')"),
        Cell(3, "vm2.succeed('d')\nawait vm2.aio.restore('net')\nvm2.succeed('e')"),
    ]
    text = export_cells(cells).text
    assert "'a'" not in text and "'b'" not in text and "'d'" not in text
    assert "y = 2" in text and "vm1.succeed('c')" in text and "vm2.succeed('e')" in text


def test_a_restore_without_its_snapshot_in_the_export_keeps_the_steps_and_says_so() -> None:
    text = export_cells([Cell(1, "vm1.succeed('a')\nvm1.restore()\nvm1.succeed('b')")]).text
    assert "vm1.succeed('a')" in text and "vm1.succeed('b')" in text
    assert "its snapshot was taken before what this exports" in text
