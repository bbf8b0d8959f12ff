"""Tab completion for the magics: machine names and options, in the kernel and the REPL.

One IPython matcher (API v2) serves both: Jupyter asks IPython's completer, and the REPL's
prompt asks the same completer for lines that start with ``%``. Which words are machines, and
the options, come from the magics' table (:data:`nixos_repl.magic_table.MAGICS`).
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

from ..magic_table import MAGICS

__all__ = ["make_matcher"]


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
    labels_of: Callable[[str | None], list[str]] = lambda _: [],
) -> tuple[str, list[str]] | None:
    """The word being completed and its candidates, for a line of one of our magics.

    ``labels_of(name)`` gives a machine's snapshot labels (every machine's for None).
    """
    stripped = line.lstrip()
    if not stripped.startswith("%"):
        return None
    magic, _, rest = stripped.lstrip("%").partition(" ")
    spec = MAGICS.get(magic)
    if not _ or spec is None or not (spec.machines or spec.words):
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
        found = [o for o in _options(spec.parser) if o.startswith(current)]
    elif spec.words:
        found = [w for w in spec.words if w.startswith(current)] if not before else []
    elif spec.machines == "many":
        found = [n for n in machine_names if n.startswith(current) and n not in before]
        if not current:
            found += [o for o in _options(spec.parser) if o.startswith("--")]
    elif spec.labels and "--all" in words and not before:
        found = [label for label in labels_of(None) if label.startswith(current)]
    elif not before:
        found = [n for n in machine_names if n.startswith(current)]
    elif spec.labels and len(before) == 1:
        found = [label for label in labels_of(before[0]) if label.startswith(current)]
    else:
        found = []
    return current, found


def make_matcher(
    machine_names: Callable[[], list[str]],
    labels_of: Callable[[str | None], list[str]] = lambda _: [],
) -> Any:
    """An IPython matcher that completes our magics' machine names, options and snapshot
    labels."""

    @context_matcher(identifier="nixos_repl")  # type: ignore[untyped-decorator]
    def nixos_repl_matcher(context: CompletionContext) -> SimpleMatcherResult:
        found = candidates(context.text_until_cursor, machine_names(), labels_of)
        if found is None:
            return {"completions": [], "suppress": False}
        word, names = found
        return {
            "completions": [SimpleCompletion(n, type="machine") for n in names],
            "matched_fragment": word,
            "suppress": bool(names),
        }

    return nixos_repl_matcher
