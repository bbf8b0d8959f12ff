"""Tab completion for the magics: machine names and options, in the kernel and the REPL.

One IPython matcher (API v2) serves both: Jupyter asks IPython's completer, and the REPL's
prompt asks the same completer for lines that start with ``%``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.completer import (
    CompletionContext,
    SimpleCompletion,
    SimpleMatcherResult,
    context_matcher,
)

__all__ = ["make_matcher"]

# Magics whose first argument is one machine, and the rest is free text.
_ONE_MACHINE = frozenset(
    {
        "succeed",
        "fail",
        "execute",
        "sh",
        "wait_for_unit",
        "wait_for_console",
        "screenshot",
        "keys",
        "type",
        "console",
        "shell",
        "shutdown",
        "crash",
    }
)


def _options(parser: argparse.ArgumentParser | None) -> list[str]:
    if parser is None:
        return []
    return sorted(
        opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")
    ) + sorted(
        opt
        for action in parser._actions
        for opt in action.option_strings
        if not opt.startswith("--")
    )


def candidates(
    line: str,
    machine_names: list[str],
    parser_of: Callable[[str], argparse.ArgumentParser | None],
) -> tuple[str, list[str]] | None:
    """The word being completed and its candidates, for a line of one of our magics."""
    stripped = line.lstrip()
    if not stripped.startswith("%"):
        return None
    magic, _, rest = stripped.lstrip("%").partition(" ")
    if not _ or magic not in _ONE_MACHINE | {"start", "machines"}:
        return None
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    if rest.endswith((" ", "\t")) or not rest:
        words.append("")
    current = words[-1]
    before = [w for w in words[:-1] if not w.startswith("-")]
    if current.startswith("-"):
        found = [o for o in _options(parser_of(magic)) if o.startswith(current)]
    elif magic == "machines":
        found = ["add"] if not before and "add".startswith(current) else []
    elif magic == "start":
        found = [n for n in machine_names if n.startswith(current) and n not in before]
        if not current:
            found.append("--all")
    elif not before:
        found = [n for n in machine_names if n.startswith(current)]
    else:
        found = []
    return current, found


def make_matcher(
    machine_names: Callable[[], list[str]],
    parser_of: Callable[[str], argparse.ArgumentParser | None],
) -> Any:
    """An IPython matcher that completes our magics' machine names and options."""

    @context_matcher(identifier="nixos_repl")  # type: ignore[untyped-decorator]
    def nixos_repl_matcher(context: CompletionContext) -> SimpleMatcherResult:
        found = candidates(context.text_until_cursor, machine_names(), parser_of)
        if found is None:
            return {"completions": [], "suppress": False}
        word, names = found
        return {
            "completions": [SimpleCompletion(n, type="machine") for n in names],
            "matched_fragment": word,
            "suppress": bool(names),
        }

    return nixos_repl_matcher
