"""Export interactive work as a nixpkgs testScript: from a session log, a notebook or an .ipy.

Pure logic, testable without machines: each cell's IPython source is turned into Python
(IPython's own input transformer), then every magic call becomes the method call it wraps
(``%succeed vm1 cmd`` -> ``vm1.succeed("cmd")``, ``%%sh vm1`` -> one ``succeed`` of the cell),
magics that only show things (``%machines``, ``%console``...) become comments, and plain Python
is kept as written. The result uses nixpkgs' names only (no nixos_repl import, no magic) and is
checked with ``compile()`` before it is written.

From a session log (:mod:`nixos_repl.record`) the export knows how each cell ended: a failed
cell keeps the statements before the failing one; the failing statement is left as a comment
saying what failed (or, with ``keep_failures``, turned into the opposite assertion:
``succeed`` <-> ``fail``); the statements after it, which never ran, are comments. A cell cut
short (the process was killed) is replaced by the actions it had finished, as calls.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DriverConfig, container_name_from_start_script
from .driver import Driver, pythonize_name
from .errors import NixosReplError
from .magic_table import (
    DEFAULT_LABEL,
    IPYTHON_SILENT,
    MAGICS,
    NoCall,
    ShowOnly,
    Silent,
    Translation,
    py_str,
)

__all__ = [
    "Cell",
    "ExportError",
    "MagicError",
    "cell_python",
    "export_cells",
    "export_file",
    "ipython_to_python",
    "nixpkgs_symbols",
    "py_str",
    "read_cells",
    "read_ipy",
    "read_notebook",
    "read_session_log",
    "translate_cell",
]

log = logging.getLogger(__name__)

# The tag of a notebook cell that runs (in Jupyter and --batch) but is not exported: set-up
# that only the kernel needs, e.g. building guests when the kernel has no machines.
NO_EXPORT = "no-export"
FORMATS = ".jsonl (a session log), .ipynb (a notebook) or .ipy (IPython syntax)"


class ExportError(NixosReplError):
    """An input that cannot be exported (missing, corrupt, empty, of an unknown format)."""


@dataclass
class Cell:
    """One cell of interactive work and, when known, how it ended."""

    number: int
    source: str
    ok: bool | None = None  # None: not known (a notebook without outputs, or cut short)
    error: str | None = None
    line: int | None = None  # the cell's line where it failed
    finished: bool = True  # False: the session ended inside this cell
    actions: list[dict[str, Any]] = field(default_factory=list)
    first_line: int = 1  # the cell's first line in its file (.ipy)
    export: bool = True  # False: a notebook cell tagged ``no-export`` (set-up for the kernel)


# -- reading ---------------------------------------------------------------------------------


def read_session_log(path: Path) -> tuple[dict[str, Any], list[Cell]]:
    """The header and the cells of a session log (the actions attached to their cells)."""
    header: dict[str, Any] = {}
    ordered: list[Cell] = []
    latest: dict[int, Cell] = {}  # a number may come again (a cell run without history)
    loose: list[dict[str, Any]] = []
    text = _read_text(path, cut_last_line=True)
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s: ignoring a last line cut short: %s", path, line[:60])
                continue
            raise ExportError(
                f"{path}: line {number} is not JSON ({e.msg}); is this a nixos-repl session "
                "log? Each line must be one JSON object"
            ) from None
        if not isinstance(record, dict) or "kind" not in record:
            raise ExportError(
                f'{path}: line {number} is not a session log record (no "kind"); is this a '
                "nixos-repl session log?"
            )
        kind = record["kind"]
        try:
            if kind == "session":
                header = header or record
            elif kind == "cell":
                cell = Cell(int(record["cell"]), str(record.get("source", "")), finished=False)
                latest[cell.number] = cell
                ordered.append(cell)
            elif kind == "cell_end":
                cell_ = latest.get(int(record["cell"]))
                if cell_ is not None:
                    cell_.finished = True
                    cell_.ok = bool(record.get("ok"))
                    cell_.error = record.get("error")
                    line_no = record.get("line")
                    cell_.line = int(line_no) if line_no is not None else None
            elif kind == "action":
                number_ = record.get("cell")
                if number_ is not None and int(number_) in latest:
                    latest[int(number_)].actions.append(record)
                else:
                    loose.append(record)
        except (KeyError, TypeError, ValueError):
            raise ExportError(
                f"{path}: line {number} is not a valid {kind!r} record; is this a nixos-repl "
                "session log?"
            ) from None
    if not header:
        raise ExportError(
            f"{path}: no session header; is this a nixos-repl session log (session-*.jsonl)?"
        )
    if loose:  # actions outside any cell (a library user's session): one cell of calls
        ordered.insert(0, Cell(0, "", finished=False, actions=loose))
    return header, ordered


def read_notebook(path: Path) -> list[Cell]:
    """The code cells of a notebook, numbered from 1; a cell with an error output failed."""
    try:
        nb = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ExportError(
            f"{path}: not a notebook: invalid JSON ({e.msg}, line {e.lineno})"
        ) from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ExportError(f'{path}: not a Jupyter notebook (no "cells" list)')
    cells: list[Cell] = []
    for raw in nb["cells"]:
        if not isinstance(raw, dict) or raw.get("cell_type") != "code":
            continue
        source = raw.get("source", "")
        text = "".join(source) if isinstance(source, list) else str(source)
        cell = Cell(len(cells) + 1, text)
        metadata = raw.get("metadata")
        tags = metadata.get("tags", []) if isinstance(metadata, dict) else []
        cell.export = NO_EXPORT not in tags
        errors = [o for o in raw.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            cell.ok = False
            cell.error = f"{errors[0].get('ename', 'Error')}: {errors[0].get('evalue', '')}"
        cells.append(cell)
    if not cells:
        raise ExportError(f"{path}: the notebook has no code cells; nothing to export or run")
    return cells


_CELL_MARK = re.compile(r"^# ?%%(?:\s.*)?$")


def read_ipy(path: Path) -> list[Cell]:
    """An .ipy file's cells: split at ``# %%`` lines (the percent format), else one cell."""
    text = _read_text(path)
    cells: list[Cell] = []
    current: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if _CELL_MARK.match(line.rstrip("\n")):
            if "".join(current).strip():
                cells.append(Cell(len(cells) + 1, "".join(current), first_line=start))
            current, start = [], number + 1
            continue
        current.append(line)
    if "".join(current).strip():
        cells.append(Cell(len(cells) + 1, "".join(current), first_line=start))
    if not cells:
        raise ExportError(f"{path}: the file has no code; nothing to export or run")
    return cells


