"""Key names for ``send_key``: nixpkgs' character table and the QMP ``send-key`` encoding.

nixpkgs sends keys with the HMP command ``sendkey <spec>``; here they go over QMP ``send-key``,
so a spec is parsed the way HMP's ``sendkey`` parses it: parts joined by ``-`` are pressed
together, each part either a QKeyCode name (``ret``, ``ctrl``, ``f2``...) or a hex scancode
(``0x0C``). Characters are first looked up in :data:`CHAR_TO_KEY`, exactly like nixpkgs does.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CHAR_TO_KEY", "QKEYCODES", "key_to_qmp"]

# nixpkgs' US-layout table (test-driver ``machine.py``), plus ``\t`` which nixpkgs forgets:
# there a tab reaches HMP as a literal tab character and the whole ``sendkey`` fails.
CHAR_TO_KEY: Final[dict[str, str]] = {
    **{chr(c): f"shift-{chr(c).lower()}" for c in range(ord("A"), ord("Z") + 1)},
    "-": "0x0C",
    "_": "shift-0x0C",
    "=": "0x0D",
    "+": "shift-0x0D",
    "[": "0x1A",
    "{": "shift-0x1A",
    "]": "0x1B",
    "}": "shift-0x1B",
    ";": "0x27",
    ":": "shift-0x27",
    "'": "0x28",
    '"': "shift-0x28",
    "`": "0x29",
    "~": "shift-0x29",
    "\\": "0x2B",
    "|": "shift-0x2B",
    ",": "0x33",
    "<": "shift-0x33",
    ".": "0x34",
    ">": "shift-0x34",
    "/": "0x35",
    "?": "shift-0x35",
    " ": "spc",
    "\n": "ret",
    "!": "shift-0x02",
    "@": "shift-0x03",
    "#": "shift-0x04",
    "$": "shift-0x05",
    "%": "shift-0x06",
    "^": "shift-0x07",
    "&": "shift-0x08",
    "*": "shift-0x09",
    "(": "shift-0x0A",
    ")": "shift-0x0B",
    "\t": "tab",
}

# QEMU's QKeyCode enum (qapi/ui.json), in declaration order. f13..f24 exist since QEMU 8.0;
# an older QEMU rejects them in ``send-key`` with a GenericError.
QKEYCODES: Final[frozenset[str]] = frozenset(
    [
        "unmapped",
        "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "menu", "esc",
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "0",
        "minus", "equal", "backspace", "tab",
        "q", "w", "e", "r", "t", "y", "u", "i", "o", "p",
        "bracket_left", "bracket_right", "ret",
        "a", "s", "d", "f", "g", "h", "j", "k", "l",
        "semicolon", "apostrophe", "grave_accent", "backslash",
        "z", "x", "c", "v", "b", "n", "m",
        "comma", "dot", "slash", "asterisk", "spc", "caps_lock",
        "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10",
        "num_lock", "scroll_lock",
        "kp_divide", "kp_multiply", "kp_subtract", "kp_add", "kp_enter", "kp_decimal",
        "sysrq",
        "kp_0", "kp_1", "kp_2", "kp_3", "kp_4", "kp_5", "kp_6", "kp_7", "kp_8", "kp_9",
        "less", "f11", "f12", "print",
        "home", "pgup", "pgdn", "end", "left", "up", "down", "right", "insert", "delete",
        "stop", "again", "props", "undo", "front", "copy", "open", "paste", "find", "cut",
        "lf", "help", "meta_l", "meta_r", "compose", "pause",
        "ro", "hiragana", "henkan", "yen", "muhenkan", "katakanahiragana",
        "kp_comma", "kp_equals", "power", "sleep", "wake",
        "audionext", "audioprev", "audiostop", "audioplay", "audiomute",
        "volumeup", "volumedown", "mediaselect", "mail", "calculator", "computer",
        "ac_home", "ac_back", "ac_forward", "ac_refresh", "ac_bookmarks",
        "lang1", "lang2",
        "f13", "f14", "f15", "f16", "f17", "f18", "f19", "f20", "f21", "f22", "f23", "f24",
    ]
)  # fmt: skip

# Spellings HMP's ``sendkey`` accepts that are not QKeyCode names ("compatible with old
# interface", monitor/hmp-cmds.c). Everything else HMP takes is an exact QKeyCode name.
_HMP_ALIASES: Final[dict[str, str]] = {"<": "less"}

# Names people commonly try; they are rejected (HMP rejects them too) with a hint.
_SUGGESTIONS: Final[dict[str, str]] = {
    "enter": "ret",
    "return": "ret",
    "space": "spc",
    "escape": "esc",
    "del": "delete",
    "control": "ctrl",
    "bksp": "backspace",
    "pageup": "pgup",
    "pagedown": "pgdn",
    "page_up": "pgup",
    "page_down": "pgdn",
    "super": "meta_l",
    "win": "meta_l",
    "meta": "meta_l",
    "altgr": "alt_r",
    "capslock": "caps_lock",
    "printscreen": "print",
}

_ACCEPTED = "use a QEMU key name such as ret, spc, tab, esc, ctrl-alt-delete, or a single character"

_MAX_SCANCODE = 2**31 - 1  # HMP parses it into a C int


def _hint(part: str) -> str:
    if part in CHAR_TO_KEY:
        return f" (inside a combination write {part!r} as {CHAR_TO_KEY[part]!r})"
    lower = part.lower()
    if lower in QKEYCODES:
        return f" (key names are lower case: {lower!r})"
    if lower in _SUGGESTIONS:
        return f" (did you mean {_SUGGESTIONS[lower]!r}?)"
    return ""


def _parse_part(part: str, spec: str) -> dict[str, object]:
    if part.startswith("0x"):
        digits = part[2:]
        if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
            value = int(digits, 16)
            if value <= _MAX_SCANCODE:
                return {"type": "number", "data": value}
        raise ValueError(
            f"bad scancode {part!r} in send_key({spec!r}): "
            "a scancode is 0x followed by hex digits, e.g. 0x0C"
        )
    name = _HMP_ALIASES.get(part, part)
    if name in QKEYCODES:
        return {"type": "qcode", "data": name}
    raise ValueError(f"unknown key {part!r} in send_key({spec!r}){_hint(part)}: {_ACCEPTED}")


def key_to_qmp(key: str) -> list[dict[str, object]]:
    """Translate one ``send_key`` spec into the ``keys`` argument of QMP ``send-key``.

    ``key`` is a single character (looked up in :data:`CHAR_TO_KEY`, so ``"A"`` is
    ``shift-a`` and ``"-"`` is scancode ``0x0C``) or an HMP ``sendkey`` spec: ``-``-joined
    QKeyCode names and ``0x`` hex scancodes pressed together, e.g. ``ctrl-alt-delete``,
    ``alt-f2``, ``shift-0x0C``.

    Raises ``ValueError`` naming the offending part for an empty spec or an unknown key.
    """
    if not isinstance(key, str):
        raise TypeError(f"send_key() takes a string, not {type(key).__name__}")
    spec = CHAR_TO_KEY.get(key, key)
    if not spec:
        raise ValueError(f"send_key({key!r}) needs a key: {_ACCEPTED}")
    keys: list[dict[str, object]] = []
    for part in spec.split("-"):
        if not part:
            hint = " (to press '-' in a combination use its scancode 0x0C)" if "--" in spec else ""
            raise ValueError(f"empty key name in send_key({key!r}){hint}: {_ACCEPTED}")
        keys.append(_parse_part(part, key))
    return keys
