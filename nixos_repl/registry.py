"""The machine registry: machines by name, their states, and teardown in one place.

The registry owns the machines; each machine owns its QEMU process, sockets and loop tasks. A VM
dying never takes the process down: the machine turns ``crashed`` and its next call raises a
MachineError with the details. Leaving the registry (or the interpreter, by any path) leaves no
QEMU behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from .errors import MachineError, UnknownMachineError
from .loop import run_sync
from .machine import ActionObserver, Machine, MachineState, machine_name_from_start_command
from .machine.lifecycle import ShellFraming
from .machine.process import check_start_script
from .vlan import VLan

__all__ = ["STATES", "Registry", "check_out_dir", "get_tmp_dir", "shell_framing_from_env"]

log = logging.getLogger(__name__)

STATES = tuple(MachineState)


def shell_framing_from_env() -> ShellFraming:
    """``NIXOS_REPL_SHELL_FRAMING``: ``auto`` (the fast framing where the guest allows it, the
    default) or ``nixpkgs`` (always nixpkgs' own)."""
    value = os.environ.get("NIXOS_REPL_SHELL_FRAMING", "auto")
    if value == "auto":
        return "auto"
    if value == "nixpkgs":
        return "nixpkgs"
    raise MachineError(f"NIXOS_REPL_SHELL_FRAMING must be 'auto' or 'nixpkgs', not {value!r}")


def get_tmp_dir() -> Path:
    """nixpkgs' temporary directory: $XDG_RUNTIME_DIR, else the system temp dir (mode 0700)."""
    tmp = Path(os.environ.get("XDG_RUNTIME_DIR", tempfile.gettempdir()))
    if tmp.exists() and not tmp.is_dir():
        raise MachineError(
            f"the temporary directory {tmp} (from XDG_RUNTIME_DIR) is not a directory; "
            "point XDG_RUNTIME_DIR at a directory, or unset it"
        )
    try:
        tmp.mkdir(mode=0o700, exist_ok=True, parents=True)
    except OSError as e:
        raise MachineError(f"cannot create the temporary directory {tmp}: {e}") from e
    if not os.access(tmp, os.W_OK):
        raise MachineError(f"the temporary directory {tmp} is not writable")
    return tmp


def check_out_dir(out_dir: Path) -> Path:
    """The output directory must exist and be writable: say so now, not at the first
    screenshot."""
    if not out_dir.is_dir():
        raise MachineError(
            f"the output directory {out_dir} does not exist (or is not a directory); create it"
        )
    if not os.access(out_dir, os.W_OK):
        raise MachineError(f"the output directory {out_dir} is not writable")
    return out_dir


class Registry:
    """Machines by name, with their VLANs; a context manager that tears everything down."""

    def __init__(
        self,
        start_scripts: Sequence[tuple[str, str | os.PathLike[str]]] = (),
        vlans: Iterable[int] = (),
        out_dir: str | os.PathLike[str] | None = None,
        keep_machine_state: bool = False,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else get_tmp_dir()
        self.out_dir = check_out_dir(Path(out_dir) if out_dir is not None else Path.cwd())
        self.keep_machine_state = keep_machine_state
        self.vlan_numbers = sorted(set(vlans))
        self.vlans: list[VLan] = []
        self._machines: dict[str, Machine] = {}
        self._watchers: list[Callable[[Machine], None]] = []
        # Shared by every machine: told of each machine action (the session recording).
        self.observers: list[ActionObserver] = []
        self.shell_framing = shell_framing_from_env()
        for name, script in start_scripts:
            self.add(str(script), name=name)

    @classmethod
    def from_start_scripts(
        cls,
        paths: Iterable[str | os.PathLike[str]],
        vlans: Iterable[int] = (),
        out_dir: str | os.PathLike[str] | None = None,
        keep_machine_state: bool = False,
    ) -> Registry:
        """One machine per ``run-<name>-vm`` script, named after the script."""
        scripts = []
        for path in paths:
            script = Path(path)
            name = machine_name_from_start_command(script.name)
            check_start_script(str(script) if "/" in str(script) else f"./{script}", name)
            scripts.append((name, str(script.resolve())))
        return cls(scripts, vlans, out_dir, keep_machine_state)

    # -- machines ------------------------------------------------------------------------------

    def add(
        self, start_command: str, name: str | None = None, keep_machine_state: bool | None = None
    ) -> Machine:
        """Define a machine (not started). Names are unique. ``keep_machine_state`` defaults to
        the registry's."""
        name = name or machine_name_from_start_command(start_command)
        if name in self._machines:
            raise MachineError(f"a machine named {name!r} already exists")
        machine = Machine(
            start_command,
            name=name,
            tmp_dir=self.tmp_dir,
            out_dir=self.out_dir,
            keep_machine_state=(
                self.keep_machine_state if keep_machine_state is None else keep_machine_state
            ),
            env=self.vlan_env(),
            on_state_change=self._state_changed,
            shell_framing=self.shell_framing,
            observers=self.observers,
        )
        self._machines[name] = machine
        return machine

    def remove(self, name: str) -> Machine:
        """Forget a machine (stop it first: a running one is refused)."""
        machine = self[name]
        if machine.booted:
            raise MachineError(f"{name} is {machine.state}: stop it before removing it")
        del self._machines[name]
        return machine

    def watch(self, callback: Callable[[Machine], None]) -> None:
        """Call ``callback(machine)`` after every state change (on the I/O thread: be quick)."""
        self._watchers.append(callback)

    def _state_changed(self, machine: Machine) -> None:
        log.debug("%s: %s", machine.name, machine.state)
        for callback in self._watchers:
            try:
                callback(machine)
            except Exception:
                log.exception("a state watcher failed")

    def vlan_env(self) -> dict[str, str]:
        return {f"QEMU_VDE_SOCKET_{v.nr}": str(v.socket_dir) for v in self.vlans}

    def __getitem__(self, name: str) -> Machine:
        try:
            return self._machines[name]
        except KeyError:
            known = ", ".join(sorted(self._machines)) or "none"
            raise UnknownMachineError(
                f"no machine named {name!r} (known machines: {known})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._machines

    def __iter__(self) -> Iterator[Machine]:
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self._machines)

    @property
    def machines(self) -> list[Machine]:
        """All machines, sorted by name (as nixpkgs numbers them)."""
        return [self._machines[n] for n in sorted(self._machines)]

    def states(self) -> dict[str, MachineState]:
        return {m.name: m.state for m in self.machines}

    # -- lifecycle -----------------------------------------------------------------------------

    def start_vlans(self) -> None:
        for nr in self.vlan_numbers:
            if any(v.nr == nr for v in self.vlans):
                continue
            vlan = VLan(nr, self.tmp_dir)
            vlan.start()
            self.vlans.append(vlan)
        env = self.vlan_env()
        for machine in self._machines.values():
            machine.lifecycle.extra_env.update(env)

    def start_all(self) -> None:
        """Start every machine (in parallel; does not wait for boot)."""
        self._on_all("start", lambda m: m.aio.start())

    def snapshot_all(self, label: str = "booted") -> None:
        """Save every running machine as ``label``, at the same time (a network rewinds whole)."""
        self._on_all("save a snapshot of", lambda m: m.aio.snapshot(label), running=True)

    def restore_all(self, label: str = "booted") -> None:
        """Restore every running machine to ``label``, at the same time."""
        self._on_all("restore", lambda m: m.aio.restore(label), running=True)

    def _on_all(
        self,
        verb: str,
        action: Callable[[Machine], Awaitable[object]],
        running: bool = False,
    ) -> None:
        """Run ``action`` on every machine (the running ones) at once; one error for all that
        failed."""
        machines = [m for m in self.machines if m.state.running or not running]
        if running and not machines:
            raise MachineError(f"no machine is running, so there is nothing to {verb}")

        async def on_all() -> list[tuple[str, BaseException]]:
            results = await asyncio.gather(*map(action, machines), return_exceptions=True)
            return [
                (m.name, r)
                for m, r in zip(machines, results, strict=True)
                if isinstance(r, BaseException)
            ]

        errors = run_sync(on_all())
        if errors:
            raise MachineError(
                f"Failed to {verb} the following machines:\n"
                + "\n".join(f"{name}: {e}" for name, e in errors)
            )

    def close(self) -> None:
        """Kill every machine and VLAN. Safe to call twice."""

        async def release_all() -> None:
            await asyncio.gather(
                *(m.aio.release() for m in self._machines.values()), return_exceptions=True
            )
            await asyncio.gather(*(v.aio.stop() for v in self.vlans), return_exceptions=True)

        run_sync(release_all())
        self.vlans.clear()

    def __enter__(self) -> Registry:
        self.start_vlans()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
