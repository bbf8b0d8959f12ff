"""``--batch --pause-on-failure`` through tmux: the REPL opens at the failure with the machines
up and the script's names loaded; leaving it exits 1 and stops the machines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .helpers import BIN, Tmux, qemus_under

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

CELLS = [
    'marker = "kept-" + str(6 * 7)',
    "%succeed vm1 echo up > /tmp/up",
    "%succeed vm1 exit 9",
    "never = True",
]


def write_script(path: Path) -> None:
    if path.suffix == ".ipynb":
        cells: list[dict[str, object]] = [
            {"cell_type": "code", "metadata": {}, "outputs": [], "source": c} for c in CELLS
        ]
        path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                    "nbformat_minor": 5}))  # fmt: skip
    else:
        path.write_text(
            'marker = "kept-" + str(6 * 7)\nvm1.succeed("echo up > /tmp/up")\n'
            'vm1.succeed("exit 9")\nnever = True\n'
        )


@pytest.mark.parametrize("name", ["t.ipynb", "t.py"])
def test_pause_on_failure(
    name: str, tmp_path: Path, guest_dir: Path, repl_env: dict[str, str]
) -> None:
    runtime = Path(repl_env["XDG_RUNTIME_DIR"])
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / name
    write_script(script)
    command = (
        f"{BIN / 'nixos-repl'} --batch {script} --start-scripts {guest_dir / 'run-vm1-vm'} "
        f"-o {out} --pause-on-failure"
    )
    tmux = Tmux(tmp_path / "tmux.sock", command, tmp_path, repl_env)
    try:
        screen = tmux.wait_for(r"In \[1\]:", timeout=120)
        assert "paused at the failure (--pause-on-failure): machines up: vm1" in screen
        assert "exit code 9" in screen
        tmux.type("marker, 'never' in dir()")
        tmux.wait_for(r"Out\[1\]: \('kept-42', False\)")
        tmux.type("%succeed vm1 cat /tmp/up")
        tmux.wait_for(r"Out\[2\]: up")
        assert qemus_under(runtime)
        tmux.send("C-d")
        tmux.wait_for(r"EXIT=1", timeout=60)
        assert qemus_under(runtime) == []
    finally:
        tmux.close()
