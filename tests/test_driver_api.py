"""The driver's pure logic: retry, polling conditions, names, the namespace, the debug hook."""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from nixos_repl.config import DriverConfig, MachineConfig
from nixos_repl.driver import Driver, PollingCondition, _retry, pythonize_name, retry
from nixos_repl.errors import PollingConditionError, RequestedAssertionFailed
from nixos_repl.logs import DriverLogger, TerminalHandler, attach

NIXPKGS_SYMBOLS = (
    "start_all, test_script, machines, machines_qemu, machines_nspawn, vlans, driver, log, os, "
    "create_machine, subtest, run_tests, join_all, retry, serial_stdout_off, serial_stdout_on, "
    "polling_condition, BaseMachine, QemuMachine, NspawnMachine, t, debug, dump_machine_ssh"
).split(", ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def terminal() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    with attach([TerminalHandler(stream, color=False)]):
        yield stream


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Driver]:
    with redirect_stdout(io.StringIO()):
        yield Driver(out_dir=tmp_path)


def fake_vm(tmp_path: Path, name: str) -> MachineConfig:
    script = tmp_path / f"run-{name}-vm"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    return MachineConfig(name, script)


# -- retry -----------------------------------------------------------------------------------


def test_retry_succeeds_once_the_function_does() -> None:
    clock, calls = FakeClock(), []

    def fn(last_try: bool) -> bool:
        calls.append(last_try)
        return len(calls) == 3

    _retry(fn, dt.timedelta(seconds=10), clock.sleep, clock)
    assert calls == [False, False, False]
    assert clock.sleeps == [1, 1]


def test_retry_has_one_last_try_after_the_deadline() -> None:
    clock, calls = FakeClock(), []

    def fn(last_try: bool) -> bool:
        calls.append(last_try)
        return last_try

    _retry(fn, dt.timedelta(seconds=3), clock.sleep, clock)
    assert calls == [False, False, False, True]


def test_retry_timeout_message() -> None:
    clock = FakeClock()
    with pytest.raises(RequestedAssertionFailed) as e:
        _retry(lambda _: False, dt.timedelta(seconds=2), clock.sleep, clock)
    assert str(e.value) == "action timed out after 2.00 seconds (timeout=2.0)"


def test_retry_arguments() -> None:
    with pytest.raises(TypeError):
        retry(lambda _: True, timeout_seconds=1, timeout=dt.timedelta(seconds=1))
    with pytest.raises(TypeError):
        retry(lambda _: True, timeout=True)
    with pytest.warns(UserWarning, match=r"retry\(\): passing a bare int/float as a duration"):
        retry(lambda _: True, timeout_seconds=5)
    retry(lambda _: True, timeout=dt.timedelta(seconds=5))


# -- polling conditions ----------------------------------------------------------------------


def test_polling_condition_description_and_results(terminal: io.StringIO) -> None:
    logger = DriverLogger()

    def documented() -> bool:
        "the service answers"
        return True

    def named() -> None:
        return None

    def broken() -> bool:
        raise RuntimeError("boom")

    assert PollingCondition(documented, logger).description == "the service answers"
    assert PollingCondition(named, logger).description == "named"
    assert PollingCondition(named, logger, description=42).description == "42"  # type: ignore[arg-type]
    assert PollingCondition(named, logger).check() is True  # None counts as success
    failing = PollingCondition(broken, logger)
    assert failing.check() is False  # an exception counts as failure
    with pytest.raises(PollingConditionError, match="Polling condition failed: broken"):
        PollingCondition(broken, logger).maybe_raise()
    log = terminal.getvalue()
    assert "Checking polling condition 'broken'\n(not called yet)\n" in log
    assert "Polling condition failed: broken\n(finished: Checking polling condition" in log


def test_polling_condition_interval() -> None:
    calls = []

    def cond() -> bool:
        calls.append(1)
        return True

    condition = PollingCondition(cond, DriverLogger(), dt.timedelta(hours=1))
    assert condition.check() and condition.check()
    assert len(calls) == 1  # not overdue: not called again
    assert condition.check(force=True)
    assert len(calls) == 2


def test_polling_condition_forms(driver: Driver, terminal: io.StringIO, tmp_path: Path) -> None:
    state = {"ok": True}

    @driver.polling_condition
    def plain() -> bool:
        return state["ok"]

    @driver.polling_condition(interval=dt.timedelta(seconds=0), description="custom")
    def factory() -> bool:
        return state["ok"]

    called = driver.polling_condition(lambda: True, seconds_interval=0.5)
    machine = driver.create_machine(str(fake_vm(tmp_path, "polled").start_script))
    assert not machine.aio._host_loops(), "without conditions, waits run in the guest"
    with plain, factory, called:
        assert len(driver.polling_conditions) == 3
        assert machine.aio._host_loops(), "conditions are checked before each try"
        driver.check_polling_conditions()
        state["ok"] = False
        with pytest.raises(PollingConditionError, match="custom"):
            driver.check_polling_conditions()
    assert len(driver.polling_conditions) == 0


