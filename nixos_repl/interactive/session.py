"""One interactive session: a driver, its machines, and what the front end shows of them.

The terminal REPL and ``nixos-repl notebook`` build the :class:`Driver` from their command
line and make the session before IPython loads the extension; a kernel started by Jupyter, or a
plain ``%load_ext nixos_repl``, gets one from :func:`session_from_environment`
(``NIXOS_REPL_CONFIG`` names a ``driverConfiguration.json``; without it the session starts with
no machines, and ``%machines add`` defines them; screenshots and the session log go to
``nixos-repl-out/`` in the working directory).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import (
    DriverConfig,
    MachineConfig,
    check_config,
    container_name_from_start_script,
    load_driver_configuration,
)
from ..driver import Driver
from ..errors import UnknownMachineError
from ..logs import ROOT_LOGGER
from ..machine import BaseMachine
from .live import InteractiveHandler, JupyterSink, PlainSink, Presenter, Sink, TerminalSink

__all__ = [
    "CONFIG_ENV",
    "OUT_DIR",
    "Session",
    "current",
    "session_from_environment",
    "set_current",
]

CONFIG_ENV = "NIXOS_REPL_CONFIG"
# Where a kernel's screenshots and session log go, in its working directory (the notebook's
# folder), so that they do not lie loose among the notebooks; ``%machines`` names it.
OUT_DIR = "nixos-repl-out"

log = logging.getLogger(__name__)
_current: Session | None = None
_current_lock = threading.Lock()


def current() -> Session | None:
    """The session of this process, if a front end made one."""
    return _current


def set_current(session: Session | None) -> None:
    global _current
    with _current_lock:
        _current = session


class Session:
    """A driver (entered: its VLANs run; left by :meth:`close`: every machine stops), the
    front end's log handler and its status presenter."""

    def __init__(
        self,
        driver: Driver,
        sink: Sink,
        *,
        verbose: bool = False,
        color: bool = False,
        owns_driver: bool = True,
    ) -> None:
        self.driver = driver
        self.sink = sink
        self.owns_driver = owns_driver
        self.presenter = Presenter(sink, self._last_line)
        self.handler = InteractiveHandler(self.presenter, color=color, verbose=verbose)
        self._root = logging.getLogger(ROOT_LOGGER)
        self._saved = (self._root.level, self._root.propagate)
        self._closed = False
        # How %shell attaches a terminal (the REPL's); None: start the shell and say how.
        self.attach_shell: Callable[[BaseMachine], Any] | None = None
        self._root.setLevel(logging.DEBUG)
        self._root.propagate = False
        self._root.addHandler(self.handler)
        if owns_driver:
            try:
                driver.__enter__()
            except BaseException:
                self._detach()
                raise

    # -- machines ------------------------------------------------------------------------------

    @property
    def machines(self) -> list[BaseMachine]:
        """Every machine, VMs and containers alike, sorted by name."""
        return self.driver.machines

    def machine(self, name: str) -> BaseMachine:
        """The machine (VM or container) called ``name``; UnknownMachineError names the known
        ones."""
        for machine in self.machines:
            if machine.name == name:
                return machine
        known = ", ".join(self.machine_names()) or "none"
        raise UnknownMachineError(f"no machine named {name!r} (known machines: {known})")

    def snapshot_labels(self, name: str | None) -> list[str]:
        """The snapshot labels of machine ``name`` (of every machine for None), for completion:
        only what is known without asking QEMU, so completion never waits."""
        machines = self.machines if name is None else [m for m in self.machines if m.name == name]
        stores = [getattr(m.lifecycle, "snapshots", None) for m in machines]  # VMs have them
        return sorted({s.label for store in stores if store is not None for s in store.known})

    def machine_names(self) -> list[str]:
        return [m.name for m in self.machines]

    def add_machine(self, start_command: str, name: str) -> BaseMachine:
        """``%machines add``: a VM (``create_machine``), or a container from a
        ``run-<name>-nspawn`` script; bound in the namespace under its name."""
        if container_name_from_start_script(start_command) is None:
            return self.driver.create_machine(start_command, name=name)
        # root, systemd-nspawn and an executable script, or one line saying what is missing
        containers = {name: MachineConfig(name, Path(start_command))}
        check_config(DriverConfig(containers=containers), need_test_script=False)
        container = self.driver.registry.add_container(start_command, name=name)
        self.driver.rebind()
        return container

    def open_shell(self, machine: BaseMachine) -> Any:
        """``%shell``: attach this terminal, or start the guest shell and say how to attach."""
        from . import guestshell

        if self.attach_shell is not None:
            return self.attach_shell(machine)
        return guestshell.hint(machine)

    def _last_line(self, name: str) -> str:
        try:
            tail = self.machine(name).console.tail(1)
        except (KeyError, IndexError, RuntimeError):
            return ""
        return tail[0] if tail else ""

    # -- the end -------------------------------------------------------------------------------

    def running(self) -> list[str]:
        """Names of the machines that run (a VM's QEMU, a container's systemd-nspawn)."""
        return [m.name for m in self.machines if m.booted]

    def close(self) -> list[str]:
        """Stop every machine (and VLAN); returns the names of those that were running.

        Safe to call twice (the second call returns nothing).
        """
        if self._closed:
            return []
        self._closed = True
        stopped = self.running()
        try:
            if self.owns_driver:
                self.driver.__exit__(None, None, None)
        finally:
            self.presenter.sync()
            self.presenter.close()
            self._detach()
            if _current is self:
                set_current(None)
        return stopped

    @property
    def closed(self) -> bool:
        return self._closed

    def _detach(self) -> None:
        self._root.removeHandler(self.handler)
        self._root.setLevel(self._saved[0])
        self._root.propagate = self._saved[1]


def config_from_environment() -> DriverConfig:
    """The machines ``NIXOS_REPL_CONFIG`` names, or none."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return DriverConfig()
    config = load_driver_configuration(path)
    check_config(config, need_test_script=False)
    return config


def sink_for(shell: Any) -> Sink:
    """Jupyter's sink in a kernel, the terminal's on a terminal, else plain lines."""
    if getattr(shell, "kernel", None) is not None:
        return JupyterSink()
    stream = sys.__stderr__
    if stream is not None and stream.isatty():

        def prompt_app() -> Any:
            pt_app = getattr(shell, "pt_app", None)
            return getattr(pt_app, "app", None)

        return TerminalSink(app=prompt_app)
    return PlainSink()


def session_from_environment(shell: Any) -> Session:
    """A session for a shell no front end prepared (a Jupyter kernel, ``%load_ext``).

    Its output directory is ``nixos-repl-out`` in the working directory. It stops its machines
    when the process exits.
    """
    out_dir = Path.cwd() / OUT_DIR
    out_dir.mkdir(exist_ok=True)
    driver = Driver(config_from_environment(), out_dir=out_dir, interactive=True)
    if os.environ.get(CONFIG_ENV):
        driver.config_source = config_from_environment  # what rebuild() re-reads
    sink = sink_for(shell)
    session = Session(driver, sink, color=isinstance(sink, TerminalSink))
    stdin = sys.stdin
    if isinstance(sink, TerminalSink) and stdin is not None and stdin.isatty():
        from .guestshell import attach_here

        session.attach_shell = attach_here
    atexit.register(session.close)
    set_current(session)
    return session