def read_cells(path: Path) -> tuple[dict[str, Any], list[Cell]]:
    """Any supported input: a session log, a notebook or an .ipy file."""
    suffix = path.suffix
    if suffix == ".jsonl":
        return read_session_log(path)
    if suffix == ".ipynb":
        return {}, read_notebook(path)
    if suffix == ".ipy":
        return {}, read_ipy(path)
    raise ExportError(f"{path}: unknown format {suffix or '(no suffix)'!r}; export takes {FORMATS}")


def _read_text(path: Path, *, cut_last_line: bool = False) -> str:
    """The file's text. With ``cut_last_line`` (a log appended to by a process that may have
    been killed), a last line without its newline that was cut inside a UTF-8 character keeps
    its bytes as U+FFFD, for the reader to drop as a line cut short."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ExportError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise ExportError(f"{path}: cannot read it: {e.strerror}") from None
    last = data.rfind(b"\n") + 1
    try:
        if cut_last_line and last < len(data):
            return data[:last].decode() + data[last:].decode(errors="replace")
        return data.decode()
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not a text file (not UTF-8)") from None


# -- Python literals -------------------------------------------------------------------------


def _py_value(value: Any) -> tuple[str, set[str]]:
    """A recorded argument as Python source, and the imports it needs."""
    if isinstance(value, str):
        return py_str(value), set()
    if isinstance(value, dict) and set(value) == {"timedelta"}:
        return f"datetime.timedelta(seconds={float(value['timedelta'])!r})", {"datetime"}
    if isinstance(value, dict) and set(value) == {"repr"}:
        return str(value["repr"]), set()
    if isinstance(value, list):
        parts = [_py_value(v) for v in value]
        imports = set().union(*(p[1] for p in parts)) if parts else set()
        return "[" + ", ".join(p[0] for p in parts) + "]", imports
    return repr(value), set()


def _var(name: str) -> str:
    return pythonize_name(name)


def magic_statements(method: str, args: list[str], translation: Translation) -> list[str]:
    """The statements a ``get_ipython().METHOD(*args)`` call stands for, from the magics'
    table; NoCall (ShowOnly, Silent) saying why when there are none."""
    if method in ("run_line_magic", "run_cell_magic") and args:
        name = args[0]
        spec = MAGICS.get(name)
        if spec is not None:
            body = args[2] if method == "run_cell_magic" and len(args) == 3 else None
            return spec.calls(args[1] if len(args) > 1 else "", body, translation)
        if method == "run_line_magic" and name in IPYTHON_SILENT:
            raise Silent(IPYTHON_SILENT[name])
        if method == "run_cell_magic":
            raise NoCall(f"the cell magic %%{name} has no testScript equivalent")
        raise NoCall(f"%{name} is not a nixos-repl machine magic")
    if method in ("system", "getoutput"):
        raise NoCall("a host shell command is not part of a testScript")
    raise NoCall(f"{_magic_text(method, args)} is IPython's, not nixpkgs'")


# -- translating a cell ----------------------------------------------------------------------


@dataclass
class Statement:
    """One top-level statement of a translated cell: its Python text, or why it is a comment."""

    lines: tuple[int, int]  # first and last line in the cell (1-based)
    text: str
    original: str
    problem: str | None = None  # set: the statement cannot be exported as it is

    def commented(self, why: str | None = None) -> list[str]:
        head = [f"# {why or self.problem}:"] if (why or self.problem) else []
        return head + [f"# {line}" if line else "#" for line in self.original.splitlines()]


def _ipython_call(node: ast.AST) -> tuple[str, list[str]] | None:
    """``get_ipython().METHOD('a', 'b')`` -> (METHOD, ['a', 'b'])."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    inner = node.func.value
    if not (
        isinstance(inner, ast.Call)
        and isinstance(inner.func, ast.Name)
        and inner.func.id == "get_ipython"
    ):
        return None
    args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return node.func.attr, args


