"""testScript semantics over the machine registry: nixpkgs' ``Driver`` and its namespace.

:class:`Driver` wraps a :class:`~nixos_repl.registry.Registry` (the supervisor that owns the
machines and VLANs) and adds what a nixpkgs testScript expects around it: ``start_all``,
``subtest``, ``retry``, ``polling_condition``, ``t``, the global timeout, and
:meth:`Driver.test_symbols`, the one namespace dict that batch runs, the REPL and the Jupyter
kernel all execute in::

    with Driver(config, out_dir=Path("out")) as driver:
        exec(compile(src, "test.py", "exec"), driver.test_symbols())

A driver built without a configuration has no machines; ``create_machine`` adds machines later and
binds them into the same namespace.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import sys
import threading
import time
import traceback
import unittest
import warnings
from abc import ABC
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, TracebackType
from typing import Any, overload

from .config import DriverConfig, pythonize_name
from .errors import MachineError, PollingConditionError, RequestedAssertionFailed
from .logs import AbstractLogger, DriverLogger
from .machine import DEFAULT_TIMEOUT, BaseMachine, Machine, NspawnMachine, QemuMachine
from .machine.actions import observing
from .machine.nspawn import in_nix_sandbox, prepare_nix_sandbox
from .machine.timing import attempt_bound
from .rebuild import Redeploy
from .rebuild import rebuild as redeploy_after_build
from .registry import Registry, get_tmp_dir
from .vlan import VLan

__all__ = [
    "AssertionTester",
    "Debug",
    "DebugAbstract",
    "DebugNop",
    "Driver",
    "NspawnMachine",
    "PollingCondition",
    "get_tmp_dir",
    "pythonize_name",
    "retry",
]

DEFAULT_POLLING_INTERVAL = dt.timedelta(seconds=2)


class AssertionTester(unittest.TestCase):
    """``t`` in test scripts: every ``t.assert*`` raises :class:`RequestedAssertionFailed`."""

    failureException = RequestedAssertionFailed


# -- durations and retry ---------------------------------------------------------------------


def _duration(value: object, func: str) -> dt.timedelta:
    """nixpkgs' duration rule: a timedelta, or a bare number of seconds with a warning."""
    if isinstance(value, bool):
        raise TypeError(f"{func}(): a duration must be a datetime.timedelta, not bool")
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, int | float):
        warnings.warn(
            f"{func}(): passing a bare int/float as a duration is deprecated. "
            "Use datetime.timedelta instead.",
            stacklevel=3,
        )
        return dt.timedelta(seconds=value)
    raise TypeError(f"{func}(): a duration must be a datetime.timedelta, not {value!r}")


def _timeout_arg(
    timeout_seconds: object, timeout: object, func: str, default: dt.timedelta
) -> dt.timedelta:
    if timeout_seconds is not None and timeout is not None:
        raise TypeError(f"{func}(): pass either timeout or timeout_seconds, not both")
    if timeout_seconds is not None:
        return _duration(timeout_seconds, func)
    if timeout is not None:
        return _duration(timeout, func)
    return default


def retry(
    fn: Callable[[bool], bool],
    timeout_seconds: float | dt.timedelta | None = None,
    timeout: dt.timedelta | float | None = None,
    attempt_timeout: dt.timedelta | float | None = None,
) -> None:
    """Call ``fn(last_try)`` every second until it returns true, then once more at the deadline.

    nixpkgs' newest ``retry``: a monotonic deadline (15 minutes by default), a 1 s pause between
    tries, and one last try with ``last_try=True`` after the deadline. Raises
    ``RequestedAssertionFailed("action timed out after X.XX seconds (timeout=N)")``.
    ``attempt_timeout`` (nixpkgs' in-flight per-attempt bound) cuts the guest commands a try
    sends once the try has run that long, so one blocking probe cannot use the whole budget.
    """
    limit = _timeout_arg(timeout_seconds, timeout, "retry", DEFAULT_TIMEOUT)
    per_try = None if attempt_timeout is None else _duration(attempt_timeout, "retry")
    _retry(fn, limit, time.sleep, time.monotonic, per_try)


