"""``--batch`` for interactive work: an ``.ipy`` file or a notebook, cell by cell.

Each cell becomes plain Python as its export does (:func:`nixos_repl.export.cell_python`: every
magic is the call the magics' table gives it, on the magic's own line; a magic that only shows
something does nothing) and runs in the driver's namespace like a testScript, so a cell means
exactly what its export means and no IPython shell is involved. Every cell is compiled before
anything starts (a syntax error, or a magic with no testScript call, names its cell and line,
and nothing starts). A failure stops the run with exit status 1 and is reported with the
cell's number and line and the source line. JUnit has a case per subtest when the cells call
``subtest``, else a case per cell.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import linecache
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import TYPE_CHECKING, Any

from .export import Cell, MagicError, cell_python, read_ipy, read_notebook
from .magic_table import Translation

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["CellScript", "CellSyntaxError", "calls_subtest", "is_cell_script"]

log = logging.getLogger("nixos_repl.driver")

SUFFIXES = (".ipy", ".ipynb")


def is_cell_script(path: Path | None) -> bool:
    return path is not None and path.suffix in SUFFIXES


def calls_subtest(tree: ast.AST) -> bool:
    """Whether the code calls ``subtest`` (``with subtest(...)``, ``driver.subtest(...)``), not
    merely says the word."""
    return any(
        isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == "subtest")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "subtest")
        )
        for node in ast.walk(tree)
    )


class CellSyntaxError(Exception):
    """A cell that does not compile; the message names the file, cell and line."""


@dataclass
class CompiledCell:
    cell: Cell
    filename: str  # what tracebacks show: ``nb.ipynb, cell 3``
    code: CodeType


class CellScript:
    """The cells of an ``.ipy`` or ``.ipynb`` file, compiled, ready to run in a driver."""

    def __init__(self, path: Path, cells: list[Cell]) -> None:
        self.path = path
        self.cells = cells
        self.compiled: list[CompiledCell] = []
        self.uses_subtests = False

    @classmethod
    def read(cls, path: Path) -> CellScript:
        """Read ``path`` (ExportError for an unreadable file or one without code); then
        :meth:`compile` it."""
        cells = read_notebook(path) if path.suffix == ".ipynb" else read_ipy(path)
        return cls(path, cells)

    def where(self, cell: Cell, line: int | None) -> str:
        """``t.ipynb, cell 3, line 2`` (an .ipy file names its own line too)."""
        text = f"{self.path.name}, cell {cell.number}"
        if line is not None:
            text += f", line {line}"
            if self.path.suffix == ".ipy":
                text += f" (line {cell.first_line + line - 1} of the file)"
        return text

    def compile(self) -> None:
        """Compile every cell; CellSyntaxError for the first that does not compile."""
        translation = Translation()
        for cell in self.cells:
            filename = f"{self.path}, cell {cell.number}"
            try:
                tree = cell_python(cell.source, translation)
                code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError as e:
                raise self._error(cell, e.lineno, f"SyntaxError: {e.msg}", e.text) from None
            except MagicError as e:
                raise self._error(cell, e.line, str(e)) from None
            lines = cell.source.splitlines(keepends=True)
            linecache.cache[filename] = (len(cell.source), None, lines, filename)
            self.compiled.append(CompiledCell(cell, filename, code))
            self.uses_subtests = self.uses_subtests or calls_subtest(tree)

    def _error(
        self, cell: Cell, line: int | None, message: str, text: str | None = None
    ) -> CellSyntaxError:
        if text is None and line is not None:
            text = (cell.source.splitlines()[line - 1 : line] or [""])[0]
        source_line = (text or "").strip()
        return CellSyntaxError(
            f"{self.where(cell, line)}: {message}" + (f"\n    {source_line}" if source_line else "")
        )

    # -- running -------------------------------------------------------------------------------

    def run(self, driver: Driver) -> None:
        """Run every cell in order; a failure is reported and ends with SystemExit(1).

        JUnit gets one case per cell, unless the cells call ``subtest`` (then one per subtest).
        """
        namespace = driver.test_symbols()
        loop = asyncio.new_event_loop()
        try:
            for compiled in self.compiled:
                if self.uses_subtests:
                    self._run_cell(driver, compiled, namespace, loop)
                else:
                    with driver.logger.subtest(f"cell {compiled.cell.number}"):
                        self._run_cell(driver, compiled, namespace, loop)
        finally:
            loop.close()

    def _run_cell(
        self,
        driver: Driver,
        compiled: CompiledCell,
        namespace: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        try:
            result = eval(compiled.code, namespace)
            if inspect.iscoroutine(result):
                loop.run_until_complete(result)
        except Exception as error:
            driver._hold_if_terminating()
            self.report(driver, compiled, error)
            raise SystemExit(1) from None

    def report(self, driver: Driver, compiled: CompiledCell, error: BaseException) -> None:
        """``!!!`` lines: where (cell and line, the line itself), the cells' frames, the error."""
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if f.filename.startswith(f"{self.path}, cell ")
        ]
        # the cell's own top-level line (deeper frames are in the traceback)
        line = next((f.lineno for f in frames if f.filename == compiled.filename), None)
        logger = driver.logger
        source = compiled.cell.source.splitlines()
        logger.log_test_error(f"{self.where(compiled.cell, line)} failed:")
        if line is not None and line <= len(source):
            logger.log_test_error(f"    {source[line - 1].strip()}")
        if len(frames) > 1:
            logger.log_test_error("Traceback (most recent call last):")
            for frame in frames:
                logger.log_test_error(f'  File "{frame.filename}", line {frame.lineno}')
                if frame.line:
                    logger.log_test_error(f"    {frame.line.strip()}")
        for text in f"{type(error).__name__}: {error}".splitlines():
            logger.log_test_error(text)
