"""Golden files for the nixpkgs-shaped outputs: the terminal log, the XML log and JUnit XML."""

from __future__ import annotations

import io
import logging
import re
import xml.dom.minidom
from pathlib import Path

import pytest

from nixos_repl.logs import (
    ATTRS,
    FINISHED,
    NESTED,
    NESTED_MSG,
    DriverLogger,
    JUnitHandler,
    LogLevel,
    TerminalHandler,
    XMLLogHandler,
    attach,
)

GOLDEN = Path(__file__).parent / "golden"


def normalise(text: str) -> str:
    text = re.sub(r"in \d+\.\d\d seconds", "in 0.00 seconds", text)
    return re.sub(r'\btime="[^"]*"', 'time="0"', text)


def check_golden(name: str, actual: str) -> None:
    golden = GOLDEN / name
    if not golden.exists():
        golden.write_text(actual)
        pytest.fail(f"golden file {golden} did not exist: written, check it and rerun")
    assert normalise(actual) == normalise(golden.read_text())


def scenario() -> None:
    """What a short run logs: driver steps, machine lines, serial lines, subtests, an error."""
    log = DriverLogger()
    vm1 = logging.getLogger("nixos_repl.machine.vm1")
    serial = logging.getLogger("nixos_repl.machine.vm1.serial")
    log.info("Machine state will be reset. To keep it, pass --keep-machine-state")
    with log.nested("start all VLans"):
        logging.getLogger("nixos_repl.vlan").info("start vlan %d", 1)
    log.info("Test will time out and terminate in 3600 seconds")
    with log.nested("run the VM test script"):
        with log.nested("start all VMs"):
            vm1.info("starting vm")
        # A machine's own nested step, with the structure the handlers read from ``extra``.
        step = {NESTED_MSG: "must succeed: true", ATTRS: {"image": "shot.png"}}
        vm1.info("%s", "must succeed: true", extra={NESTED: "start", **step})
        vm1.info(FINISHED, "must succeed: true", 0.5, extra={NESTED: "end", **step})
        serial.debug("%s # %s", "vm1", "Booting \x1b[0mLinux")
        with log.subtest("my subtest"):
            log.log("Subtest log")
        with log.subtest("failing subtest"):
            log.log("Some output", {"machine": "vm1"})
            serial.debug("%s # %s", "vm1", "a serial line")
            log.log_test_error("Error occurred")
        log.debug("hidden at info")
    with log.nested("cleanup"):
        vm1.info("kill QemuMachine (pid %d)", 42)


def test_terminal_golden() -> None:
    plain, colored = io.StringIO(), io.StringIO()
    with attach([TerminalHandler(plain, color=False), TerminalHandler(colored, color=True)]):
        scenario()
    check_golden("terminal.txt", plain.getvalue())
    check_golden("terminal-color.txt", colored.getvalue())


def test_junit_golden(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    with attach([JUnitHandler(path)]):
        scenario()
    check_golden("junit.xml", path.read_text())


def test_junit_main_case_only_without_subtests(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    with attach([JUnitHandler(path)]):
        log = DriverLogger()
        log.log("just a line")
        log.log_test_error("Traceback (most recent call last):")
    check_golden("junit-main.xml", path.read_text())


def test_xml_log_golden(tmp_path: Path) -> None:
    path = tmp_path / "log.xml"
    with attach([XMLLogHandler(path)]):
        scenario()
    text = path.read_text()
    xml.dom.minidom.parseString(text)  # well-formed, closed
    check_golden("log.xml", text)


def test_serial_switch_and_level(tmp_path: Path) -> None:
    stream = io.StringIO()
    with attach([TerminalHandler(stream, color=False, log_level=LogLevel.DEBUG)]):
        log = DriverLogger()
        log.print_serial_logs(False)
        log.log_serial("hidden", "vm1")
        log.print_serial_logs(True)
        log.log_serial("shown", "vm1")
        log.debug("a debug line")
    assert stream.getvalue() == "vm1 # shown\na debug line\n"
