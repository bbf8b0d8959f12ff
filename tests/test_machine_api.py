"""The Machine facade without a VM: the twins, the documentation, the state, QMP events, the
serial console's cost and memory."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from nixos_repl import Machine, MachineError
from nixos_repl.loop import run_sync
from nixos_repl.machine import AsyncMachine, BaseMachine, MachineState
from nixos_repl.machine import console as console_module
from nixos_repl.machine.console import Console
from nixos_repl.machine.qmp import QMPSession

# nixpkgs' QemuMachine methods a test script may call (§2.3 of the reference), all of which have
# a blocking form on Machine and a coroutine on Machine.aio.
NIXPKGS_METHODS = """
start connect is_up shutdown crash reboot wait_for_shutdown release switch_root
execute succeed fail wait_until_succeeds wait_until_fails sleep
systemctl start_job stop_job get_unit_info get_unit_property require_unit_state wait_for_unit
wait_for_file wait_for_open_port wait_for_closed_port wait_for_open_unix_socket
copy_from_host copy_from_host_via_shell copy_from_machine copy_from_vm
send_monitor_command send_key send_chars send_console console_interact shell_interact
get_tty_text wait_until_tty_matches dump_tty_contents wait_for_console_text get_console_log
screenshot get_screen_text get_screen_text_variants wait_for_text
wait_for_x get_window_names wait_for_window forward_port block unblock wait_for_qmp_event
log log_serial nested run_callbacks cleanup_statedir
""".split()
# Blocking only: they read the terminal, are trivial, or are context managers.
SYNC_ONLY = {
    "is_up",
    "console_interact",
    "log",
    "log_serial",
    "nested",
    "run_callbacks",
    "cleanup_statedir",
    "uptime",
}


def public_coroutines() -> list[str]:
    return [
        name
        for name, value in vars(AsyncMachine).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    ]


def test_every_nixpkgs_method_is_there_blocking_and_awaitable() -> None:
    for name in NIXPKGS_METHODS:
        assert callable(getattr(Machine, name, None)), name
        if name not in SYNC_ONLY:
            assert inspect.iscoroutinefunction(getattr(AsyncMachine, name, None)), name


def test_twins_have_the_same_signature_and_documentation() -> None:
    for name in public_coroutines():
        twin = getattr(Machine, name)
        coroutine = getattr(AsyncMachine, name)
        assert not inspect.iscoroutinefunction(twin), name
        assert inspect.signature(twin) == inspect.signature(coroutine), name
        assert twin.__doc__ == coroutine.__doc__, name
    public_methods = [  # the QEMU kind's own, and those it shares with containers (BaseMachine)
        name
        for cls in Machine.__mro__[:-1]
        for name, value in vars(cls).items()
        if not name.startswith("_") and callable(value) and not isinstance(value, type)
    ]
    assert set(public_methods) - SYNC_ONLY == set(public_coroutines())


def test_every_public_method_is_documented() -> None:
    for cls in (BaseMachine, Machine, AsyncMachine):
        for name, value in vars(cls).items():
            if name.startswith("_") or not callable(value):
                continue
            doc = inspect.getdoc(value)
            assert doc and len(doc) > 20, f"{cls.__name__}.{name} needs a docstring"


def test_state_is_the_one_record(tmp_path: Path) -> None:
    machine = Machine("run-nothing-vm", tmp_dir=tmp_path, out_dir=tmp_path)
    assert machine.state == "defined" and machine.state is MachineState.DEFINED
    assert not machine.booted and not machine.connected and machine.pid is None
    machine.lifecycle.state = MachineState.UP
    assert machine.booted and machine.connected and machine.is_up()
    machine.connected = False  # what nixpkgs scripts write after a reboot they caused
    assert machine.state == "starting" and machine.booted and not machine.connected
    with pytest.raises(MachineError, match="cannot be set to True"):
        machine.connected = True
    with pytest.raises(MachineError, match=r"use nothing\.start\(\)"):
        machine.booted = False
    machine.lifecycle.state = MachineState.STOPPING
    with pytest.raises(MachineError, match=r"nothing is shutting down, so it cannot run a command"):
        machine.lifecycle.check("run a command")


def test_a_command_on_a_machine_that_is_not_running_says_what_to_do(tmp_path: Path) -> None:
    machine = Machine("run-nothing-vm", tmp_dir=tmp_path, out_dir=tmp_path)
    with pytest.raises(MachineError, match=r"nothing is defined.*Call nothing\.start\(\) first"):
        machine.send_console("x")
    machine.lifecycle.state = MachineState.CRASHED
    machine.lifecycle.crash_report = "machine 'nothing' crashed: the report"
    with pytest.raises(MachineError, match="the report"):
        machine.succeed("true")
    with pytest.raises(MachineError, match="the report"):
        machine.screenshot()


# -- QMP: the private hook of qemu.qmp this project relies on ----------------------------------


def test_qemu_qmp_still_dispatches_events_through_the_overridden_method(tmp_path: Path) -> None:
    assert list(inspect.signature(QMPClient._event_dispatch).parameters) == ["self", "msg"]
    path = tmp_path / "qmp"
    seen: list[dict[str, Any]] = []

    async def fake_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}}
        writer.write(
            json.dumps({**greeting, "QMP": {**greeting["QMP"], "capabilities": []}}).encode()
            + b"\n"
        )
        request = json.loads(await reader.read(4096))  # one small message, no newline
        writer.write(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\n")
        writer.write(b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\n')
        await writer.drain()
        await reader.read()  # until the client leaves
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(fake_qemu, str(path))
        session = QMPSession("fake", seen.append)
        await session.connect(path)
        event = await session.await_event(5)
        assert event["event"] == "STOP"
        await asyncio.wait_for(session.close(), 5)
        server.close()

    run_sync(scenario())
    assert [event["event"] for event in seen] == ["STOP"]


# -- the serial console --------------------------------------------------------------------------


class CountingPattern:
    """A compiled pattern that counts the characters it is asked to search."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.searched = 0

    def search(self, text: str) -> re.Match[str] | None:
        self.searched += len(text)
        return self.pattern.search(text)