def _offsets(text: str) -> list[int]:
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def _magic_text(method: str, args: list[str]) -> str:
    if method == "run_cell_magic" and len(args) >= 3:
        return f"%%{args[0]} {args[1]}".rstrip() + "\n" + args[2].rstrip("\n")
    if method == "run_line_magic" and len(args) >= 2:
        return f"%{args[0]} {args[1]}".rstrip()
    if method == "system" and args:
        return f"!{args[0]}"
    if method == "getoutput" and args:
        return f"!{args[0]}"
    return f"get_ipython().{method}(...)"


def _aio_sync(node: ast.expr, source: str) -> list[str] | None:
    """``await vm1.aio.succeed(x)`` and ``await asyncio.gather(<those>)`` as blocking calls."""

    def one(call: ast.expr) -> str | None:
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and isinstance(call.func.value, ast.Attribute)
            and call.func.value.attr == "aio"
        ):
            whole = ast.get_source_segment(source, call) or ""
            func = ast.get_source_segment(source, call.func) or ""
            target = ast.get_source_segment(source, call.func.value.value) or ""
            return f"{target}.{call.func.attr}{whole[len(func) :]}"
        return None

    if not isinstance(node, ast.Await):
        return None
    value = node.value
    single = one(value)
    if single is not None:
        return [single]
    if (
        isinstance(value, ast.Call)
        and ast.unparse(value.func) in ("asyncio.gather", "gather")
        and not value.keywords
    ):
        calls = [one(arg) for arg in value.args]
        if calls and all(c is not None for c in calls):
            return [c for c in calls if c is not None]
    return None


