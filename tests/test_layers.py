"""The package's imports follow the layers the README's architecture section lists.

Every import counts, read from the source with ``ast``: at module level, inside functions and
under ``TYPE_CHECKING``. A module may import from its own layer or a lower one, and no set of
modules may import each other in a circle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nixos_repl"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, is_package: bool, source: str, modules: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (a name imported from a package
    counts as that submodule when it is one, else as the package)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nixos_repl")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "nixos_repl":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    names = set(modules)
    return {
        n: imports_of(n, p.name == "__init__.py", p.read_text(), names) for n, p in modules.items()
    }


def readme_layers() -> list[list[str]]:
    """The layers listed between the README's ``<!-- layers -->`` markers, lowest first; each
    a list of module names or package prefixes (``nixos_repl.machine.``)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layers -->\n(.*?)<!-- /layers -->", text, re.S)
    assert block, "the README's architecture section lost its <!-- layers --> list"
    layers = []
    for line in block.group(1).splitlines():
        entries = []
        for item in re.findall(r"`([^`]+)`", line):
            if item == "__init__.py":
                entries.append("nixos_repl")
            elif item.endswith("/"):
                entries.append(f"nixos_repl.{item[:-1]}.")
            else:
                entries.append(f"nixos_repl.{item.removesuffix('.py')}")
        layers.append(entries)
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    for rank, entries in enumerate(layers):
        for entry in entries:
            if module == entry or (entry.endswith(".") and f"{module}.".startswith(entry)):
                return rank
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> set[tuple[str, str]]:
    found = set()
    for module, targets in graph.items():
        own = layer_of(module, layers)
        for target in targets:
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and theirs > own:
                found.add((module, target))
    return found


def test_every_module_has_a_layer_in_the_readme() -> None:
    layers = readme_layers()
    assert len(layers) >= 7
    missing = [m for m in package_modules() if layer_of(m, layers) is None]
    assert not missing, f"modules the README's layer list does not place: {missing}"


def test_no_import_circles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_nothing_imports_from_a_higher_layer() -> None:
    upward = upward_imports(import_graph(), readme_layers())
    unexpected = sorted(upward)
    assert not unexpected, "imports from a higher layer: " + ", ".join(
        f"{a} -> {b}" for a, b in unexpected
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import nixos_repl.driver\n", {"nixos_repl.driver"}),
        ("def f():\n    from ..driver import Driver\n", {"nixos_repl.driver"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import api\n",
            {"nixos_repl.machine.api"},
        ),
        ("from . import Machine\n", {"nixos_repl.machine"}),
    ],
)
def test_imports_are_read_everywhere_in_a_module(source: str, expected: set[str]) -> None:
    modules = {"nixos_repl.driver", "nixos_repl.machine", "nixos_repl.machine.api"}
    assert imports_of("nixos_repl.machine.waits", False, source, modules) == expected


def test_a_circle_and_an_upward_import_are_found() -> None:
    layers = [["nixos_repl.errors"], ["nixos_repl.machine."], ["nixos_repl.driver"]]
    graph = {
        "nixos_repl.machine.a": {"nixos_repl.machine.b"},
        "nixos_repl.machine.b": {"nixos_repl.machine.a", "nixos_repl.driver"},
        "nixos_repl.driver": {"nixos_repl.errors"},
    }
    assert find_cycle(graph) == [
        "nixos_repl.machine.a",
        "nixos_repl.machine.b",
        "nixos_repl.machine.a",
    ]
    assert upward_imports(graph, layers) == {("nixos_repl.machine.b", "nixos_repl.driver")}
