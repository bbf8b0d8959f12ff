"""Fault paths against real guests: what a hostile or unlucky user does must not break a promise.

No byte of one command reaches another; the backdoor shell survives the command's own signals
and its death is reported; interrupted starts leave nothing behind; concurrent first use, start
scripts that fork, long commands, and bad environments all behave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixos_repl import Machine, MachineError, Registry
from nixos_repl.loop import get_loop, run_sync

from .helpers import interrupt_after, qemu_alive, qemus_under, start_processes

ONE_MB = 1_000_000


def big_command(tail: str) -> str:
    """A command of about 1 MB (quotes, newlines and all), ending with ``tail``."""
    line = "x'\"$`\\" * 20
    filler = "\n".join(f": '{line.replace(chr(39), '')}' {i}" for i in range(ONE_MB // 110))
    return f"{filler}\n{tail}"


def freeze(pid: int, seconds: float) -> threading.Timer:
    """SIGSTOP the QEMU process now and SIGCONT it after ``seconds``."""
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, lambda: os.kill(pid, signal.SIGCONT))
    timer.start()
    return timer


def test_an_abandoned_commands_output_never_reaches_the_next(crashy: Machine) -> None:
    crashy.connect()
    assert crashy.pid is not None
    timer = freeze(crashy.pid, 8)
    try:
        status, _ = crashy.execute("sleep 1; echo STALE-1", timeout=3)
        assert status == 124
    finally:
        timer.join()
    for i in range(3):
        assert crashy.succeed(f"sleep 0.5; echo own-{i}") == f"own-{i}\n"
    time.sleep(1.5)
    assert crashy.succeed("echo last") == "last\n"


def test_interrupting_a_long_command_keeps_the_channel_in_sync(vm1: Machine) -> None:
    command = big_command("echo LEAKED; sleep 30")
    for delay in (0.02, 0.3):
        interrupt_after(delay)
        with pytest.raises(KeyboardInterrupt):
            vm1.succeed(command)
        assert vm1.succeed("echo mine") == "mine\n"
    assert "sleep 30" not in vm1.succeed("ps -o args")


def test_a_long_command_with_a_short_timeout(vm1: Machine) -> None:
    status, out = vm1.execute(big_command("echo started; sleep 30; echo LEAKED"), timeout=1)
    # Its text takes longer than a second to arrive: it is killed at once, or just after `echo`.
    assert status == 124 and out in ("", "started\n")
    assert vm1.succeed("echo next") == "next\n"


def test_long_commands_arrive_whole(vm1: Machine) -> None:
    assert vm1.succeed(big_command("echo done")) == "done\n"
    # Every byte but NUL, quotes and newlines included, arrives as sent.
    payload = "".join(map(chr, range(1, 256))) * 4000 + "\n\n"
    quoted = "'" + payload.replace("'", "'\\''") + "'"
    vm1.succeed(f"printf %s {quoted} > /tmp/payload")
    expected = payload.encode("utf-8")
    assert vm1.succeed("wc -c < /tmp/payload") == f"{len(expected)}\n"
    assert vm1.succeed("md5sum < /tmp/payload").split()[0] == hashlib.md5(expected).hexdigest()


def test_kill_dollar_dollar_ends_only_the_command(vm1: Machine) -> None:
    assert vm1.execute("echo before; kill $$; echo after") == (143, "before\n")
    assert vm1.execute("kill -INT $$") == (130, "")
    assert vm1.execute("(kill -9 $$); echo after") == (137, "")  # from a nested subshell too
    assert vm1.execute('sh -c "kill $$"; sleep 1') == (143, "")  # passed on by the backdoor
    assert vm1.succeed("echo alive") == "alive\n"
    # Like `bash -c`, a command does not inherit ignored SIGINT/SIGQUIT.
    assert vm1.succeed("grep SigIgn /proc/self/status") == "SigIgn:\t0000000000000000\n"


def test_a_dead_backdoor_is_reported_at_once(crashy: Machine) -> None:
    crashy.connect()
    start = time.monotonic()
    with pytest.raises(MachineError, match="backdoor shell in the guest died"):
        crashy.execute("builtin kill -9 $$; sleep 60", timeout=120)
    assert time.monotonic() - start < 30
    with pytest.raises(MachineError, match="backdoor shell in the guest died"):
        crashy.succeed("true")
    crashy.crash()
    crashy.start()
    assert crashy.succeed("echo revived") == "revived\n"


def test_check_output_false_still_stops_at_its_timeout(vm1: Machine) -> None:
    assert vm1.execute("sleep 100", check_output=False, timeout=2) == (-2, "")
    start = time.monotonic()
    assert vm1.succeed("echo next") == "next\n"
    assert time.monotonic() - start < 20
    assert "sleep 100" not in vm1.succeed("ps -o args")


def test_two_callers_on_a_machine_not_connected_yet(crashy: Machine) -> None:
    async def both() -> list[str]:
        return list(
            await asyncio.gather(crashy.aio.succeed("echo a"), crashy.aio.succeed("echo b"))
        )

    assert run_sync(both()) == ["a\n", "b\n"]
    crashy.crash()
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(crashy.succeed("hostname")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == ["crashy\n", "crashy\n"]


def open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
    return fds


@pytest.mark.cold_boot  # interrupts the launch of QEMU itself
def test_an_interrupted_start_leaves_nothing_behind(crashy: Machine) -> None:
    get_loop()  # its own descriptors are not a leak
    before = open_fds()
    for delay in (0.005, 0.01, 0.015, 0.02, 0.025):
        timer = interrupt_after(delay)
        try:
            crashy.start()
        except KeyboardInterrupt:
            pass
        timer.join()
        time.sleep(0.1)  # a late SIGINT must not hit what follows
        assert crashy.state in ("off", "up", "starting")
        if crashy.booted:
            crashy.release()
        assert wait_until_true(lambda: not start_processes(crashy.state_dir)), "no reaper is left"
        leaked = {fd for fd in open_fds() - before if not fd.startswith("3 ")}
        assert not leaked, f"no socket or pipe is left open (delay {delay})"
    assert crashy.succeed("echo booted") == "booted\n"


def wait_until_true(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def wrapper(tmp_path: Path, name: str, body: str) -> Path:
    script = tmp_path / f"run-{name}-vm"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.mark.cold_boot
def test_a_start_script_that_forks(guest_dir: Path, tmp_path: Path) -> None:
    # No `exec`: QEMU is the script's child, not the script itself.
    script = wrapper(tmp_path, "forking", f'{guest_dir}/run-solo-vm "$@"; echo done')
    program = textwrap.dedent(f"""
        import time
        from nixos_repl import Registry
        reg = Registry.from_start_scripts([{str(script)!r}], out_dir={str(tmp_path)!r})
        reg.__enter__()
        print(reg["forking"].succeed("echo up").strip(), reg["forking"].pid, flush=True)
        time.sleep(300)
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert child.stdout is not None
    reply, pid = child.stdout.readline().split()
    assert reply == "up" and qemu_alive(int(pid))
    child.kill()
    child.wait()
    deadline = time.monotonic() + 5
    while qemu_alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not qemu_alive(int(pid)), "QEMU, a grandchild, died with the driver"