def ipython_to_python(source: str) -> str:
    """A cell's IPython syntax as Python (IPython's own input transformer): magics become
    ``get_ipython()`` calls on the lines they were on. SyntaxError for a cell that is not
    valid IPython."""
    from IPython.core import inputtransformer2

    transformer: Any = inputtransformer2.TransformerManager
    manager = transformer()
    return str(manager.transform_cell(source))


def translate_cell(source: str, translation: Translation | None = None) -> list[Statement]:
    """A cell's top-level statements with their magics replaced by nixpkgs calls.

    A statement that cannot be exported keeps its source and says why (``problem``); a cell
    with a syntax error is one such statement.
    """
    translation = translation or Translation()
    original_lines = source.splitlines()
    try:
        python = ipython_to_python(source)
        tree = ast.parse(python)
    except SyntaxError as e:
        return [Statement((1, max(len(original_lines), 1)), "", source, f"syntax error: {e.msg}")]
    py_lines = python.splitlines(keepends=True)
    starts = _offsets(python)
    result: list[Statement] = []
    for stmt in tree.body:
        first, last = stmt.lineno, stmt.end_lineno or stmt.lineno
        text = "".join(py_lines[first - 1 : last])
        original = "\n".join(original_lines[first - 1 : last]) if original_lines else text
        if len(tree.body) == 1 and text.startswith("get_ipython().run_cell_magic"):
            original = source.rstrip("\n")
        base = starts[first - 1]
        edits: list[tuple[int, int, str]] = []
        problem: str | None = None
        parents = {id(c): p for p in ast.walk(stmt) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(stmt):
            call = _ipython_call(node)
            if call is None:
                continue
            method, args = call
            assert isinstance(node, ast.expr)
            magic = _magic_text(method, args)
            try:
                calls = magic_statements(method, args, translation)
            except NoCall as e:
                parent = parents.get(id(node))
                if parent is stmt and isinstance(e, Silent):
                    problem = ""  # left out
                    break
                if isinstance(parent, ast.Expr) and parent is not stmt:  # inside a block
                    indent = " " * parent.col_offset
                    edits.append((*_span(parent, starts, base), f"pass  # {magic}: {e}"))
                    continue
                problem = f"not exported ({magic.splitlines()[0]}: {e})"
                break
            parent = parents.get(id(node))
            if isinstance(parent, ast.Expr):
                indent = " " * parent.col_offset
                edits.append((*_span(parent, starts, base), f"\n{indent}".join(calls)))
            elif len(calls) == 1:
                edits.append((*_span(node, starts, base), calls[0]))
            else:
                problem = f"not exported ({magic}: several calls where one value is needed)"
                break
        if problem == "":
            continue
        if problem is None:
            for start, end, new in sorted(edits, reverse=True):
                text = text[:start] + new + text[end:]
            if "get_ipython" in text:
                problem = "not exported (it uses IPython)"
        if problem is None and _has_await(stmt):
            sync = _aio_sync(stmt.value, python) if isinstance(stmt, ast.Expr) else None
            if sync is not None:
                text = "\n".join(sync) + "\n"
            else:
                problem = "not exported (top-level await: a testScript runs one call at a time)"
        result.append(Statement((first, last), text.rstrip("\n"), original, problem))
    return result


class MagicError(ExportError):
    """A magic with no testScript call in a cell that must run as plain Python."""

    def __init__(self, line: int, magic: str, reason: str) -> None:
        super().__init__(f"{magic.split()[0]} has no testScript call: {reason}")
        self.line = line


def cell_python(source: str, translation: Translation) -> ast.Module:
    """A cell as plain Python, line for line, as ``--batch`` runs it: each magic replaced by the
    calls its export has, on the magic's line (so tracebacks name the cell's own lines); a
    magic that only shows something becomes nothing (``pass``, or ``None`` as a value).

    SyntaxError for a cell that does not parse; MagicError for a magic with no testScript call.
    """
    tree = ast.parse(ipython_to_python(source))

    def calls(node: ast.expr) -> list[ast.stmt] | None:
        """The statements of the magic ``node`` is, at its place; None: it only shows."""
        call = _ipython_call(node)
        assert call is not None
        try:
            statements = magic_statements(*call, translation)
        except ShowOnly:
            return None
        except NoCall as e:
            raise MagicError(node.lineno, _magic_text(*call), str(e)) from None
        body = ast.parse("\n".join(statements)).body
        for new in body:
            for child in ast.walk(new):
                if "lineno" in child._attributes:
                    ast.copy_location(child, node)
        return body

    class Magics(ast.NodeTransformer):
        def visit_Expr(self, node: ast.Expr) -> Any:
            if _ipython_call(node.value) is None:
                return self.generic_visit(node)
            return calls(node.value) or ast.copy_location(ast.Pass(), node)

        def visit_Call(self, node: ast.Call) -> Any:
            self.generic_visit(node)
            if _ipython_call(node) is None:
                return node
            body = calls(node)
            if body is None:
                return ast.copy_location(ast.Constant(None), node)
            if len(body) != 1 or not isinstance(body[0], ast.Expr):
                call = _ipython_call(node)
                assert call is not None
                raise MagicError(node.lineno, _magic_text(*call), "several calls, not one value")
            return body[0].value

    module: ast.Module = ast.fix_missing_locations(Magics().visit(tree))
    return module


def _has_await(stmt: ast.stmt) -> bool:
    for node in ast.walk(stmt):
        if isinstance(node, ast.AsyncFunctionDef | ast.Lambda):
            return False
        if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith):
            return True
    return False


