"""The notebooks of notebooks/ as tests: each one's export replays green under --batch, and the
export notebook's own ``%export`` writes a testScript that replays green too."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from .helpers import BIN, kernel_env, machines_config, replay

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["multivm", "export", "rewind"])
def test_the_export_of_a_notebook_replays_green(name: str, guest_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{name}.py"
    result = subprocess.run(
        [str(BIN / "nixos-repl"), "export", str(NOTEBOOKS / f"{name}.ipynb"), "-o", str(script)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert "nixos_repl" not in text.replace("exported by nixos-repl", "")
    if name == "multivm":
        assert "vm1.block()" in text and "vm2.screenshot(" in text
    if name == "rewind":  # the surviving timeline: what the restore undid is left out
        assert "rm -rf /etc" not in text and 'vm1.succeed("ls /etc | head -5")' in text
    stderr = replay(script, guest_dir, tmp_path, ("vm1", "vm2"))
    if name == "multivm":
        assert "vm1: must succeed: ip -4 addr show" in stderr


def test_the_export_notebook_writes_a_script_that_replays_green(
    jupyter_path: Path, guest_dir: Path, tmp_path: Path
) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    config = machines_config(guest_dir, tmp_path, ("vm1",))
    read: Any = nbformat.read
    nb = read(NOTEBOOKS / "export.ipynb", as_version=4)
    client = NotebookClient(
        nb, kernel_name="nixos-repl", timeout=300, resources={"metadata": {"path": str(work)}}
    )
    client.execute(env=kernel_env(runtime, config))
    last = nb.cells[-1]
    assert "%export testScript.py" in last.source
    assert "wrote testScript.py (" in str(last.outputs)
    script = work / "testScript.py"
    text = script.read_text()
    assert 'page = vm1.succeed("cat /tmp/site/index.html")' in text
    assert "%record" not in text and "no-export" not in text
    replay(script, guest_dir, tmp_path, ("vm1",))
