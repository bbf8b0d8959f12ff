"""``--batch`` for interactive work: an ``.ipy`` file or a notebook, cell by cell.

The cells run in the driver's namespace through an IPython shell with the nixos-repl extension
loaded, so magics mean what they mean at the prompt; the machines and log are the batch run's.
Every cell is transformed and compiled before anything starts (a syntax error names its cell
and line, and nothing starts). A failure stops the run with exit status 1 and is reported with
the cell's number and line and the source line; JUnit has a case per subtest, else per cell.
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

from .export import Cell, read_ipy, read_notebook

if TYPE_CHECKING:
    from .driver import Driver

__all__ = ["CellScript", "CellSyntaxError", "is_cell_script"]

log = logging.getLogger("nixos_repl.driver")

SUFFIXES = (".ipy", ".ipynb")


def is_cell_script(path: Path | None) -> bool:
    return path is not None and path.suffix in SUFFIXES


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
        self.shell: Any = None

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
        from IPython.core import inputtransformer2

        transformer: Any = inputtransformer2.TransformerManager
        manager = transformer()
        for cell in self.cells:
            filename = f"{self.path}, cell {cell.number}"
            try:
                python = manager.transform_cell(cell.source)
                code = compile(python, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            except SyntaxError as e:
                source_line = (e.text or "").strip()
                raise CellSyntaxError(
                    f"{self.where(cell, e.lineno)}: SyntaxError: {e.msg}"
                    + (f"\n    {source_line}" if source_line else "")
                ) from None
            lines = cell.source.splitlines(keepends=True)
            linecache.cache[filename] = (len(cell.source), None, lines, filename)
            self.compiled.append(CompiledCell(cell, filename, code))

    # -- running -------------------------------------------------------------------------------

    def make_shell(self, driver: Driver) -> Any:
        """An IPython shell over the driver's namespace with the extension (and no prompt)."""
        from .interactive.live import PlainSink
        from .interactive.repl import plain_shell
        from .interactive.session import Session, set_current
        from .logs import ROOT_LOGGER

        session = Session(driver, PlainSink(), owns_driver=False)
        # nixpkgs' log handlers of the batch run show what happens, not the prompt's.
        logging.getLogger(ROOT_LOGGER).removeHandler(session.handler)
        set_current(session)
        self.session = session
        self.shell = plain_shell(driver.test_symbols())
        return self.shell

    def close(self) -> None:
        """Drop the shell (so that a REPL can open its own), keep the namespace."""
        from .interactive.repl import forget_shell
        from .interactive.session import set_current

        if self.shell is not None:
            forget_shell()
            self.shell = None
            self.session.close()
            set_current(None)

    def run(self, driver: Driver) -> None:
        """Run every cell in order; a failure is reported and ends with SystemExit(1).

        JUnit gets one case per cell, unless the cells use subtests (then one per subtest).
        """
        if self.shell is None:
            self.make_shell(driver)
        namespace = driver.test_symbols()
        per_cell = not any("subtest" in c.cell.source for c in self.compiled)
        loop = asyncio.new_event_loop()
        try:
            for compiled in self.compiled:
                if per_cell:
                    with driver.logger.subtest(f"cell {compiled.cell.number}"):
                        self._run_cell(driver, compiled, namespace, loop)
                else:
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