def _span(node: ast.AST, starts: list[int], base: int) -> tuple[int, int]:
    lineno, col = getattr(node, "lineno"), getattr(node, "col_offset")  # noqa: B009
    end_lineno, end_col = getattr(node, "end_lineno"), getattr(node, "end_col_offset")  # noqa: B009
    return starts[lineno - 1] + col - base, starts[end_lineno - 1] + end_col - base


# -- a whole script --------------------------------------------------------------------------

_OPPOSITE = {"succeed": "fail", "fail": "succeed"}


def _method_call(text: str) -> ast.Call | None:
    """The call when ``text`` is one statement calling a method (``x.m(...)``), else None."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return None
    call = tree.body[0].value
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
        return call
    return None


def _opposite(text: str) -> str | None:
    """``vm1.succeed("x")`` -> ``vm1.fail("x")`` (and back); None for anything else."""
    call = _method_call(text)
    if call is None or not isinstance(call.func, ast.Attribute):
        return None
    other = _OPPOSITE.get(call.func.attr)
    func = ast.get_source_segment(text, call.func)
    if other is None or func is None or not func.endswith(call.func.attr):
        return None
    start = _offsets(text)[call.func.lineno - 1] + call.func.col_offset
    end = start + len(func)
    return text[: end - len(call.func.attr)] + other + text[end:]


def action_call(record: dict[str, Any]) -> tuple[str, set[str]]:
    """A recorded action as the call it was: ``vm1.succeed("true")``."""
    imports: set[str] = set()
    parts = []
    for arg in record.get("args", []):
        text, needs = _py_value(arg)
        parts.append(text)
        imports |= needs
    for key, value in record.get("kwargs", {}).items():
        text, needs = _py_value(value)
        parts.append(f"{key}={text}")
        imports |= needs
    machine = record.get("machine")
    target = f"{_var(str(machine))}." if machine else ""
    return f"{target}{record.get('action')}({', '.join(parts)})", imports


@dataclass
class Exported:
    """A testScript, how many of its statements are code and how many comments, and the names
    it reads that are neither nixpkgs' nor defined in it (nor machines)."""

    text: str
    statements: int
    commented: int
    unknown: list[str] = field(default_factory=list)


