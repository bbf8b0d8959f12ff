"""The front ends' pure logic, without VMs: values, completion, the status presenter, tracebacks,
the guest shell script, the kernelspec, the notebook's configuration and the command line."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nixos_repl.cli import _parser
from nixos_repl.config import DriverConfig, MachineConfig, load_driver_configuration
from nixos_repl.interactive.completion import candidates
from nixos_repl.interactive.display import (
    Execution,
    MachineRow,
    MachineTable,
    Output,
    StatusLine,
    format_duration,
)
from nixos_repl.interactive.guestshell import PORT_NAME, ShellHint, resize_script, start_script
from nixos_repl.interactive.kernel import kernel_argv, write_kernelspec
from nixos_repl.interactive.live import Presenter, clean, clip, status_text
from nixos_repl.interactive.magics import screenshot_name
from nixos_repl.interactive.notebook import config_json, notebook_env
from nixos_repl.interactive.repl import split_cells
from nixos_repl.interactive.report import machine_details, user_traceback
from nixos_repl.magic_table import unescape


def pretty(value: object) -> str:
    from IPython.lib import pretty as ipython_pretty

    render: Any = ipython_pretty.pretty
    return str(render(value))


def test_values_render_as_text() -> None:
    assert pretty(Output("a\nb\n")) == "a\nb"
    assert Output("x") == "x" and isinstance(Output("x"), str)
    assert pretty(Execution(3, "oops\n")) == "oops\n[exit status 3]"
    assert pretty(Execution(0, "")) == "[exit status 0]"
    status, output = Execution(1, "o")
    assert (status, output) == (1, "o")


def test_machine_table() -> None:
    table = MachineTable(
        [
            MachineRow("vm1", "vm", "up", 65.2, 1234, "Welcome <to> the console"),
            MachineRow("ct1", "container", "defined", None, None, ""),
        ]
    )
    lines = table.text().splitlines()
    head = ["machine", "kind", "state", "uptime", "pid", "last", "console", "line"]
    assert lines[0].split() == head
    assert lines[1].split()[:6] == ["vm1", "vm", "up", "1", "min", "05"]
    assert lines[2].split() == ["ct1", "container", "defined", "-", "-"]
    assert "<td" in table._repr_html_() and "&lt;to&gt;" in table._repr_html_()
    assert "%machines add" in MachineTable([]).text()
    named = MachineTable(table.rows, Path("/x/nixos-repl-out"))
    assert named.text().splitlines()[-1] == "output: /x/nixos-repl-out (screenshots, session log)"
    assert "output: /x/nixos-repl-out" in named._repr_html_()


def test_format_duration() -> None:
    assert format_duration(None) == "-"
    assert format_duration(4.25) == "4.2 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(7260) == "2 h 01 min"


def test_status_line_bundle() -> None:
    assert StatusLine("")._repr_mimebundle_() == {"text/plain": "", "text/html": ""}
    bundle = StatusLine("vm1: <x>")._repr_mimebundle_()
    assert bundle["text/plain"] == "vm1: <x>" and "&lt;x&gt;" in bundle["text/html"]


def test_clean_and_clip() -> None:
    assert clean("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r") == "SeaBIOS"
    assert clip("abcdef", 4) == "abc…" and clip("abc", 4) == "abc"


def test_status_text() -> None:
    from nixos_repl.interactive.display import Step

    steps = [Step("vm1", "waiting for unit x", 10.0), Step("vm2", "must succeed: y", 11.0)]
    console = {"vm1": "\x1b[1m[ OK ] Started x\x1b[0m", "vm2": ""}
    text = status_text(steps, lambda name: console[name], 12.5)
    assert (
        text == "vm1: waiting for unit x (2.5 s) · [ OK ] Started x | vm2: must succeed: y (1.5 s)"
    )


class FakeSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def show(self, text: str) -> None:
        self.events.append(("show", text))

    def hide(self) -> None:
        self.events.append(("hide", ""))

    def write(self, line: str) -> None:
        self.events.append(("line", line))

    def begin_cell(self) -> None:
        pass

    def end_cell(self) -> None:
        pass


def test_presenter_shows_long_steps_only_and_hides_them() -> None:
    sink = FakeSink()
    presenter = Presenter(sink, lambda name: f"{name} console")
    presenter.show_after = 0.2
    try:
        presenter.step_started("vm1", "quick")
        presenter.step_ended("vm1", "quick")
        presenter.sync()
        assert sink.events == []
        presenter.step_started("vm1", "waiting for the VM to finish booting")
        presenter.step_started("vm1", "inner")  # nested: the outer one is shown
        time.sleep(0.7)
        presenter.line("a warning")
        presenter.step_ended("vm1", "inner")
        presenter.step_ended("vm1", "waiting for the VM to finish booting")
        presenter.settle()
        shows = [text for kind, text in sink.events if kind == "show"]
        assert len(shows) >= 2  # redrawn while it lasts
        assert all(t.startswith("vm1: waiting for the VM to finish booting (") for t in shows)
        assert shows[0].endswith("· vm1 console")
        assert ("line", "a warning") in sink.events
        assert sink.events[-1] == ("hide", "")
        assert presenter.busy() == []
    finally:
        presenter.close()


def test_completion_candidates() -> None:
    names = ["vm1", "vm2", "web"]
    assert candidates("%succeed v", names) == ("v", ["vm1", "vm2"])
    assert candidates("%succeed vm1 ech", names) == ("ech", [])
    assert candidates("%start vm1 ", names) == ("", ["vm2", "web", "--all"])
    assert candidates("%machines ", names) == ("", ["add"])
    assert candidates("%console vm1 -", names) == ("-", ["-n"])
    assert candidates("%wait_for_unit vm1 x --t", names) == ("--t", ["--timeout"])
    assert candidates("x = 1", names) is None
    assert candidates("%timeit x", names) is None


def test_completion_of_snapshot_labels() -> None:
    labels = {"vm1": ["base", "booted"], "vm2": ["other"]}

    def labels_of(name: str | None) -> list[str]:
        return labels.get(name, []) if name else sorted({x for v in labels.values() for x in v})

    names = ["vm1", "vm2"]
    assert candidates("%restore vm", names, labels_of) == ("vm", ["vm1", "vm2"])
    assert candidates("%restore vm1 b", names, labels_of) == ("b", ["base", "booted"])
    assert candidates("%snapshot vm2 ", names, labels_of) == ("", ["other"])
    assert candidates("%restore --all o", names, labels_of) == ("o", ["other"])
    assert candidates("%restore vm1 base ", names, labels_of) == ("", [])
    assert candidates("%restore --a", names, labels_of) == ("--a", ["--all"])


def test_unescape_and_names() -> None:
    assert unescape(r"echo hi\n") == "echo hi\n"
    assert unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("plain $x {y}") == "plain $x {y}"
    assert screenshot_name("vm1").startswith(f"vm1-{dt.datetime.now():%Y%m%d}-")


def test_user_traceback_drops_internal_frames() -> None:
    from nixos_repl.loop import run_sync

    async def boom() -> None:
        raise ValueError("x")

    try:
        run_sync(boom())
    except ValueError as e:
        tb = user_traceback(e.__traceback__)
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert frames == [__file__, __file__]  # the caller and the coroutine, nothing between


def test_machine_details() -> None:
    from nixos_repl.errors import RequestedAssertionFailed

    lines = machine_details(RequestedAssertionFailed("x"), "vm1", "out\n", ["", "a", "b"])
    assert lines == ["machine: vm1", "output:\n  out", "console (last 2 lines):\n  a\n  b"]
    assert machine_details(RequestedAssertionFailed("x"), None, "out", []) == []


def test_guest_shell_script() -> None:
    script = start_script(40, 120, "xterm")
    assert PORT_NAME in script and "set -m" in script and "setsid bash -c" in script
    assert "stty -F $dev rows 39 cols 120" in script and "rows 40 cols 120" in script
    assert (
        resize_script(10, 20, "/dev/hvc1")
        .splitlines()[-1]
        .startswith("stty -F /dev/hvc1 rows 10 cols 20")
    )
    hint = ShellHint("vm1", "/dev/hvc1", Path("/tmp/a b/vm-state-vm1"))
    assert hint.command() == "nixos-repl shell vm1 --state-dir '/tmp/a b/vm-state-vm1'"
    assert hint.command() in pretty(hint)


def test_kernelspec(tmp_path: Path) -> None:
    spec_dir = write_kernelspec(tmp_path / "nixos-repl")
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["argv"] == kernel_argv(sys.executable)
    assert spec["argv"][1:3] == ["-m", "nixos_repl.interactive.kernel"]
    assert spec["display_name"] == "nixos-repl" and spec["language"] == "python"
    assert (spec_dir / "logo-32x32.png").is_file() and (spec_dir / "logo-64x64.png").is_file()
    shipped = json.loads(
        (Path(__file__).parent.parent / "kernel/nixos-repl/kernel.json").read_text()
    )
    assert shipped["argv"] == kernel_argv("python3")


def test_notebook_configuration(tmp_path: Path) -> None:
    script = tmp_path / "run-vm1-vm"
    config = DriverConfig(
        vms={"vm1": MachineConfig("vm1", script)}, vlans=[1], global_timeout=dt.timedelta(60)
    )
    env = notebook_env(config, tmp_path)
    loaded = load_driver_configuration(env["NIXOS_REPL_CONFIG"])
    assert loaded.vms == config.vms and loaded.vlans == [1]
    assert (tmp_path / "share/jupyter/kernels/nixos-repl/kernel.json").is_file()
    assert str(tmp_path / "share" / "jupyter") in env["JUPYTER_PATH"]
    assert "NIXOS_REPL_CONFIG" not in notebook_env(DriverConfig(), tmp_path / "empty")
    assert config_json(config)["global_timeout"] == 60 * 86400
    # Containers go to the kernels too (a notebook with only a container gets a config).
    ct = DriverConfig(containers={"ct1": MachineConfig("ct1", tmp_path / "run-ct1-nspawn")})
    loaded = load_driver_configuration(notebook_env(ct, tmp_path / "ct")["NIXOS_REPL_CONFIG"])
    assert loaded.containers == ct.containers and loaded.vms == {}


def test_split_cells() -> None:
    assert split_cells("%a\n\n\n%%sh vm1\necho 1\necho 2\n\nx = 1\n") == [
        "%a",
        "%%sh vm1\necho 1\necho 2",
        "x = 1",
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--demo"], {"demo": True, "command": None}),
        (["kernel", "install", "--sys-prefix"], {"command": "kernel", "sys_prefix": True}),
        (["shell", "vm1", "--state-dir", "d"], {"command": "shell", "state_dir": Path("d")}),
        (
            ["-c", "x.json", "notebook", "--no-browser"],
            {"command": "notebook", "config": Path("x.json")},
        ),
        (["notebook", "--vlans", "2"], {"command": "notebook", "vlans": ["2"]}),
    ],
)
def test_command_line(argv: list[str], expected: dict[str, object]) -> None:
    args = _parser().parse_args(argv)
    for key, value in expected.items():
        assert getattr(args, key) == value
