"""nixpkgs' own framing (a guest without nixos-repl's ports) keeps the semantics and the sync."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixos_repl import Machine, MachineError, Registry, RequestedAssertionFailed
from nixos_repl.loop import get_loop

from .helpers import interrupt_after


@pytest.fixture(scope="module")
def compat(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    out = tmp_path_factory.mktemp("compat")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NIXOS_REPL_SHELL_FRAMING", "nixpkgs")
        registry = Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=out)
    with registry as reg:
        machine = reg["solo"]
        machine.connect()
        yield machine


def test_semantics(compat: Machine) -> None:
    assert compat.shell is not None and not compat.shell.fast
    assert compat.succeed("echo a", "echo b") == "a\nb\n"
    assert compat.execute("echo out; exit 3") == (3, "out\n")
    assert compat.execute("false | true")[0] == 1
    assert compat.execute("echo x", check_output=False) == (-2, "")
    assert compat.succeed(r"printf 'a\377b'") == "a\ufffdb"
    assert compat.execute("sleep 5", timeout=1)[0] == 124  # GNU timeout in the guest


def test_interrupted_reply_is_skipped(compat: Machine) -> None:
    interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        compat.succeed("sleep 2; echo stale-reply")
    assert compat.succeed("echo fresh-reply") == "fresh-reply\n"


def test_timeouts_end_the_commands_and_the_waits(compat: Machine) -> None:
    start = time.monotonic()
    assert compat.execute("sleep 30 > /dev/null & exec sleep 20 > /dev/null", timeout=2)[0] == 124
    assert compat.succeed("echo next") == "next\n"
    assert time.monotonic() - start < 2 + 3
    start = time.monotonic()
    with pytest.raises(RequestedAssertionFailed, match="action timed out after"):
        compat.wait_until_succeeds("sleep 1000", timeout=3)
    assert time.monotonic() - start < 3 + 2, "the wait ends at its timeout"
    processes = compat.succeed("ps -o args")
    assert not {"sleep 20", "sleep 30", "sleep 1000"} & set(processes.splitlines())


def test_output_the_console_port_lost_raises(compat: Machine) -> None:
    # The host falls behind for a moment (a busy machine): QEMU drops console bytes.
    loop = get_loop()
    stall = threading.Timer(1.0, lambda: loop.call_soon_threadsafe(time.sleep, 1.5))
    stall.start()
    try:
        with pytest.raises(MachineError, match="arrived incomplete"):
            compat.succeed("head -c 10000000 /dev/zero | tr '\\0' a")
    finally:
        stall.join()
    assert compat.succeed("echo in-sync") == "in-sync\n"