@dataclass
class _Step:
    """One entry of an exported cell: a statement (``code``) or comment lines."""

    cell: int
    group: int  # the cell's place in the export (a number may come again)
    lines: list[str]
    code: bool = False
    statement: bool = False  # comment lines that stand for a statement (counted as commented)
    undone_by: str | None = None  # the restore that undid it


def export_cells(
    cells: Sequence[Cell],
    *,
    keep_failures: bool = False,
    keep_undone: bool = False,
    source: str = "",
    machines: dict[str, str] | None = None,
    vlans: Sequence[int] | None = None,
    containers: Sequence[str] = (),
) -> Exported:
    """The testScript for ``cells``; ExportError when nothing in them is code.

    ``machines`` (name -> start script, from a session log) and ``vlans`` go in the header's
    replay line; names the script reads that nixpkgs does not define are listed there too.
    ``containers`` (names) are not waited for with ``connect()``, which nixpkgs' containers
    lack: their first command waits for them.
    The export follows the surviving timeline: the steps on a machine between a snapshot and
    a restore of it were undone, so they are left out (``keep_undone``: kept as comments), and
    the snapshots and restores themselves (nixos-repl's, not nixpkgs') become comments.
    """
    translation = Translation(containers)
    steps: list[_Step] = []
    imports: set[str] = set()
    for group, cell in enumerate(cells):
        if not cell.export:
            continue

        def code(text: str, cell: Cell = cell, group: int = group) -> None:
            steps.append(_Step(cell.number, group, [text], code=True))

        def comment(
            lines: list[str], cell: Cell = cell, group: int = group, statement: bool = True
        ) -> None:
            steps.append(_Step(cell.number, group, lines, statement=statement))

        if not cell.finished:
            comment(
                [f"# cell {cell.number} was cut short; the actions it had finished:"],
                statement=False,
            )
            for record in cell.actions:
                call, needs = action_call(record)
                if record.get("ok"):
                    code(call)
                    imports |= needs
                else:
                    comment([f"# failed: {call}: {record.get('error', 'error')}"])
            continue
        translated = translate_cell(cell.source, translation)
        for stmt in translated:
            failed_here = (
                cell.ok is False
                and cell.line is not None
                and stmt.lines[0] <= cell.line <= stmt.lines[1]
            )
            after_failure = cell.ok is False and cell.line is not None and stmt.lines[0] > cell.line
            unknown_failure = cell.ok is False and cell.line is None
            if failed_here or (unknown_failure and len(translated) == 1):
                opposite = _opposite(stmt.text) if keep_failures else None
                if opposite is not None and stmt.problem is None:
                    comment(
                        [f"# this failed in cell {cell.number} ({cell.error}):"], statement=False
                    )
                    code(opposite)
                else:
                    comment(stmt.commented(f"failed in cell {cell.number}: {cell.error}"))
            elif after_failure:
                comment(stmt.commented(f"not run (cell {cell.number} failed above)"))
            elif unknown_failure:
                comment(stmt.commented(f"cell {cell.number} failed ({cell.error})"))
            elif stmt.problem is not None:
                comment(stmt.commented())
            else:
                code(stmt.text)
    _follow_timeline(steps)
    out: list[str] = []
    statements = commented = 0
    current: int | None = None
    for step in steps:
        if step.undone_by is not None and not keep_undone:
            commented += 1
            continue
        if step.group != current:
            if current is not None:
                out.append("")
            out.append(f"# cell {step.cell}" if step.cell else "# actions")
            current = step.group
        if step.undone_by is not None:
            out.append(f"# undone by {step.undone_by}:")
            out += [f"# {line}" if line else "#" for line in step.lines[0].splitlines()]
            commented += 1
        elif step.code:
            out += step.lines
            statements += 1
        else:
            out += step.lines
            commented += step.statement
    if out:
        out.append("")
    if statements == 0:
        where = f" {source}" if source else ""
        raise ExportError(
            f"nothing to export: the session{where} has no machine action or code to replay "
            "(nothing was written)"
        )
    body = "\n".join(out)
    try:
        compile(body, source or "<export>", "exec")
    except SyntaxError as e:  # a defect here: say so rather than write a broken script
        raise ExportError(
            f"the exported script does not compile (line {e.lineno}: {e.msg})"
        ) from None
    known = {_var(m) for m in machines or {}}
    used_machines, unknown = free_names(body, known)
    head = ["# A NixOS testScript (nixpkgs' test driver API), exported by nixos-repl"]
    if source:
        head.append(f"# from {source}")
    if machines:
        head.append("# machines: " + ", ".join(sorted(machines)))
        scripts = " ".join(machines[m] for m in sorted(machines))
        numbers = " ".join(str(v) for v in vlans or [])
        head.append(
            f"# replay: nixos-repl --batch THIS_FILE --start-scripts {scripts}"
            + (f" --vlans {numbers}" if numbers else "")
        )
    elif used_machines:
        head.append("# machines: " + ", ".join(sorted(used_machines)))
    if unknown:
        head.append(
            "# note: not nixpkgs test symbols nor defined here: " + ", ".join(sorted(unknown))
        )
    head += [f"import {name}" for name in sorted(imports)]
    text = "\n".join([*head, "", *out]).rstrip("\n") + "\n"
    return Exported(text, statements, commented, sorted(unknown))