def _retry(
    fn: Callable[[bool], bool],
    limit: dt.timedelta,
    sleep: Callable[[float], object],
    clock: Callable[[], float],
    attempt_timeout: dt.timedelta | None = None,
) -> None:
    start = clock()
    total = limit.total_seconds()
    per_try = None if attempt_timeout is None else attempt_timeout.total_seconds()

    def attempt(last_try: bool) -> bool:
        with attempt_bound(per_try):
            return fn(last_try)

    while clock() - start < total:
        if attempt(False):
            return
        sleep(1)
    if not attempt(True):
        raise RequestedAssertionFailed(
            f"action timed out after {clock() - start:.2f} seconds (timeout={total})"
        )


# -- polling conditions ----------------------------------------------------------------------


class PollingCondition:
    """A check run before every machine command (at most once per interval), as in nixpkgs.

    A ``None`` result counts as success and an exception as failure. While the condition's own
    function runs, commands it sends do not re-check it.
    """

    def __init__(
        self,
        condition: Callable[[], bool | None],
        logger: AbstractLogger,
        seconds_interval: float | dt.timedelta = DEFAULT_POLLING_INTERVAL,
        description: str | None = None,
    ) -> None:
        self.condition = condition
        self.logger = logger
        interval = seconds_interval
        self.interval = (
            interval if isinstance(interval, dt.timedelta) else dt.timedelta(seconds=interval)
        )
        if description is None:
            doc = getattr(condition, "__doc__", None)
            self.description = doc if doc else getattr(condition, "__name__", repr(condition))
        else:
            self.description = str(description)
        self.last_called = float("-inf")
        self.entry_count = 0

    @property
    def seconds_interval(self) -> float:
        return self.interval.total_seconds()

    def check(self, force: bool = False) -> bool:
        if (self.entered or not self.overdue) and not force:
            return True
        with self, self.logger.nested(self.nested_message):
            since = time.monotonic() - self.last_called
            self.logger.info(
                f"Time since last: {since:.2f}s" if since != float("inf") else "(not called yet)"
            )
            try:
                result = self.condition()
            except Exception:
                result = False
            ok = result is None or bool(result)
            self.logger.info(self.status_message(ok))
            return ok

    def maybe_raise(self) -> None:
        if not self.check():
            raise PollingConditionError(self.status_message(False))

    def status_message(self, status: bool) -> str:
        return f"Polling condition {'succeeded' if status else 'failed'}: {self.description}"

    @property
    def nested_message(self) -> str:
        return f"Checking polling condition {self.description!r}"

    @property
    def overdue(self) -> bool:
        return self.last_called + self.seconds_interval < time.monotonic()

    @property
    def entered(self) -> bool:
        return self.entry_count > 0

    def __enter__(self) -> None:
        self.entry_count += 1

    def __exit__(self, *exc: object) -> None:
        self.entry_count -= 1
        self.last_called = time.monotonic()


class PollingConditions:
    """The active polling conditions; calling it raises if one fails. Every machine gets it as
    a callback, with a length: while it is empty a machine skips it, and its waits run in the
    guest instead of trying once a second from the host."""

    def __init__(self) -> None:
        self._conditions: list[PollingCondition] = []

    def __call__(self) -> None:
        for condition in self._conditions:
            condition.maybe_raise()

    def __len__(self) -> int:
        return len(self._conditions)

    def __iter__(self) -> Iterator[PollingCondition]:
        return iter(self._conditions)

    def append(self, condition: PollingCondition) -> None:
        self._conditions.append(condition)

    def pop(self) -> PollingCondition:
        return self._conditions.pop()


