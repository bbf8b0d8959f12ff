"""The magics' table: every magic has its entry and its translation, and the layers below
``interactive/`` never import it (pure logic, no VMs)."""

from __future__ import annotations

import pytest
from IPython.core.magic import Magics

from nixos_repl.export import translate_cell
from nixos_repl.interactive.magics import NixosMagics
from nixos_repl.interactive.record import RecordMagics
from nixos_repl.interactive.redeploy import RebuildMagics
from nixos_repl.interactive.watch import WatchMagics
from nixos_repl.magic_table import MAGICS, NoCall, ShowOnly, Translation

MAGICS_CLASSES: list[type[Magics]] = [NixosMagics, WatchMagics, RebuildMagics, RecordMagics]

# Each magic at work, and what it stands for in a testScript (a NoCall class: why not).
EXAMPLES: dict[str, tuple[str, str | type[NoCall]]] = {
    "machines": ("%machines", ShowOnly),
    "start": ("%start vm1", "vm1.start()\nvm1.connect()"),
    "shutdown": ("%shutdown vm1", "vm1.shutdown()"),
    "crash": ("%crash vm1", "vm1.crash()"),
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