# Snapshot steps (nixos-repl's, not nixpkgs'): method -> what it does to the timeline.
_REWINDS = {
    "snapshot": "save",
    "snapshot_all": "save",
    "restore": "restore",
    "restore_all": "restore",
    "delete_snapshot": "",
    "snapshots": "",
}
# Names whose use acts on every machine.
_ALL_MACHINES = frozenset({"machines", "start_all", "join_all", "driver"})


def _rewind(text: str) -> tuple[str, str | None, str | None] | None:
    """A snapshot step: (``save``/``restore``/``""``, the machine or None for all, the label or
    None when it is not a literal); None for any other statement."""
    call = _method_call(text)
    if call is None or not isinstance(call.func, ast.Attribute):
        return None
    kind = _REWINDS.get(call.func.attr)
    if kind is None or not isinstance(call.func.value, ast.Name):
        return None
    machine = None if call.func.attr.endswith("_all") else call.func.value.id
    given = call.args[0] if call.args else next((k.value for k in call.keywords), None)
    if given is None:
        label: str | None = DEFAULT_LABEL
    elif isinstance(given, ast.Constant) and isinstance(given.value, str):
        label = given.value
    else:
        label = None
    return kind, machine, label


def _names(text: str) -> set[str]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set()
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _follow_timeline(steps: list[_Step]) -> None:
    """Mark the steps a restore undid, and turn snapshot steps into comments.

    A restore of machine M to label L undoes the steps on M since the last snapshot L of M (or
    of every machine); a restore of every machine undoes the steps on any machine. A step is
    on M when it names M (or ``machines``, ``start_all``...). Host-side steps stay.
    """
    from .machine import Machine

    methods = {name for name in dir(Machine) if not name.startswith("_")}
    machines: set[str] = set()
    for step in steps:
        if step.code:
            tree = ast.parse(step.lines[0])
            machines |= {
                node.value.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr in methods
            }
    saved: dict[tuple[str | None, str], int] = {}
    for j, step in enumerate(steps):
        if not step.code or step.undone_by is not None:
            continue
        rewind = _rewind(step.lines[0])
        if rewind is None:
            continue
        kind, machine, label = rewind
        call = step.lines[0]
        step.code, step.statement = False, True
        step.lines = [f"# {call}  (a snapshot step: nixos-repl's, not in nixpkgs)"]
        if label is None or not kind:
            continue
        if kind == "save":
            saved[(machine, label)] = j
            continue
        targets = [machine] if machine is not None else sorted(machines)
        undone = False
        for target in targets:
            start = max(saved.get((target, label), -1), saved.get((None, label), -1))
            if start < 0:
                continue
            undone = True
            for k in range(start + 1, j):
                other = steps[k]
                names = _names(other.lines[0]) if other.code else set()
                if other.undone_by is None and names & {target, *_ALL_MACHINES}:
                    other.undone_by = f"{call} in cell {step.cell}"
        if not undone:
            step.lines.append(
                "# (its snapshot was taken before what this exports: check the steps)"
            )