def test_poll_wait(driver: Driver, terminal: io.StringIO) -> None:
    calls = []

    @driver.polling_condition
    def second_time() -> bool:
        "it works the second time"
        calls.append(1)
        return len(calls) >= 2

    second_time.wait(timeout=dt.timedelta(seconds=30))
    log = terminal.getvalue()
    assert "waiting for it works the second time\n" in log
    assert "(it works the second time failure not fatal yet)\n" in log


# -- names and the namespace -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "python"),
    [("vm1", "vm1"), ("my-vm", "my_vm"), ("1st", "_st"), ("a.b-c", "a_b_c"), ("_x", "_x")],
)
def test_pythonize_name(name: str, python: str) -> None:
    assert pythonize_name(name) == python


def test_symbols_are_nixpkgs_newest_set(tmp_path: Path) -> None:
    config = DriverConfig(vms={n: fake_vm(tmp_path, n) for n in ("web-1", "db")})
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        driver = Driver(config, out_dir=tmp_path)
        symbols = driver.test_symbols()
    assert list(symbols)[: len(NIXPKGS_SYMBOLS)] == NIXPKGS_SYMBOLS
    assert set(symbols) == {*NIXPKGS_SYMBOLS, "web_1", "db"}
    assert symbols["web_1"].name == "web-1"
    assert symbols["machines"] == [symbols["db"], symbols["web_1"]]  # sorted by name
    assert stdout.getvalue() == (
        "additionally exposed symbols:\n    db, web-1,\n    ,\n    "
        + ", ".join(NIXPKGS_SYMBOLS)
        + "\n"
    )
    assert driver.test_symbols() is symbols  # one namespace, shared
    assert driver.symbol_names() == [*NIXPKGS_SYMBOLS, "Machine"]


def test_assertion_tester_raises_requested_assertion_failed(driver: Driver) -> None:
    t = driver.test_symbols()["t"]
    with pytest.raises(RequestedAssertionFailed):
        t.assertEqual(1, 2)
    with pytest.raises(AssertionError):
        t.assertIn("x", "abc")


def test_lone_machine_alias_warns(tmp_path: Path) -> None:
    config = DriverConfig(vms={"solo": fake_vm(tmp_path, "solo")})
    with redirect_stdout(io.StringIO()):
        symbols = Driver(config, out_dir=tmp_path).test_symbols()
    with pytest.warns(UserWarning, match="when the only machine is called solo"):
        assert symbols["machine"].name == "solo"


def test_lone_machine_called_machine_is_not_wrapped(tmp_path: Path) -> None:
    config = DriverConfig(vms={"machine": fake_vm(tmp_path, "machine")})
    with redirect_stdout(io.StringIO()):
        driver = Driver(config, out_dir=tmp_path)
        symbols = driver.test_symbols()
    assert symbols["machine"] is driver.machines[0]


def test_create_machine_binds_into_the_namespace(driver: Driver, tmp_path: Path) -> None:
    symbols = driver.test_symbols()
    script = fake_vm(tmp_path, "late-one").start_script
    machine = driver.create_machine(str(script))
    assert symbols["late_one"] is machine
    assert machine in symbols["machines"]
    assert driver.polling_conditions in machine.callbacks
    with pytest.raises(TypeError, match="dict form"):
        driver.create_machine({"startCommand": "x"})  # type: ignore[arg-type]


def test_subtest_logs_failure_and_reraises(driver: Driver, terminal: io.StringIO) -> None:
    with pytest.raises(RequestedAssertionFailed), driver.subtest("bad"):
        raise RequestedAssertionFailed("nope")
    log = terminal.getvalue().splitlines()
    assert log[0] == "subtest: bad"
    assert log[1] == '!!! Test "bad" failed with error: "nope"'
    assert log[2].startswith("(finished: subtest: bad, in ")


def test_log_error_exits(driver: Driver, terminal: io.StringIO) -> None:
    with pytest.raises(SystemExit) as e:
        driver.logger.error("fatal")
    assert e.value.code == 1
    assert terminal.getvalue() == "fatal\n"


def test_log_levels(driver: Driver, terminal: io.StringIO) -> None:
    from nixos_repl.logs import LogLevel

    log = driver.logger
    log.set_log_level(LogLevel.WARNING)
    log.info("hidden info")
    log.warning("shown warning")
    log.log("always shown")
    log.set_log_level(LogLevel.DEBUG)
    log.debug("shown debug")
    logging.getLogger("nixos_repl.machine.vm9").info("machine line")
    assert terminal.getvalue().splitlines() == [
        "shown warning",
        "always shown",
        "shown debug",
        "vm9: machine line",
    ]
