"""The magics' table: every magic has its entry and its translation, and the layers below
``interactive/`` never import it (pure logic, no VMs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from IPython.core.magic import Magics

from nixos_repl.export import cell_python, translate_cell
from nixos_repl.interactive.magics import NixosMagics
from nixos_repl.interactive.record import RecordMagics
from nixos_repl.interactive.redeploy import RebuildMagics
from nixos_repl.interactive.watch import WatchMagics
from nixos_repl.magic_table import MAGICS, NoCall, ShowOnly, Translation
from nixos_repl.replay import CellScript, CellSyntaxError

PACKAGE = Path(__file__).parent.parent / "nixos_repl"
MAGICS_CLASSES: list[type[Magics]] = [NixosMagics, WatchMagics, RebuildMagics, RecordMagics]

# Each magic at work, and what it stands for in a testScript (a NoCall class: why not).
EXAMPLES: dict[str, tuple[str, str | type[NoCall]]] = {
    "machines": ("%machines", ShowOnly),
    "start": ("%start vm1", "vm1.start()\nvm1.connect()"),
    "shutdown": ("%shutdown vm1", "vm1.shutdown()"),
    "crash": ("%crash vm1", "vm1.crash()"),
    "snapshot": ("%snapshot vm1", 'vm1.snapshot("booted")'),
    "restore": ("%restore --all base", 'driver.restore_all("base")'),
    "snapshots": ("%snapshots vm1", ShowOnly),
    "succeed": ("%succeed vm1 echo $x", 'vm1.succeed("echo $x")'),
    "fail": ("%fail vm1 false", 'vm1.fail("false")'),
    "execute": ("%execute vm1 exit 3", 'vm1.execute("exit 3")'),
    "sh": ("%%sh vm1\ntrue\n", 'vm1.succeed("true\\n")'),
    "wait_for_unit": ("%wait_for_unit vm1 x.service", 'vm1.wait_for_unit("x.service")'),
    "wait_for_console": ("%wait_for_console vm1 a.c", 'vm1.wait_for_console_text("a.c")'),
    "screenshot": ("%screenshot vm1", 'vm1.screenshot("vm1-1")'),
    "keys": ("%keys vm1 ret", 'vm1.send_key("ret")'),
    "type": ("%type vm1 hi\\n", 'vm1.send_chars("hi\\n")'),
    "console": ("%console vm1", ShowOnly),
    "shell": ("%shell vm1", ShowOnly),
    "watch": ("%watch vm1", ShowOnly),
    "rebuild": ("%rebuild nix-build", NoCall),
    "record": ("%record", ShowOnly),
    "export": ("%export t.py", ShowOnly),
}


def registered(cls: type[Magics]) -> set[str]:
    magics = getattr(cls, "magics")  # noqa: B009 - set by @magics_class
    return {*magics["line"], *magics["cell"]}


def test_every_magic_has_its_entry_and_every_entry_its_magic() -> None:
    names = set().union(*(registered(cls) for cls in MAGICS_CLASSES))
    assert names == set(MAGICS)
    assert set(EXAMPLES) == set(MAGICS), "a new magic needs its example here"


@pytest.mark.parametrize("name", sorted(MAGICS))
def test_every_magic_translates_or_says_why_not(name: str) -> None:
    source, expected = EXAMPLES[name]
    spec = MAGICS[name]
    line, _, body = source.partition("\n")
    words = line.lstrip("%").partition(" ")
    assert words[0] == name
    if isinstance(expected, str):
        calls = spec.calls(words[2], body if spec.cell else None, Translation())
        assert "\n".join(calls) == expected
        compile(expected, "<example>", "exec")
        assert translate_cell(source)[0].text == expected
    else:
        with pytest.raises(expected) as raised:
            spec.calls(words[2], body if spec.cell else None, Translation())
        assert str(raised.value)


def test_the_wait_timeout_is_the_machine_api_default() -> None:
    import inspect

    from nixos_repl.machine import Machine

    default = inspect.signature(Machine.wait_for_unit).parameters["timeout"].default
    parser = MAGICS["wait_for_unit"].parser
    assert parser is not None
    assert parser.get_default("timeout") == default.total_seconds()
    assert translate_cell(f"%wait_for_unit vm1 x --timeout {default.total_seconds():g}")[
        0
    ].text == ('vm1.wait_for_unit("x")')


BELOW_INTERACTIVE = [
    p
    for p in PACKAGE.rglob("*.py")
    if "interactive" not in p.relative_to(PACKAGE).parts
    and p.name not in ("cli.py", "__init__.py", "__main__.py")
]


@pytest.mark.parametrize("path", BELOW_INTERACTIVE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_interactive_imports_it(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.replace("nixos_repl", "").strip(".").split(".")
            assert "interactive" not in parts, f"{path.name}:{node.lineno} imports {name}"


# -- a cell as --batch runs it -------------------------------------------------------------


def test_a_cell_runs_as_its_export_means_line_for_line() -> None:
    source = (
        "%start --all\n"
        "if ok:\n"
        "    %keys vm1 a b\n"
        "    %console vm1\n"
        "status, out = %execute vm1 exit 3\n"
        "shown = %machines\n"
        "%screenshot vm1\n"
        "%record\n"
    )
    tree = cell_python(source, Translation())
    lines: dict[int, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, ast.If | ast.For):
            lines.setdefault(node.lineno, []).append(ast.unparse(node))
    assert lines[3] == ["vm1.send_key('a')", "vm1.send_key('b')"]
    assert lines[4] == ["pass"]
    assert lines[5] == ["status, out = vm1.execute('exit 3')"]
    assert lines[6] == ["shown = None"]
    assert lines[7] == ["vm1.screenshot('vm1-1')"]
    assert lines[8] == ["pass"]
    assert "get_ipython" not in ast.unparse(tree)
    assert ast.unparse(tree).startswith("start_all()\nfor machine_ in machines:")


def cells(tmp_path: Path, text: str) -> CellScript:
    path = tmp_path / "t.ipy"
    path.write_text(text)
    script = CellScript.read(path)
    script.compile()
    return script


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x = 1\n# %%\n%succeed vm1 true\n%rebuild make\n",
         "t.ipy, cell 2, line 2 (line 4 of the file): %rebuild has no testScript call: redeploy "
         "by rebuilding the test instead\n    %rebuild make"),
        ("!ls /\n", "t.ipy, cell 1, line 1 (line 1 of the file): !ls has no testScript call: a "
         "host shell command is not part of a testScript\n    !ls /"),
        ("x = %start vm1 vm2\n", "t.ipy, cell 1, line 1 (line 1 of the file): %start has no "
         "testScript call: several calls, not one value\n    x = %start vm1 vm2"),
        ("%machines add vm3 ./run\n", "%machines has no testScript call: a test defines its "
         "machines"),
        ("%succeed\n", "%succeed has no testScript call: missing the machine name"),
    ],
)  # fmt: skip
def test_a_magic_without_a_call_fails_its_cell_before_anything_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(CellSyntaxError) as raised:
        cells(tmp_path, text)
    assert message in str(raised.value)


def test_the_junit_mode_follows_subtest_calls_not_the_word(tmp_path: Path) -> None:
    words = 'note = "no subtest here"  # a subtest is a JUnit case\nsubtests = 0\n'
    assert not cells(tmp_path, words).uses_subtests
    called = 'def check():\n    with subtest("x"):\n        pass\n# %%\ncheck()\n'
    assert cells(tmp_path, called).uses_subtests


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("vm1 base", 'vm1.restore("base")'),
        ("vm-2", 'vm_2.restore("booted")'),
        ("--all", 'driver.restore_all("booted")'),
        ("--all base", 'driver.restore_all("base")'),
    ],
)
def test_rewind_magics_name_a_machine_or_all(line: str, expected: str) -> None:
    assert MAGICS["restore"].calls(line, None, Translation()) == [expected]


@pytest.mark.parametrize("line", ["", "--all vm1 base", "vm1 base extra"])
def test_rewind_magics_refuse_what_is_not_one_target(line: str) -> None:
    with pytest.raises(NoCall):
        MAGICS["snapshot"].calls(line, None, Translation())


def test_what_a_magic_needs_a_vm_has_and_a_container_lacks() -> None:
    from types import SimpleNamespace

    from nixos_repl.machine import Machine, NspawnMachine
    from nixos_repl.magic_table import NEEDS

    needing = {name: spec.needs for name, spec in MAGICS.items() if spec.needs}
    assert needing == {
        "crash": "crash",
        "snapshot": "snapshot",
        "restore": "snapshot",
        "snapshots": "snapshot",
        "screenshot": "screen",
        "keys": "screen",
        "type": "screen",
        "watch": "screen",
    }
    assert set(needing.values()) == set(NEEDS)
    for method in ("crash", "snapshot"):  # the methods (a VM's screen is an instance's part)
        assert hasattr(Machine, method) and not hasattr(NspawnMachine, method)
    vm = SimpleNamespace(name="vm1", screen=1, crash=1, snapshot=1)
    container = SimpleNamespace(name="ct1", lifecycle=SimpleNamespace(kind="container"))
    for name in needing:
        assert MAGICS[name].refusal(vm) is None
        refusal = MAGICS[name].refusal(container)
        assert refusal is not None and refusal.startswith(f"%{name}: ct1 is a container, ")
        assert "\n" not in refusal
    assert MAGICS["succeed"].refusal(container) is None


def test_start_waits_only_for_vms_with_connect() -> None:
    """nixpkgs' containers have no connect(): an export that knows them does not call it."""
    known = Translation(containers=["ct1"])
    assert MAGICS["start"].calls("vm1 ct1", None, known) == [
        "vm1.start()",
        "ct1.start()",
        "vm1.connect()",
    ]
    assert MAGICS["start"].calls("--all", None, known) == [
        "start_all()",
        "for machine_ in machines_qemu:",
        "    machine_.connect()",
    ]
    assert MAGICS["start"].calls("--all", None, Translation())[1] == "for machine_ in machines:"