@functools.cache
def nixpkgs_symbols() -> frozenset[str]:
    """The globals nixpkgs gives a test script besides one per machine and ``vlan<N>``: those
    of a test script's :meth:`Driver.test_symbols` (``Driver.symbol_names()``; not the
    prompt's ``rebuild``), and ``machine`` for a lone machine."""
    return frozenset([*Driver(DriverConfig()).symbol_names(), "machine"])


_VLAN = re.compile(r"vlan\d+\Z")


def free_names(text: str, machines: set[str]) -> tuple[set[str], set[str]]:
    """Names ``text`` reads but never binds, beyond builtins and nixpkgs' symbols: the machines
    (``machines``, or if none are known those used like one: ``x.succeed(...)``), and the
    others."""
    import builtins

    from .machine import Machine

    tree = ast.parse(text)
    bound: set[str] = set()
    loaded: dict[str, ast.Name] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                loaded.setdefault(node.id, node)
            else:
                bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    methods = {name for name in dir(Machine) if not name.startswith("_")}
    as_machine = {
        node.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.attr in methods
    }
    free = {
        name
        for name in loaded
        if name not in bound
        and name not in nixpkgs_symbols()
        and not _VLAN.match(name)
        and not hasattr(builtins, name)
    }
    # with the machines known (a session log), only they are machines; else guess from use
    used_machines = {n for n in free if n in machines or (not machines and n in as_machine)}
    return used_machines, free - used_machines - machines


def export_file(
    source: Path,
    target: Path,
    *,
    keep_failures: bool = False,
    keep_undone: bool = False,
    skip_cells: Iterable[int] = (),
) -> Exported:
    """Export ``source`` (session log, notebook or .ipy) to ``target``, written atomically."""
    from .files import write_atomic

    if _same_file(source, target):
        raise ExportError(
            f"{target} is {source} itself: writing the testScript there would destroy what it "
            "is exported from; choose another output file (nothing was written)"
        )
    header, cells = read_cells(source)
    machines: dict[str, str] = header.get("machines") or {}
    skip = set(skip_cells)  # the cell running the export: not finished yet
    cells = [c for c in cells if c.finished or c.number not in skip]
    if not cells:
        raise ExportError(f"nothing to export: {source} has no cells (nothing was written)")
    exported = export_cells(
        cells,
        keep_failures=keep_failures,
        keep_undone=keep_undone,
        source=str(source),
        machines=machines or None,
        vlans=header.get("vlans") or None,
        containers=header.get("containers")
        or [n for n, s in machines.items() if container_name_from_start_script(s)],
    )
    try:
        write_atomic(target, exported.text.encode())
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from None
    return exported


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (the same inode, or the same path resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()
