"""The backdoor shell channel against a real tiny guest: nixpkgs semantics, and never a desync."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path

import pytest

from nixos_repl import Machine, RequestedAssertionFailed
from nixos_repl.machine.shell import fast as fast_framing

from .helpers import interrupt_after


def test_succeed_returns_stdout(vm1: Machine) -> None:
    assert vm1.succeed("echo hello") == "hello\n"
    assert vm1.succeed("echo a", "echo b") == "a\nb\n"
    assert vm1.shell is not None and vm1.shell.fast, (
        "the tiny guest has the nixos-repl ports: the fast framing is used"
    )


def test_execute_conventions(vm1: Machine) -> None:
    assert vm1.execute("echo out; exit 3") == (3, "out\n")
    assert vm1.execute("echo x; exit 3", check_return=False) == (-1, "x\n")
    assert vm1.execute("echo ignored", check_output=False) == (-2, "")
    assert vm1.succeed("echo next") == "next\n"


def test_failures_raise_nixpkgs_messages(vm1: Machine) -> None:
    with pytest.raises(RequestedAssertionFailed, match=r"command `exit 4` failed \(exit code 4\)"):
        vm1.succeed("exit 4")
    with pytest.raises(RequestedAssertionFailed, match="command `true` unexpectedly succeeded"):
        vm1.fail("true")
    assert vm1.fail("echo no; false") == "no\n"


def test_strict_mode_and_fresh_shell(vm1: Machine) -> None:
    assert vm1.execute("false; echo not-reached")[0] == 1
    assert vm1.execute("echo $UNDEFINED_VARIABLE")[0] != 0
    assert vm1.execute("false | true")[0] == 1
    vm1.succeed("cd /; export FOO=1")
    assert vm1.succeed("pwd; echo ${FOO:-unset}") == "/tmp\nunset\n"
    assert vm1.succeed("echo $0 $#") == vm1.succeed("echo $0 $#")  # no framing arguments leak
    assert vm1.succeed("echo $#") == "0\n"


def test_stdout_only_stderr_goes_to_the_console(vm1: Machine) -> None:
    assert vm1.succeed("echo to-stderr-xyz >&2") == ""
    vm1.wait_for_console_text("to-stderr-xyz", timeout=10)


def test_stdin_is_not_the_channel(vm1: Machine) -> None:
    assert vm1.succeed("cat") == ""
    assert vm1.succeed("echo after-cat") == "after-cat\n"


def test_syntax_errors_stay_inside_the_command(vm1: Machine) -> None:
    status, _ = vm1.execute("echo 'unterminated")
    assert status == 2
    assert vm1.succeed("echo still in sync") == "still in sync\n"
    assert vm1.succeed("for i in 1 2; do\n  echo line$i\ndone") == "line1\nline2\n"
    assert vm1.succeed("echo \"quotes 'single' \\$dollar\"") == "quotes 'single' $dollar\n"


def test_non_utf8_output_is_decoded_with_replacement(vm1: Machine) -> None:
    assert vm1.succeed(r"printf 'a\377b\n'") == "a\ufffdb\n"
    assert vm1.succeed(r"printf 'no newline'") == "no newline"


def test_ten_megabytes_of_output(vm1: Machine) -> None:
    out = vm1.succeed("head -c 10000000 /dev/zero | tr '\\0' a")
    assert len(out) == 10_000_000 and set(out) == {"a"}
    assert vm1.succeed("echo small") == "small\n"


def test_stray_lines_are_skipped(vm1: Machine) -> None:
    # Something in the guest writes to the backdoor console between commands.
    vm1.succeed("(sleep 0.2; echo STRAY-LINE > /dev/hvc0) > /dev/null 2>&1 &")
    time.sleep(1)
    assert vm1.succeed("echo mine") == "mine\n"
    assert vm1.execute("exit 5") == (5, "")


def test_keyboard_interrupt_kills_the_command_and_keeps_sync(vm1: Machine) -> None:
    interrupt_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        vm1.succeed("echo partial; sleep 1000")
    assert time.monotonic() - start < 0.5 + 2.0
    assert vm1.succeed("echo own-output") == "own-output\n"
    assert "sleep 1000" not in vm1.succeed("ps -o args"), "the guest command was killed"


def test_interrupt_during_output_keeps_sync(vm1: Machine) -> None:
    interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        vm1.succeed("while true; do echo spam; done")
    for i in range(3):
        assert vm1.succeed(f"echo reply-{i}") == f"reply-{i}\n"


def test_timeout_is_enforced_host_side(vm1: Machine) -> None:
    start = time.monotonic()
    status, out = vm1.execute("echo begun; sleep 100", timeout=dt.timedelta(seconds=1))
    assert status == 124 and out == "begun\n"
    assert time.monotonic() - start < 3.0
    assert "sleep 100" not in vm1.succeed("ps -o args")
    assert vm1.succeed("echo after-timeout") == "after-timeout\n"


def test_a_timeout_kills_a_command_that_redirected_its_output(vm1: Machine) -> None:
    # nixpkgs' attempt-timeout self-test does this: nothing of the command holds its stdout.
    start = time.monotonic()
    status, _ = vm1.execute("sleep 30 > /dev/null & exec sleep 20 > /dev/null", timeout=2)
    assert status == 124
    assert vm1.succeed("echo next") == "next\n"
    assert time.monotonic() - start < 2 + 3, "the next command does not wait behind it"
    processes = vm1.succeed("ps -o args")
    assert "sleep 20" not in processes and "sleep 30" not in processes, "its whole tree died"


def test_the_guest_has_gnu_timeout(vm1: Machine) -> None:
    # nixpkgs' framing runs `timeout N bash -c ...`: the guest has coreutils' compiled one.
    assert "GNU coreutils" in vm1.succeed("timeout --version")
    assert vm1.execute("timeout 0.2 sleep 5")[0] == 124
    assert vm1.execute("timeout -s KILL 0.2 sleep 5")[0] == 137


def test_background_job_holding_stdout_is_waited_for(
    vm1: Machine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fast_framing, "STDOUT_GRACE", 0.5)
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    out = vm1.succeed("(sleep 2; echo late) & echo early")
    assert out == "early\nlate\n", "nixpkgs' result: output until stdout closes"
    assert time.monotonic() - start >= 2.0
    assert any("holds its stdout open" in r.getMessage() for r in caplog.records)
    # Redirecting the background job's output returns at once, as in nixpkgs.
    start = time.monotonic()
    assert vm1.succeed("sleep 3 > /dev/null 2>&1 & echo quick") == "quick\n"
    assert time.monotonic() - start < 2.0


def test_wait_until(vm1: Machine) -> None:
    vm1.succeed("rm -f /tmp/flag; (sleep 1; touch /tmp/flag) > /dev/null 2>&1 &")
    vm1.wait_until_succeeds("test -e /tmp/flag", timeout=10)
    vm1.wait_for_file("/tmp/flag", timeout=dt.timedelta(seconds=5))
    vm1.succeed("(sleep 1; rm /tmp/flag) > /dev/null 2>&1 &")
    vm1.wait_until_fails("test -e /tmp/flag", timeout=10)
    with pytest.raises(RequestedAssertionFailed, match=r"action timed out after .* seconds"):
        vm1.wait_until_succeeds("false", timeout=1)


def test_ports_and_sockets(vm1: Machine) -> None:
    vm1.succeed("nc -l 1234 > /dev/null 2>&1 &")
    vm1.wait_for_open_port(1234, timeout=10)
    vm1.succeed("kill $(pidof nc) 2>/dev/null || true  # the first probe may have ended it")
    vm1.wait_for_closed_port(1234, timeout=10)
    vm1.succeed("nc -lU /tmp/test.sock > /dev/null 2>&1 &")
    vm1.wait_for_open_unix_socket("/tmp/test.sock", timeout=10)


def test_copies(vm1: Machine, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_text("from the host\n")
    vm1.copy_from_host(str(src), "/root/copied/hello.txt")
    assert vm1.succeed("cat /root/copied/hello.txt") == "from the host\n"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("deep\n")
    vm1.copy_from_host(str(tree), "/root/tree")
    assert vm1.succeed("cat /root/tree/sub/f") == "deep\n"
    vm1.copy_from_host_via_shell(str(src), "/root/via-shell/hello.txt")
    assert vm1.succeed("cat /root/via-shell/hello.txt") == "from the host\n"
    vm1.succeed("mkdir -p /root/out && echo guest-data > /root/out/data")
    vm1.copy_from_machine("/root/out/data", "results")
    assert (vm1.out_dir / "results" / "data").read_text() == "guest-data\n"
    vm1.copy_from_vm("/root/out", "")
    assert (vm1.out_dir / "out" / "data").read_text() == "guest-data\n"


def test_serial_console(vm1: Machine) -> None:
    assert "connecting to host..." in vm1.get_console_log()
    vm1.succeed("rm -f /tmp/rx; (cat /dev/ttyS0 > /tmp/rx) > /dev/null 2>&1 &")
    time.sleep(0.3)
    vm1.send_console("hello-serial\n")
    vm1.wait_until_succeeds("grep -q hello-serial /tmp/rx", timeout=10)
    vm1.succeed("kill $(pidof cat) || true")


def test_console_waiters_do_not_steal_lines(vm1: Machine) -> None:
    async def both() -> list[str]:
        waiters = [
            asyncio.ensure_future(vm1.aio.wait_for_console_text(r"shared-\d+", timeout=20))
            for _ in range(2)
        ]
        await asyncio.sleep(0.2)
        await vm1.aio.succeed("echo shared-42 >&2")
        return list(await asyncio.gather(*waiters))

    from nixos_repl.loop import run_sync

    assert run_sync(both()) == ["shared-42", "shared-42"]
    with pytest.raises(RequestedAssertionFailed, match="did not appear"):
        vm1.wait_for_console_text("never-printed-text", timeout=0.5)


def test_async_twins_run_machines_in_parallel(vm1: Machine, vm2: Machine) -> None:
    from nixos_repl.loop import run_sync

    async def both() -> tuple[str, str]:
        a, b = await asyncio.gather(
            vm1.aio.succeed("sleep 1; hostname"), vm2.aio.succeed("sleep 1; hostname")
        )
        return a, b

    start = time.monotonic()
    assert run_sync(both()) == ("vm1\n", "vm2\n")
    assert time.monotonic() - start < 1.9


def test_vlan_between_machines(vm1: Machine, vm2: Machine) -> None:
    assert "192.168.1.1/24" in vm1.succeed("ip -4 addr show")
    vm2.succeed("ping -c 1 -W 5 192.168.1.1")


def test_public_attributes(vm1: Machine) -> None:
    assert vm1.name == "vm1"
    assert vm1.booted and vm1.connected and vm1.is_up()
    assert isinstance(vm1.pid, int)
    assert vm1.state_dir.name == "vm-state-vm1"
    assert vm1.state_dir.stat().st_mode & 0o777 == 0o700
    assert vm1.shared_dir.name == "shared-xchg"
    assert vm1.out_dir.exists()
    vm1.sleep(0.1)
    vm1.sleep(dt.timedelta(milliseconds=100))
    with pytest.raises(TypeError):
        vm1.sleep(True)


def test_interrupt_while_a_background_job_holds_stdout(vm1: Machine) -> None:
    interrupt_after(1.0)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        vm1.succeed("sleep 1000 & echo started")
    assert time.monotonic() - start < 1.0 + 2.0
    assert "sleep 1000" not in vm1.succeed("ps -o args"), "the background job was killed too"
    assert vm1.succeed("echo in-sync") == "in-sync\n"


def test_async_twins_can_be_awaited_from_another_event_loop(vm1: Machine, vm2: Machine) -> None:
    # IPython and Jupyter await top-level coroutines on their own loop, not the I/O loop.
    async def cell() -> list[str]:
        return list(await asyncio.gather(vm1.aio.succeed("hostname"), vm2.aio.succeed("hostname")))

    assert asyncio.run(cell()) == ["vm1\n", "vm2\n"]

    async def cancelled_cell() -> None:
        task = asyncio.ensure_future(vm1.aio.succeed("sleep 1000"))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_cell())
    time.sleep(0.5)  # the I/O loop finishes killing the command
    assert "sleep 1000" not in vm1.succeed("ps -o args")