class Poll:
    """What ``polling_condition`` makes of a function: a context manager with ``wait()``."""

    def __init__(
        self,
        driver: Driver,
        fun: Callable[[], bool | None],
        interval: dt.timedelta,
        description: str | None,
    ) -> None:
        self.driver = driver
        self.condition = PollingCondition(fun, driver.logger, interval, description)

    def __enter__(self) -> None:
        self.driver.polling_conditions.append(self.condition)

    def __exit__(self, *exc: object) -> None:
        popped = self.driver.polling_conditions.pop()
        assert popped is self.condition

    def wait(
        self,
        timeout_seconds: float | dt.timedelta | None = None,
        timeout: dt.timedelta | float | None = None,
    ) -> None:
        """Wait until the condition holds (15 minutes by default)."""
        limit = _timeout_arg(timeout_seconds, timeout, "wait", DEFAULT_TIMEOUT)
        logger, description = self.driver.logger, self.condition.description

        def attempt(last: bool) -> bool:
            if last:
                logger.info(f"Last chance for {description}")
            ok = self.condition.check(force=True)
            if not ok and not last:
                logger.info(f"({description} failure not fatal yet)")
            return ok

        with logger.nested(f"waiting for {description}"):
            _retry(attempt, limit, time.sleep, time.monotonic)


# -- the debug hook --------------------------------------------------------------------------


class DebugAbstract(ABC):  # noqa: B024 - nixpkgs' name; every method has a default
    """nixpkgs' debug hook interface: ``debug.breakpoint()`` in test scripts."""

    def breakpoint(self, host: str = "127.0.0.1", port: int = 4444) -> None:  # noqa: B027
        """Stop for a debugger; the default does nothing."""


class DebugNop(DebugAbstract):
    """No debug hook (the default)."""


class Debug(DebugAbstract):
    """``--debug-hook-attach``: accepted for compatibility; breakpoints only log a notice.

    nixpkgs forks a remote pdb inside the Nix sandbox; nixos-repl's answer to debugging a
    failing test is its REPL.
    """

    def __init__(self, logger: AbstractLogger, attach_command: str) -> None:
        self.logger = logger
        self.attach_command = attach_command

    def breakpoint(self, host: str = "127.0.0.1", port: int = 4444) -> None:
        self.logger.warning(
            "Breakpoint reached, but nixos-repl has no sandbox debug hook: "
            "rerun the test with nixos-repl to inspect the machines"
        )


# -- the single-machine alias ----------------------------------------------------------------


