"""``--batch`` with .ipy files and notebooks on the tiny guests: exit codes, failures by cell
and line, JUnit cases, bad input, and the export of a notebook replayed green."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .helpers import BIN, BatchRun, leftovers, run_batch


def notebook(path: Path, *cells: str) -> Path:
    """A notebook of code cells; a cell starting with ``md:`` is a markdown cell."""
    raw: list[dict[str, Any]] = []
    for source in cells:
        if source.startswith("md:"):
            raw.append({"cell_type": "markdown", "metadata": {}, "source": source[3:]})
        else:
            raw.append({"cell_type": "code", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": source.splitlines(keepends=True)})  # fmt: skip
    nb = {"cells": raw, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1))
    return path


def batch(script: Path, guest_dir: Path, out: Path, runtime: Path, *extra: str) -> BatchRun:
    command = [
        str(BIN / "nixos-repl"), "--batch", str(script), "--junit-xml", "junit.xml",
        "--start-scripts", str(guest_dir / "run-vm1-vm"), str(guest_dir / "run-vm2-vm"),
        "--vlans", "1", *extra,
    ]  # fmt: skip
    return run_batch(command, out, runtime)


GREEN = (
    "md:# A test written in a notebook",
    "%start --all",
    "%succeed vm1 echo hello > /tmp/greeting",
    'greeting = vm1.succeed("cat /tmp/greeting")\nassert greeting == "hello\\n", greeting',
    "%%sh vm2\nset -e\nfor i in 1 2 3; do echo $i; done > /tmp/n\ntest $(wc -l < /tmp/n) = 3",
    "import asyncio\nawait asyncio.gather(vm1.aio.succeed('true'), vm2.aio.succeed('true'))",
    "status, output = %execute vm2 exit 3\nassert status == 3",
    "%screenshot vm1 shot",
    "md:the end",
)


def test_a_green_notebook_exits_0_with_a_case_per_cell(
    guest_dir: Path, dirs: tuple[Path, Path]
) -> None:
    out, runtime = dirs
    result = batch(notebook(out / "t.ipynb", *GREEN), guest_dir, out, runtime)
    assert result.returncode == 0, result.stderr
    assert "test script finished in " in result.stderr
    assert "vm1: must succeed: echo hello > /tmp/greeting" in result.stderr
    assert result.junit() == {f"cell {n}": None for n in range(1, 8)}
    assert (out / "shot.png").is_file()
    assert not list(out.glob("session-*.jsonl"))  # batch runs are not recorded


def test_the_export_of_a_notebook_replays_green(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    source = notebook(out / "t.ipynb", *GREEN)
    script = out / "testScript.py"
    exported = run_batch(
        [str(BIN / "nixos-repl"), "export", str(source), "-o", str(script)], out, runtime
    )
    assert exported.returncode == 0, exported.stderr
    text = script.read_text()
    assert "get_ipython" not in text and "%" not in text.replace("# ", "")
    assert "vm1.succeed('true')\nvm2.succeed('true')" in text
    assert 'vm1.screenshot("shot")' in text
    result = batch(script, guest_dir, out, runtime)
    assert result.returncode == 0, f"{text}\n{result.stderr}"
    assert result.junit() == {"main": None}


def test_the_export_notebook_runs_in_batch(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    notebooks = Path(__file__).parent.parent / "notebooks"
    result = batch(notebooks / "export.ipynb", guest_dir, out, runtime)
    assert result.returncode == 0, result.stderr
    assert not (out / "testScript.py").exists()  # %export does nothing in a batch run


def test_a_failing_cell_is_named_with_its_line(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    path = notebook(
        out / "t.ipynb",
        "md:intro",
        "x = 1",
        "%succeed vm1 true\n%succeed vm1 echo oops; exit 4\n%succeed vm1 touch /tmp/never",
        "%succeed vm1 touch /tmp/never",
    )
    result = batch(path, guest_dir, out, runtime)
    assert result.returncode == 1
    assert result.bang_lines()[:3] == [
        "!!! t.ipynb, cell 2, line 2 failed:",
        "!!!     %succeed vm1 echo oops; exit 4",
        "!!! RequestedAssertionFailed: command `echo oops; exit 4` failed (exit code 4)",
    ]
    assert result.junit() == {"cell 1": None, "cell 2": "test case failed"}
    assert "touch /tmp/never" not in result.stderr.replace("%succeed vm1 touch", "")
    assert leftovers(runtime) == []


def test_an_ipy_file_with_cells_and_subtests(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    path = out / "t.ipy"
    path.write_text(
        "%start vm1\n"
        "# %%\n"
        'with subtest("greets"):\n'
        "    %succeed vm1 echo hi\n"
        "# %% the failing one\n"
        "def check():\n"
        '    vm1.succeed("exit 5")\n'
        'with subtest("fails"):\n'
        "    check()\n"
    )
    result = batch(path, guest_dir, out, runtime)
    assert result.returncode == 1
    assert result.bang_lines()[:2] == [
        '!!! Test "fails" failed with error: "command `exit 5` failed (exit code 5)"',
        "!!! t.ipy, cell 3, line 4 (line 9 of the file) failed:",
    ]
    assert "!!!     check()" in result.bang_lines()
    assert '!!!   File "' in result.stderr and ', cell 3", line 2' in result.stderr
    assert result.junit() == {"greets": None, "fails": "test case failed"}


def test_a_syntax_error_starts_nothing(guest_dir: Path, dirs: tuple[Path, Path]) -> None:
    out, runtime = dirs
    path = notebook(out / "t.ipynb", "%start --all", "x = 1\nif x\n    pass")
    result = batch(path, guest_dir, out, runtime)
    assert result.returncode == 1
    assert result.bang_lines()[:2] == [
        "!!! t.ipynb, cell 2, line 2: SyntaxError: expected ':'",
        "!!!     if x",
    ]
    assert "starting vm" not in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("md.ipynb", None, "md.ipynb: the notebook has no code cells"),
        ("bad.ipynb", '{"cells": [', "bad.ipynb: not a notebook: invalid JSON"),
        ("empty.ipy", "\n# %%\n", "empty.ipy: the file has no code"),
        ("t.txt", "x = 1", "unknown format '.txt'"),
    ],
)
def test_bad_input(
    name: str, content: str | None, message: str, guest_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / name
    if content is None:
        notebook(path, "md:only words")
    else:
        path.write_text(content)
    result = run_batch(
        [str(BIN / "nixos-repl"), "--batch", str(path), "--start-scripts",
         str(guest_dir / "run-vm1-vm")],
        tmp_path,
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
