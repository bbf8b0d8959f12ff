"""The machine registry: machines by name, their states, and teardown in one place.

The registry owns the machines; each machine owns its QEMU process, sockets and loop tasks. A VM
dying never takes the process down: the machine turns ``crashed`` and its next call raises a
MachineError with the details. Leaving the registry (or the interpreter, by any path) leaves no
QEMU behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import shlex
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import DriverConfig, check_machine_names
from .errors import MachineError, UnknownMachineError
from .loop import run_sync
from .machine import (
    ActionObserver,
    BaseMachine,
    Machine,
    MachineState,
    NspawnMachine,
    machine_name_from_start_command,
)
from .machine.lifecycle import ShellFraming
from .machine.nspawn import container_name_from_start_command
from .machine.process import check_start_script
from .vlan import VLan

__all__ = [
    "STATES",
    "Redeploy",
    "Registry",
    "check_out_dir",
    "fingerprint",
    "get_tmp_dir",
    "shell_framing_from_env",
]

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


def fingerprint(start_command: str) -> str:
    """What identifies a start script: the file it resolves to and its bytes (a command that is
    not a file is its own fingerprint)."""
    words = shlex.split(start_command) if start_command.strip() else [start_command]
    path = Path(words[0])
    try:
        real = path.resolve(strict=True)
        digest = hashlib.sha256(real.read_bytes()).hexdigest()
    except OSError:
        return f"command:{start_command}"
    return f"{real}:{digest}:{' '.join(words[1:])}"


@dataclasses.dataclass
class Redeploy:
    """What a redeploy changed."""

    restarted: list[str] = dataclasses.field(default_factory=list)
    redefined: list[str] = dataclasses.field(default_factory=list)  # changed, were not running
    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    vlans_added: list[int] = dataclasses.field(default_factory=list)
    vlans_removed: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("restarted", self.restarted),
            ("redefined", self.redefined),
            ("added", self.added),
            ("removed", self.removed),
            ("unchanged", self.unchanged),
        ):
            if names:
                parts.append(f"{label} {', '.join(names)}")
        if self.vlans_added:
            parts.append(f"new VLANs {', '.join(map(str, self.vlans_added))}")
        if self.vlans_removed:
            parts.append(f"removed VLANs {', '.join(map(str, self.vlans_removed))}")
        return "; ".join(parts) if parts else "nothing changed"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())


class Registry:
    """Machines by name, with their VLANs; a context manager that tears everything down.

    ``callbacks`` run before every command and monitor command of every machine (the
    driver's polling conditions).
    """

    def __init__(
        self,
        start_scripts: Sequence[tuple[str, str | os.PathLike[str]]] = (),
        vlans: Iterable[int] = (),
        out_dir: str | os.PathLike[str] | None = None,
        keep_machine_state: bool = False,
        tmp_dir: str | os.PathLike[str] | None = None,
        callbacks: Sequence[Callable[[], None]] = (),
        containers: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    ) -> None:
        check_machine_names([name for name, _ in [*start_scripts, *containers]])
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else get_tmp_dir()
        self.out_dir = check_out_dir(Path(out_dir) if out_dir is not None else Path.cwd())
        self.keep_machine_state = keep_machine_state
        self.vlan_numbers = sorted(set(vlans))
        self.vlans: list[VLan] = []
        self._machines: dict[str, Machine] = {}
        self._containers: dict[str, NspawnMachine] = {}
        self._watchers: list[Callable[[BaseMachine], None]] = []
        # Shared by every machine: told of each machine action (the session recording).
        self.observers: list[ActionObserver] = []
        self.shell_framing = shell_framing_from_env()
        self.callbacks = list(callbacks)
        # The start scripts' fingerprints as deployed (``redeploy`` compares them).
        self.deployed: dict[str, str] = {}
        for name, script in start_scripts:
            self.add(str(script), name=name)
        for name, script in containers:
            self.add_container(str(script), name=name)

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
        self._check_new_name(name)
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
            callbacks=list(self.callbacks),
        )
        self._machines[name] = machine
        return machine

    def _check_new_name(self, name: str) -> None:
        if name in self._machines or name in self._containers:
            raise MachineError(f"a machine named {name!r} already exists")
        check_machine_names([*self._machines, *self._containers, name])

    def add_container(self, start_command: str, name: str | None = None) -> NspawnMachine:
        """Define a systemd-nspawn container (not started) from its ``run-<name>-nspawn``."""
        name = name or container_name_from_start_command(start_command)
        self._check_new_name(name)  # before the state directory of that name is cleaned
        container = NspawnMachine(
            start_command,
            name=name,
            tmp_dir=self.tmp_dir,
            out_dir=self.out_dir,
            keep_machine_state=self.keep_machine_state,
            callbacks=list(self.callbacks),
            on_state_change=self._state_changed,
            observers=self.observers,
        )
        self._containers[container.name] = container
        for vlan in self.vlans:  # the first container: the VLANs plug their taps in (nixpkgs)
            run_sync(vlan.aio.start_tap())
        return container

    @property
    def machines_nspawn(self) -> list[NspawnMachine]:
        """The containers, sorted by name."""
        return [self._containers[n] for n in sorted(self._containers)]

    def remove(self, name: str) -> Machine:
        """Forget a machine (stop it first: a running one is refused)."""
        machine = self[name]
        if machine.booted:
            raise MachineError(f"{name} is {machine.state}: stop it before removing it")
        del self._machines[name]
        self.deployed.pop(name, None)
        return machine

    def watch(self, callback: Callable[[BaseMachine], None]) -> None:
        """Call ``callback(machine)`` after every state change of a VM or a container (on the
        I/O thread: be quick)."""
        self._watchers.append(callback)

    def _state_changed(self, machine: BaseMachine) -> None:
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

    def note_deployed(self) -> None:
        """Fingerprint the start scripts of the machines that have none yet (as they are now,
        before a build changes them)."""
        for machine in self._machines.values():
            if machine.name not in self.deployed:
                self.deployed[machine.name] = fingerprint(machine.start_command)

    def redeploy(self, config: DriverConfig) -> Redeploy:
        """Bring the machines and VLANs to ``config``; returns what changed.

        A machine's start script has *changed* when the path it names resolves to another file
        or the file's bytes differ (from the fingerprint ``note_deployed`` took). Changed
        machines are stopped and defined again from the new script, and started again if they
        were running; new machines are defined (not started); removed machines are stopped and
        dropped. VLANs that left the set are stopped, new ones started.
        """
        self.note_deployed()
        before = dict(self.deployed)
        result = Redeploy()
        scripts = {n: str(m.start_script.absolute()) for n, m in config.vms.items()}
        prints = {n: fingerprint(s) for n, s in scripts.items()}
        removed = [n for n in before if n not in scripts]
        changed = [n for n in before if n in scripts and prints[n] != before[n]]
        added = [n for n in scripts if n not in before]
        check_machine_names(scripts)
        result.unchanged = [n for n in before if n in scripts and n not in changed]
        new_vlans = set(config.vlans)
        result.vlans_added = sorted(new_vlans - set(self.vlan_numbers))
        result.vlans_removed = sorted(set(self.vlan_numbers) - new_vlans)

        # Stop what goes away or changes, all at once.
        going = [self[n] for n in (*removed, *changed)]
        was_running = {m.name for m in going if m.booted}

        async def stop_all() -> None:
            await asyncio.gather(*(m.aio.release() for m in going), return_exceptions=True)

        run_sync(stop_all())
        for name in (*removed, *changed):
            self.remove(name)
        result.removed = removed

        # VLANs: stop those that left, start the new ones, give every machine the new set.
        for vlan in [v for v in self.vlans if v.nr in result.vlans_removed]:
            vlan.stop()
            self.vlans.remove(vlan)
        self.vlan_numbers = sorted(new_vlans)
        self.start_vlans()
        for machine in self.machines:
            for nr in result.vlans_removed:
                machine.lifecycle.extra_env.pop(f"QEMU_VDE_SOCKET_{nr}", None)

        # Define the changed and the new machines from their new scripts.
        for name in (*changed, *added):
            self.add(scripts[name], name=name)
        self.deployed.update(prints)
        result.added = added
        result.restarted = [n for n in changed if n in was_running]
        result.redefined = [n for n in changed if n not in was_running]

        if result.restarted:
            restart = [self[n] for n in result.restarted]

            async def start_all() -> None:
                await asyncio.gather(*(m.aio.start() for m in restart))

            run_sync(start_all())
        return result

    def start_vlans(self) -> None:
        for nr in self.vlan_numbers:
            if any(v.nr == nr for v in self.vlans):
                continue
            vlan = VLan(nr, self.tmp_dir, tap=bool(self._containers))
            vlan.start()
            self.vlans.append(vlan)
        env = self.vlan_env()
        for machine in self._machines.values():
            machine.lifecycle.extra_env.update(env)

    def start_all(self) -> None:
        """Start every machine (in parallel; does not wait for boot)."""
        self._on_all("start", lambda m: m.aio.start(), containers=True)

    def snapshot_all(self, label: str = "booted") -> None:
        """Save every running machine as ``label``, at the same time (a network rewinds whole)."""
        self._on_all("save a snapshot of", lambda m: m.aio.snapshot(label), running=True)

    def restore_all(self, label: str = "booted") -> None:
        """Restore every running machine to ``label``, at the same time."""
        self._on_all("restore", lambda m: m.aio.restore(label), running=True)

    def _on_all(
        self,
        verb: str,
        action: Callable[[BaseMachine], Awaitable[object]],
        running: bool = False,
        containers: bool = False,
    ) -> None:
        """Run ``action`` on every machine (the running ones; with ``containers`` the containers
        too) at once; one error for all that failed."""
        every: list[BaseMachine] = [*self.machines, *(self.machines_nspawn if containers else [])]
        machines = [m for m in every if m.state.running or not running]
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
                *(m.aio.release() for m in [*self._machines.values(), *self._containers.values()]),
                return_exceptions=True,
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