def test_a_pending_wait_searches_only_new_lines(tmp_path: Path) -> None:
    console = Console("flood")
    console.reset(tmp_path / "console.log")
    line = "x" * 80

    async def scenario() -> tuple[str, int]:
        waiter = asyncio.ensure_future(console.wait_for("the-end"))
        await asyncio.sleep(0)
        (pending,) = console._waiters
        counter = CountingPattern(pending.pattern)
        pending.pattern = counter  # type: ignore[assignment]  # a spy with the same interface
        for _ in range(2_000):
            console.feed((line + "\n").encode() * 10)
        console.feed(b"the-end\n")
        return await waiter, counter.searched

    found, searched = run_sync(scenario())
    assert found == "the-end"
    lines = 20_001
    assert searched < lines * 81 * 10, "the work grows with the lines, not with their square"
    assert len(console.tail(console_module.MEMORY_LINES + 5)) == console_module.MEMORY_LINES
    assert console.line_count == lines
    assert console.text().count("\n") == lines - 1, "the log file keeps every line"
    console.close()


def test_console_waits_match_across_lines_and_do_not_steal(tmp_path: Path) -> None:
    console = Console("c")
    console.reset(None)

    async def scenario() -> list[str]:
        first = asyncio.ensure_future(console.wait_for(r"one\ntwo"))
        second = asyncio.ensure_future(console.wait_for(r"tw."))
        await asyncio.sleep(0)
        console.feed(b"zero\none\n")
        console.feed(b"two\n")
        return list(await asyncio.gather(first, second))

    assert run_sync(scenario()) == ["one\ntwo", "two"]