class _MachineAlias:
    """``machine`` for a lone machine with another name: works, and warns on every use."""

    def __init__(self, machine: BaseMachine) -> None:
        object.__setattr__(self, "_machine", machine)

    def __getattr__(self, name: str) -> Any:
        machine: BaseMachine = object.__getattribute__(self, "_machine")
        kind = "NspawnMachine" if isinstance(machine, NspawnMachine) else "QemuMachine"
        warnings.warn(
            f"invoking '{kind}.{name}' is deprecated: It's deprecated to use the `machine` "
            f"variable when the only machine is called {machine.name}. This behavior will no "
            "longer work in NixOS 27.05.",
            stacklevel=2,
        )
        return getattr(machine, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(object.__getattribute__(self, "_machine"), name, value)

    def __repr__(self) -> str:
        return repr(object.__getattribute__(self, "_machine"))


# -- the driver ------------------------------------------------------------------------------


class Driver:
    """nixpkgs' ``Driver``: machines, VLANs, the global timeout and the test-script namespace.

    A context manager: entering starts the VLANs (machines start lazily, on ``start_all()`` or
    their first command); leaving kills every machine and VLAN.
    """

    def __init__(
        self,
        config: DriverConfig | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        logger: AbstractLogger | None = None,
        keep_machine_state: bool = False,
        interactive: bool = False,
        *,
        debug: DebugAbstract | None = None,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.config = config if config is not None else DriverConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
        self.logger: AbstractLogger = logger if logger is not None else DriverLogger()
        self.keep_machine_state = keep_machine_state
        self.interactive = interactive
        self.debug: DebugAbstract = debug if debug is not None else DebugNop()
        self.global_timeout = self.config.global_timeout
        self.polling_conditions = PollingConditions()
        # Called by the global timeout after the machines are gone, before the process ends.
        self.on_terminate: list[Callable[[], None]] = []
        self._terminating = threading.Event()
        script = self.config.test_script
        self.script_filename = str(script) if script is not None else "<string>"
        self.tests = script.read_text() if script is not None and script.is_file() else ""
        self._code: CodeType | None = None
        self.race_timer = self._new_timer()
        if self.config.containers and in_nix_sandbox():
            prepare_nix_sandbox()  # what systemd-nspawn needs and a Nix build may lack
        self.registry = Registry(
            start_scripts=[(n, str(m.start_script.absolute())) for n, m in self.config.vms.items()],
            vlans=self.config.vlans,
            out_dir=self.out_dir,
            keep_machine_state=keep_machine_state,
            tmp_dir=tmp_dir,
            callbacks=[self.polling_conditions],
            containers=[
                (n, str(m.start_script.absolute())) for n, m in self.config.containers.items()
            ],
        )
        # The lists behind the ``machines*`` globals: the same objects, brought up to date.
        self._machines: list[BaseMachine] = self._all_machines()
        self._machines_qemu: list[Machine] = list(self.registry.machines)
        self._machines_nspawn: list[NspawnMachine] = list(self.registry.machines_nspawn)
        self._symbols: dict[str, Any] | None = None
        # What rebind() put in the namespace last (so that it can take back what is gone).
        self._bound: dict[str, object] = {}
        # rebuild(): where the configuration is re-read from (None: the same start scripts).
        self.config_source: Callable[[], DriverConfig] | None = None
        if interactive:
            self.registry.note_deployed()

    @property
    def deployed(self) -> dict[str, str]:
        """The start scripts' fingerprints as deployed (what ``rebuild`` compares)."""
        return self.registry.deployed

    # -- machines and VLANs --------------------------------------------------------------------

    def _all_machines(self) -> list[BaseMachine]:
        both: list[BaseMachine] = [*self.registry.machines, *self.registry.machines_nspawn]
        return sorted(both, key=lambda m: m.name)

    @property
    def machines(self) -> list[BaseMachine]:
        """Every machine of both kinds, sorted by name (the same list object as the ``machines``
        global)."""
        self._machines[:] = self._all_machines()
        return self._machines

    @property
    def machines_qemu(self) -> list[Machine]:
        """The QEMU machines, sorted by name (the ``machines_qemu`` global's list)."""
        self._machines_qemu[:] = self.registry.machines
        return self._machines_qemu

    @property
    def machines_nspawn(self) -> list[NspawnMachine]:
        """The containers, sorted by name (the ``machines_nspawn`` global's list)."""
        self._machines_nspawn[:] = self.registry.machines_nspawn
        return self._machines_nspawn

    @property
    def vlans(self) -> list[VLan]:
        return self.registry.vlans

    def __enter__(self) -> Driver:
        with self.logger.nested("start all VLans"):
            self.registry.__enter__()
        if self.config.enable_ssh_backdoor:
            self.logger.warning(
                "the SSH backdoor is not supported by nixos-repl; machines start without it"
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self.logger.nested("cleanup"):
            self.race_timer.cancel()
            try:
                self.registry.close()
            except Exception as e:
                self.logger.error(f"Error during cleanup: {e}")

    def start_all(self) -> None:
        """Start every machine, in parallel; does not wait for them to boot."""
        with observing(self.registry.observers, None, "start_all"):
            with self.logger.nested("start all VMs"):
                self.registry.start_all()

    def snapshot_all(self, label: str = "booted") -> None:
        """Save every running machine as ``label`` at once (nixos-repl's; not in nixpkgs)."""
        with observing(self.registry.observers, None, "snapshot_all", (label,)):
            with self.logger.nested(f"save snapshot {label} of all VMs"):
                self.registry.snapshot_all(label)

    def restore_all(self, label: str = "booted") -> None:
        """Restore every running machine to ``label`` at once (nixos-repl's; not in nixpkgs)."""
        with observing(self.registry.observers, None, "restore_all", (label,)):
            with self.logger.nested(f"restore snapshot {label} of all VMs"):
                self.registry.restore_all(label)

    def join_all(self) -> None:
        """Wait for every machine to shut down (and stop the global timeout)."""
        with self.logger.nested("wait for all VMs to finish"):
            for machine in self.machines:
                machine.wait_for_shutdown()
            self.race_timer.cancel()

    def create_machine(
        self,
        start_command: str,
        *,
        name: str | None = None,
        keep_machine_state: bool = False,
    ) -> Machine:
        """A new machine from a start command, bound into the test namespace under its name.

        Unlike nixpkgs, the machine joins the registry: it is polled by polling conditions and
        killed at cleanup like the configured ones.
        """
        if not isinstance(start_command, str):
            raise TypeError(
                "create_machine() takes a start command (the path of a run-<name>-vm script); "
                "the dict form was removed from nixpkgs"
            )
        if self.config.enable_ssh_backdoor:
            self.logger.warning(
                f"create_machine({name}): not enabling SSH backdoor, this is not supported "
                "for VMs created with create_machine!"
            )
        machine = self.registry.add(start_command, name=name, keep_machine_state=keep_machine_state)
        self.machines  # noqa: B018 - refresh the shared list
        if self._symbols is not None:
            self.rebind()
        return machine

    def rebuild(self, cmd: str, config: str | os.PathLike[str] | None = None) -> Redeploy:
        """Run the build command ``cmd``, then redeploy: machines whose start script changed
        are restarted, new ones added, removed ones stopped, VLANs follow the new set, and
        the namespace is rebound; logs ``finished: updating machines``.

        The configuration is re-read from where the session got it (``--config``, the start
        scripts, ``NIXOS_REPL_CONFIG``), or from ``config``, a driverConfiguration.json.
        Returns what changed; a failing build or a bad configuration changes nothing.
        """
        # One action: the machines it restarts are not recorded on their own.
        kwargs = {"config": str(config)} if config is not None else {}
        with observing(self.registry.observers, None, "rebuild", (cmd,), kwargs) as action:
            result = redeploy_after_build(self, cmd, config)
            if action is not None:
                action.result = result.summary()
            return result

    # -- logging -------------------------------------------------------------------------------

    def serial_stdout_on(self) -> None:
        self.logger.print_serial_logs(True)

    def serial_stdout_off(self) -> None:
        self.logger.print_serial_logs(False)

    def dump_machine_ssh(self) -> None:
        if not self.config.enable_ssh_backdoor:
            return
        print(
            "SSH backdoor enabled, but nixos-repl has no SSH backdoor: "
            "use the machines' shell API (succeed, execute) instead"
        )

    # -- subtests and polling conditions --------------------------------------------------------

    @contextlib.contextmanager
    def subtest(self, name: str) -> Iterator[None]:
        """Group the log under ``name`` (a JUnit case); a failure is logged and re-raised."""
        with self.logger.subtest(name):
            try:
                yield
            except Exception as e:
                self._hold_if_terminating()
                self.logger.log_test_error(f'Test "{name}" failed with error: "{e}"')
                raise

    def check_polling_conditions(self) -> None:
        """Run before every machine command: raise if an active polling condition fails."""
        self.polling_conditions()

    @overload
    def polling_condition(
        self,
        fun_: Callable[[], bool | None],
        *,
        seconds_interval: float | dt.timedelta | None = None,
        interval: dt.timedelta | None = None,
        description: str | None = None,
    ) -> Poll: ...

    @overload
    def polling_condition(
        self,
        fun_: None = None,
        *,
        seconds_interval: float | dt.timedelta | None = None,
        interval: dt.timedelta | None = None,
        description: str | None = None,
    ) -> Callable[[Callable[[], bool | None]], Poll]: ...

    def polling_condition(
        self,
        fun_: Callable[[], bool | None] | None = None,
        *,
        seconds_interval: float | dt.timedelta | None = None,
        interval: dt.timedelta | None = None,
        description: str | None = None,
    ) -> Callable[[Callable[[], bool | None]], Poll] | Poll:
        """``@polling_condition``, ``@polling_condition(interval=...)`` or a plain call.

        The result is a context manager: while entered, the condition is checked before every
        machine command (at most once per interval, 2 s by default).
        """
        if seconds_interval is not None and interval is not None:
            raise TypeError("polling_condition(): pass either interval or seconds_interval")
        every = DEFAULT_POLLING_INTERVAL
        if interval is not None:
            every = _duration(interval, "polling_condition")
        elif seconds_interval is not None:
            every = (
                seconds_interval
                if isinstance(seconds_interval, dt.timedelta)
                else dt.timedelta(seconds=seconds_interval)
            )

        def make(fun: Callable[[], bool | None]) -> Poll:
            return Poll(self, fun, every, description)

        return make if fun_ is None else make(fun_)

    # -- the test script -----------------------------------------------------------------------

    def test_symbols(self) -> dict[str, Any]:
        """The namespace test scripts run in: nixpkgs' globals, one per machine and VLAN.

        The same dict on every call (front ends and ``test_script()`` share it); machines and
        VLANs are refreshed into it (:meth:`rebind`). Prints nixpkgs' ``additionally exposed
        symbols:`` banner (:meth:`print_symbols`).
        """
        symbols = self.rebind()
        self.print_symbols()
        return symbols

    def rebind(self) -> dict[str, Any]:
        """Bring the namespace up to date with the machines and VLANs, silently: one name per
        machine (``my-vm`` is ``my_vm``) and per VLAN (``vlan1``), ``machine`` for a lone
        machine of another name; names of machines and VLANs that are gone are deleted."""
        if self._symbols is None:
            self._symbols = self._general_symbols()
        symbols = self._symbols
        machines = self.machines
        bound: dict[str, object] = {pythonize_name(m.name): m for m in machines}
        # The globals' lists, the same objects brought up to date.
        bound |= {"machines_qemu": self.machines_qemu, "machines_nspawn": self.machines_nspawn}
        if len(machines) == 1 and "machine" not in bound:
            bound["machine"] = _MachineAlias(machines[0])
        bound |= {f"vlan{vlan.nr}": vlan for vlan in self.vlans}
        for name, value in self._bound.items():
            if name not in bound and symbols.get(name) is value:
                del symbols[name]
        symbols.update(bound)
        self._bound = bound
        return symbols

    def print_symbols(self) -> None:
        """Print nixpkgs' ``additionally exposed symbols:`` banner."""
        print(
            "additionally exposed symbols:\n    "
            + ", ".join(m.name for m in self.machines)
            + ",\n    "
            + ", ".join(f"vlan{v.nr}" for v in self.vlans)
            + ",\n    "
            + ", ".join(self._general_symbols())
        )

    def adopt_namespace(self, namespace: dict[str, Any]) -> dict[str, Any]:
        """Make ``namespace`` (an IPython shell's ``user_ns``) the one test namespace: fill it
        with :meth:`test_symbols` and bind later machines (``create_machine``) into it."""
        if self._symbols is namespace:
            return namespace
        if self._symbols is None:
            namespace.update(self._general_symbols())
        elif self._symbols is not namespace:
            namespace.update(self._symbols)
        self._symbols = namespace
        return self.test_symbols()

    def _general_symbols(self) -> dict[str, Any]:
        return {
            "start_all": self.start_all,
            "test_script": self.test_script,
            "machines": self.machines,
            "machines_qemu": self.machines_qemu,
            "machines_nspawn": self.machines_nspawn,
            "vlans": self.vlans,
            "driver": self,
            "log": self.logger,
            "os": os,
            "create_machine": self.create_machine,
            "subtest": self.subtest,
            "run_tests": self.run_tests,
            "join_all": self.join_all,
            "retry": retry,
            "serial_stdout_off": self.serial_stdout_off,
            "serial_stdout_on": self.serial_stdout_on,
            "polling_condition": self.polling_condition,
            "BaseMachine": BaseMachine,
            "QemuMachine": QemuMachine,
            "NspawnMachine": NspawnMachine,
            "t": AssertionTester(),
            "debug": self.debug,
            "dump_machine_ssh": self.dump_machine_ssh,
        } | ({"rebuild": self.rebuild} if self.interactive else {})

    def symbol_names(self) -> list[str]:
        """The globals a test script may use: nixpkgs' ``driver-symbols`` and ``Machine``."""
        return [*self._general_symbols(), "Machine"]

    def compile_script(self) -> CodeType:
        """The test script compiled under its real filename (raises SyntaxError)."""
        if self._code is None:
            self._code = compile(self.tests, self.script_filename, "exec")
        return self._code

    def test_script(self) -> None:
        """Run the test script in :meth:`test_symbols`, reporting failures as nixpkgs does.

        An assertion failure logs a ``!!!`` traceback of the script's own frames and exits with
        status 1; a MachineError logs the full traceback and exits 1; a syntax error names its
        line and exits 1; anything else propagates.
        """
        with self.logger.nested("run the VM test script"):
            symbols = self.test_symbols()
            symbols.setdefault("Machine", Machine)
            try:
                code = self.compile_script()
            except SyntaxError as e:
                self.log_syntax_error(e)
                sys.exit(1)
            try:
                exec(code, symbols)
            except MachineError:
                self._hold_if_terminating()
                for line in traceback.format_exc().splitlines():
                    self.logger.log_test_error(line)
                sys.exit(1)
            except RequestedAssertionFailed as e:
                self._hold_if_terminating()
                self.log_assertion(e)
                self.debug.breakpoint()
                sys.exit(1)
            except Exception:
                self._hold_if_terminating()
                self.debug.breakpoint()
                raise

    def log_syntax_error(self, error: SyntaxError) -> None:
        for line in "".join(traceback.format_exception_only(error)).splitlines():
            self.logger.log_test_error(line)

    def log_assertion(self, error: BaseException) -> None:
        """nixpkgs' report: the script's frames, each with its source line, then the error."""
        frames = [
            f
            for f in traceback.extract_tb(error.__traceback__)
            if f.filename == self.script_filename
        ]
        code = self.tests.splitlines()
        self.logger.log_test_error("Traceback (most recent call last):")
        for frame in frames:
            self.logger.log_test_error(
                f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'
            )
            if frame.lineno and frame.lineno <= len(code):
                self.logger.log_test_error(f"    {code[frame.lineno - 1].strip()}")
        self.logger.log_test_error("")
        for line in f"{type(error).__name__}: {error}".splitlines():
            self.logger.log_test_error(line)

    def run_tests(self) -> None:
        """Start the global timeout, run the test script, then ``sync`` every machine that is up."""
        total = self.global_timeout.total_seconds()
        shown = int(total) if total == int(total) else total
        self.logger.info(f"Test will time out and terminate in {shown} seconds")
        if self.race_timer.is_alive() or self.race_timer.finished.is_set():
            self.race_timer.cancel()
            self.race_timer = self._new_timer()
        self.race_timer.start()
        self.test_script()
        for machine in self.machines:
            if machine.is_up():
                machine.execute("sync")

    def _new_timer(self) -> threading.Timer:
        timer = threading.Timer(self.global_timeout.total_seconds(), self.terminate_test)
        timer.daemon = True
        return timer

    def terminate_test(self) -> None:
        """The global timeout: kill every machine and VLAN, then end the process with SIGTERM."""
        self._terminating.set()
        with self.logger.nested("timeout reached; test terminating..."):
            total = self.global_timeout.total_seconds()
            self.logger.log_test_error(f"the global timeout of {total:g} seconds was reached")
            try:
                self.registry.close()
            except Exception as e:
                self.logger.log_test_error(f"Error during cleanup: {e}")
        for callback in self.on_terminate:
            with contextlib.suppress(Exception):
                callback()
        os.kill(os.getpid(), signal.SIGTERM)

    def _hold_if_terminating(self) -> None:
        """After the global timeout, a failure is its consequence: wait for SIGTERM, say nothing."""
        if self._terminating.is_set() and threading.current_thread() is not self.race_timer:
            threading.Event().wait()
