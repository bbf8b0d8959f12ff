"""send_key spec parsing: nixpkgs' character table and the QMP send-key encoding (no VM)."""

from __future__ import annotations

import string

import pytest

from nixos_repl.machine.keys import CHAR_TO_KEY, QKEYCODES, key_to_qmp


def qcode(name: str) -> dict[str, object]:
    return {"type": "qcode", "data": name}


def number(value: int) -> dict[str, object]:
    return {"type": "number", "data": value}


@pytest.mark.parametrize(
    ("char", "spec"),
    [
        ("A", "shift-a"),
        ("Z", "shift-z"),
        ("-", "0x0C"),
        ("_", "shift-0x0C"),
        ("=", "0x0D"),
        ("+", "shift-0x0D"),
        ("[", "0x1A"),
        ("}", "shift-0x1B"),
        (";", "0x27"),
        (":", "shift-0x27"),
        ("'", "0x28"),
        ('"', "shift-0x28"),
        ("`", "0x29"),
        ("~", "shift-0x29"),
        ("\\", "0x2B"),
        ("|", "shift-0x2B"),
        (",", "0x33"),
        ("<", "shift-0x33"),
        (".", "0x34"),
        (">", "shift-0x34"),
        ("/", "0x35"),
        ("?", "shift-0x35"),
        (" ", "spc"),
        ("\n", "ret"),
        ("!", "shift-0x02"),
        ("@", "shift-0x03"),
        ("#", "shift-0x04"),
        ("$", "shift-0x05"),
        ("%", "shift-0x06"),
        ("^", "shift-0x07"),
        ("&", "shift-0x08"),
        ("*", "shift-0x09"),
        ("(", "shift-0x0A"),
        (")", "shift-0x0B"),
        ("\t", "tab"),
    ],
)
def test_table_entries(char: str, spec: str) -> None:
    assert CHAR_TO_KEY[char] == spec


def test_table_is_nixpkgs_plus_tab() -> None:
    uppercase = set(string.ascii_uppercase)
    others = set(CHAR_TO_KEY) - uppercase
    assert uppercase <= set(CHAR_TO_KEY)
    assert len(others) == 35  # 34 from nixpkgs, plus tab
    assert not set(string.ascii_lowercase + string.digits) & set(CHAR_TO_KEY)


@pytest.mark.parametrize("char", sorted(CHAR_TO_KEY))
def test_every_table_value_converts(char: str) -> None:
    keys = key_to_qmp(char)
    assert keys
    assert keys == key_to_qmp(CHAR_TO_KEY[char])


@pytest.mark.parametrize("char", string.ascii_lowercase + string.digits)
def test_lowercase_and_digits_are_qcodes(char: str) -> None:
    assert key_to_qmp(char) == [qcode(char)]


def test_uppercase_is_shift_letter() -> None:
    assert key_to_qmp("Q") == [qcode("shift"), qcode("q")]


def test_combinations() -> None:
    assert key_to_qmp("ctrl-alt-delete") == [qcode("ctrl"), qcode("alt"), qcode("delete")]
    assert key_to_qmp("alt-f2") == [qcode("alt"), qcode("f2")]
    assert key_to_qmp("ctrl-c") == [qcode("ctrl"), qcode("c")]
    assert key_to_qmp("ret") == [qcode("ret")]


def test_hex_scancodes() -> None:
    assert key_to_qmp("shift-0x0C") == [qcode("shift"), number(0x0C)]
    assert key_to_qmp("0x1c") == [number(0x1C)]
    assert key_to_qmp("ctrl-0x2B") == [qcode("ctrl"), number(0x2B)]


def test_lone_dash_is_minus_scancode() -> None:
    assert key_to_qmp("-") == [number(0x0C)]


def test_tab_is_fixed() -> None:
    assert key_to_qmp("\t") == [qcode("tab")]
    assert key_to_qmp("tab") == [qcode("tab")]


def test_hmp_less_alias() -> None:
    # HMP turns a "<" part into "less"; as a single character nixpkgs' table wins.
    assert key_to_qmp("ctrl-<") == [qcode("ctrl"), qcode("less")]
    assert key_to_qmp("<") == [qcode("shift"), number(0x33)]


def test_qkeycodes() -> None:
    assert len(QKEYCODES) == 162
    for name in ("ret", "spc", "esc", "kp_enter", "meta_l", "sysrq", "lang2", "f24", "0"):
        assert name in QKEYCODES
    for name in QKEYCODES:
        assert key_to_qmp(name) == [qcode(name)]


def test_unknown_key_names_the_key_and_the_spec() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'foo' in send_key\('ctrl-foo'\)") as e:
        key_to_qmp("ctrl-foo")
    assert "ret, spc, tab, esc, ctrl-alt-delete" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "hint"),
    [
        ("enter", "'ret'"),
        ("Ret", "lower case"),
        ("ctrl-A", "'shift-a'"),
        ("ctrl--", "0x0C"),
    ],
)
def test_hints(spec: str, hint: str) -> None:
    with pytest.raises(ValueError) as e:
        key_to_qmp(spec)
    assert hint in str(e.value)
    assert repr(spec) in str(e.value)


@pytest.mark.parametrize("spec", ["", "ctrl-", "-ctrl", "0x", "0xZZ", "0x1g", "shift-0x"])
def test_malformed_specs_raise(spec: str) -> None:
    with pytest.raises(ValueError):
        key_to_qmp(spec)