def start_in_background(machine: Machine) -> tuple[int, concurrent.futures.Future[None]]:
    """Start ``machine`` on the I/O loop; returns its pid as soon as it has one, and the start."""
    starting = asyncio.run_coroutine_threadsafe(machine.aio.start(), get_loop())
    deadline = time.monotonic() + 20
    while (pid := machine.pid) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pid is not None
    return pid, starting


@pytest.mark.cold_boot  # kills QEMU early in its boot
def test_pid_is_the_vm_at_any_moment(crashy: Machine) -> None:
    pid, starting = start_in_background(crashy)
    starting.result(timeout=60)
    assert crashy.pid == pid, "nixpkgs' machine.pid: the start script's, which execs QEMU"
    crashy.release()
    pid, starting = start_in_background(crashy)
    os.kill(pid, signal.SIGKILL)  # early in the boot
    with contextlib.suppress(MachineError):
        starting.result(timeout=30)
    assert crashy.state in ("off", "crashed")
    assert qemus_under(crashy.state_dir) == [], "the exit reported is the VM's own"
    start = time.monotonic()
    assert crashy.succeed("echo again") == "again\n"
    assert time.monotonic() - start < 60, "the next start does not wait for an orphan"


@pytest.mark.cold_boot
def test_a_start_script_that_never_starts_qemu(tmp_path: Path) -> None:
    script = wrapper(tmp_path, "sleepy", "sleep 1000 & sleep 1000")
    with Registry.from_start_scripts([script], out_dir=tmp_path) as reg:
        machine = reg["sleepy"]
        machine.lifecycle.socket_timeout = 2
        with pytest.raises(MachineError, match="did not connect to the monitor socket within 2"):
            machine.succeed("true")
        assert machine.state == "off"
        assert wait_until_true(lambda: not start_processes(machine.state_dir)), "no reaper is left"


def test_long_commands_are_abbreviated_in_messages(
    vm1: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    command = big_command("exit 3")
    with caplog.at_level(logging.INFO, logger="nixos_repl.machine.vm1"):
        with pytest.raises(AssertionError) as error:
            vm1.succeed(command)
    assert len(str(error.value)) < 400 and "bytes)" in str(error.value)
    assert all(len(record.getMessage()) < 1000 for record in caplog.records)


def test_a_bad_temporary_or_output_directory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(not_a_dir))
    with pytest.raises(MachineError, match=r"XDG_RUNTIME_DIR.*not a directory"):
        Registry()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(MachineError, match=r"output directory .*missing.* does not exist"):
        Registry(out_dir=tmp_path / "missing")
