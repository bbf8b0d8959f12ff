"""The Jupyter kernel through the installed kernelspec: every notebook in notebooks/ executed
by nbclient, the Jupyter project's conformance suite, bad input, interrupts and shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jupyter_kernel_test
import nbformat
import pytest
from nbclient import NotebookClient

from .helpers import (
    BIN,
    Kernel,
    install_kernelspec,
    kernel_env,
    leftovers,
    machines_config,
    qemus_under,
    text_of,
    wait_for_no_qemu,
)

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook: Path, jupyter_path: Path, guest_dir: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    config = machines_config(guest_dir, tmp_path, ("vm1", "vm2"))
    read: Any = nbformat.read
    nb = read(notebook, as_version=4)
    client = NotebookClient(
        nb, kernel_name="nixos-repl", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=kernel_env(runtime, config))
    shots = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
        if "screenshot" in cell.source:
            shots += 1
            pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert pngs, f"no image/png for {cell.source!r}"
    assert shots >= 1
    out = tmp_path / "nixos-repl-out"
    assert list(out.glob("vm1-*.png")), "the %screenshot PNG was not saved"
    assert list(out.glob("session-*.jsonl"))
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("session-*"))  # none loose
    shown = [
        "".join(o.get("data", {}).get("text/plain", "") for o in c.outputs)
        for c in nb.cells
        if "%machines" in c.source.splitlines()
    ]
    assert shown and all(f"output: {out} (screenshots, session log)" in t for t in shown)
    assert wait_for_no_qemu(runtime) == []  # the kernel's shutdown stopped its machines


def interrupted(k: Kernel, code: str, after: float) -> None:
    """Run ``code``, interrupt the kernel ``after`` seconds later: the cell's own reply comes
    at once, an error, without waiting for another request."""
    msg_id = k.kc.execute(code)
    time.sleep(after)
    k.km.interrupt_kernel()
    reply = k.kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"


@pytest.fixture(scope="module")
def kernel(
    jupyter_path: Path, guest_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Kernel, Path]]:
    directory = tmp_path_factory.mktemp("kernel")
    runtime = directory / "rt"
    runtime.mkdir()
    config = machines_config(guest_dir, directory, ("vm1",))
    session = Kernel(kernel_env(runtime, config))
    try:
        yield session, runtime
    finally:
        session.shutdown()


def test_bad_input_keeps_the_kernel(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    reply, outputs = k.run("%succeed vm9 true")
    assert reply["status"] == "error"
    assert "no machine named 'vm9' (known machines: vm1)" in text_of(outputs)
    reply, outputs = k.run("%wait_for_unit vm1")
    assert reply["status"] == "error"
    assert "usage: %wait_for_unit [--user USER] [--timeout TIMEOUT] NAME UNIT" in text_of(outputs)
    reply, outputs = k.run("raise ValueError('from the cell')")
    assert reply["status"] == "error" and "ValueError" in text_of(outputs)
    reply, outputs = k.run("%succeed vm1 echo alive")
    assert reply["status"] == "ok" and "alive" in text_of(outputs)


# Each magic's bad input: the reason (and the usage line), never a traceback.
BAD_INPUT = [
    ("%machines bogus", "argument action: invalid choice: 'bogus'"),
    ("%machines add vm1 ./run-vm1-vm", "a machine named 'vm1' already exists"),
    ("%start vm9", "no machine named 'vm9'"),
    ("%start --bogus", "unrecognized arguments: --bogus"),
    ("%shutdown", "the following arguments are required: NAME"),
    ("%crash vm1 vm2", "unrecognized arguments: vm2"),
    ("%succeed vm1", "missing the command"),
    ("%fail", "missing the machine name and the command"),
    ("%execute vm9 true", "no machine named 'vm9'"),
    ("%snapshot vm1 a/b", "snapshot label 'a/b' is not valid"),
    ("%restore", "missing the machine name (or --all)"),
    ("%snapshots vm9", "no machine named 'vm9'"),
    ("%%sh\ntrue", "the following arguments are required: NAME"),
    ("%wait_for_unit vm1 x --timeout 0", "must be more than 0 seconds: '0'"),
    ("%wait_for_console vm1 (unclosed", "not a valid regex: missing ), unterminated subpattern"),
    ("%screenshot vm1 'unterminated", "No closing quotation"),
    ("%keys vm1", "the following arguments are required: KEY"),
    ("%keys vm1 ret nosuchkey", "unknown key 'nosuchkey' in send_key('nosuchkey')"),
    ("%screenshot vm1 /nonexistent/x", "the directory /nonexistent does not exist"),
    ("%rebuild false", "RebuildError: rebuild: the build command failed (exit code 1)"),
    ("%type vm9 x", "no machine named 'vm9'"),
    ("%console vm1 -n zero", "not a whole number: 'zero'"),
    ("%shell", "the following arguments are required: NAME"),
    ("%watch --interval 1", "must be at least"),
    ("%rebuild", "missing the build command"),
    ("%record --on --off", "contradictory options"),
    ("%export 'x.py", "No closing quotation"),
    ("%export {log}", "itself: writing the testScript there would destroy"),
]


def test_every_magic_has_its_bad_input() -> None:
    from nixos_repl.magic_table import MAGICS

    assert {line.lstrip("%").split()[0] for line, _ in BAD_INPUT} == set(MAGICS)


@pytest.mark.parametrize(("line", "message"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_of_every_magic_is_its_reason(
    kernel: tuple[Kernel, Path], line: str, message: str
) -> None:
    k, _ = kernel
    if "{log}" in line:
        _, outputs = k.run("%record")
        log = re.search(r": (\S+session-\S+\.jsonl) \(", text_of(outputs))
        assert log is not None, text_of(outputs)
        line = line.format(log=log.group(1))
    reply, outputs = k.run(line)
    assert reply["status"] == "error"
    text = text_of(outputs).strip()
    assert message in text
    assert len(text.splitlines()) <= 2, text
    assert "Traceback" not in text and "File " not in text and "nixos_repl" not in text
    assert k.run("2 + 2")[0]["status"] == "ok"


def test_a_failing_command_is_explained(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    reply, outputs = k.run("%succeed vm1 echo some-output; exit 7")
    assert reply["status"] == "error"
    assert reply["ename"] == "RequestedAssertionFailed"
    text = text_of(outputs)
    assert "command `echo some-output; exit 7` failed (exit code 7)" in text
    assert "machine: vm1" in text and "some-output" in text and "console (last" in text
    assert "nixos_repl/machine" not in text and "asyncio" not in text
    assert k.run("%succeed vm1 true")[0]["status"] == "ok"


def test_screenshot_is_inline_and_await_works(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    _, outputs = k.run("%screenshot vm1")
    assert any("image/png" in o.get("data", {}) for o in outputs)
    _, outputs = k.run("await vm1.aio.succeed('echo awaited')")
    assert "awaited" in text_of(outputs)


def test_a_long_wait_updates_a_status_display(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    reply, outputs = k.run("%succeed vm1 sleep 1.5")
    assert reply["status"] == "ok"
    shown = [o for o in outputs if o["type"] == "display_data"]
    updates = [o for o in outputs if o["type"] == "update_display_data"]
    assert len(shown) == 1
    display_id = shown[0]["transient"]["display_id"]
    assert shown[0]["data"]["text/plain"].startswith("vm1: must succeed: sleep 1.5 (")
    assert updates and all(u["transient"]["display_id"] == display_id for u in updates)
    assert updates[-1]["data"]["text/plain"] == ""  # gone when done


def test_notebook_command_serves_the_kernel(guest_dir: Path, tmp_path: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "nixos-repl-notebook-test"
    home = tmp_path / "home"
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }
    server = subprocess.Popen(
        [str(BIN / "nixos-repl"), "notebook", "--start-scripts", str(guest_dir / "run-vm1-vm"),
         "--no-browser", "--", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                url = f"http://127.0.0.1:{port}/api/kernelspecs?token={token}"
                with urllib.request.urlopen(url, timeout=2) as response:
                    specs = json.loads(response.read())
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "no server"
                time.sleep(0.2)
        assert specs["default"] == "nixos-repl"
        assert "nixos-repl" in specs["kernelspecs"]
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert "kernels get the machines vm1" in output


def test_interrupt_stops_the_guest_command(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    msg_id = k.kc.execute("%succeed vm1 sleep 100")
    time.sleep(1.5)
    start = time.monotonic()
    k.km.interrupt_kernel()
    reply = k.kc.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = k.kc.get_shell_msg(timeout=10)
    assert time.monotonic() - start < 3
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    reply, outputs = k.run("%succeed vm1 pgrep -x sleep || echo no-sleep")
    assert reply["status"] == "ok" and "no-sleep" in text_of(outputs)


def test_interrupt_cancels_an_awaited_twin(kernel: tuple[Kernel, Path]) -> None:
    """A kernel interrupt during ``await vm1.aio.succeed(...)`` ends the cell at once (its reply
    comes without waiting for another request), kills the guest command, and the next cell
    runs (stock ipykernel 7.4 answers only when the next request arrives, and aborts that)."""
    k, _ = kernel
    interrupted(k, "await vm1.aio.succeed('sleep 100')", after=1.5)
    reply, outputs = k.run("%succeed vm1 pgrep -x sleep || echo no-sleep")
    assert reply["status"] == "ok"
    assert "no-sleep" in text_of(outputs)


def test_shutdown_stops_the_machines(jupyter_path: Path, guest_dir: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    k = Kernel(kernel_env(runtime, machines_config(guest_dir, tmp_path, ("vm1",))))
    try:
        assert k.run("%start vm1")[0]["status"] == "ok"
        assert qemus_under(runtime)
    finally:
        k.shutdown()
    assert wait_for_no_qemu(runtime) == []


def test_kernel_without_config_declares_machines(
    jupyter_path: Path, guest_dir: Path, tmp_path: Path
) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir()
    k = Kernel(kernel_env(runtime, None))
    try:
        reply, outputs = k.run("%machines")
        assert "no machines" in text_of(outputs)
        reply, outputs = k.run(f"%machines add solo {guest_dir / 'run-solo-vm'}")
        assert reply["status"] == "ok" and "solo" in text_of(outputs)
        reply, outputs = k.run("solo.succeed('echo declared')")
        assert reply["status"] == "ok" and "declared" in text_of(outputs)
    finally:
        k.shutdown()
    assert wait_for_no_qemu(runtime) == []


class NixosReplKernelConformance(jupyter_kernel_test.KernelTests):  # type: ignore[misc]
    """The Jupyter project's kernel conformance suite, against the installed kernelspec."""

    kernel_name = "nixos-repl"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "%machi", "matches": {"%machines"}}]
    complete_code_samples = ["1", "print('hello, world')", "%machines"]
    incomplete_code_samples = ["print('''hello", "def f():"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "print?"
    code_generate_error = "raise ValueError('conformance')"
    code_execute_result = [{"code": "6*7", "result": "42"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>x</b>'))",
         "mime": "text/html"},
    ]  # fmt: skip
    code_history_pattern = "6*7*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "print"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    _saved: str | None = None

    @classmethod
    def setUpClass(cls) -> None:

        cls._saved = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = str(install_kernelspec(Path(tempfile.mkdtemp())))
        os.environ.pop("NIXOS_REPL_CONFIG", None)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        if cls._saved is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = cls._saved


def test_kernel_info_names_nixos_repl(kernel: tuple[Kernel, Path]) -> None:
    k, _ = kernel
    k.kc.kernel_info()
    reply = k.kc.get_shell_msg(timeout=10)
    while reply["msg_type"] != "kernel_info_reply":
        reply = k.kc.get_shell_msg(timeout=10)
    assert reply["content"]["implementation"] == "nixos-repl"
    assert reply["content"]["language_info"]["name"] == "python"


if __name__ == "__main__":
    unittest.main()


# -- ipykernel: the private hook this project overrides ----------------------------------------


def test_ipykernel_still_cancels_awaited_cells_through_the_overridden_method() -> None:
    """``NixosReplKernel._cancel_on_sigint`` replaces ipykernel's private method of the same
    name; it must still exist with that signature and still be what ``do_execute`` enters."""
    import ast
    import inspect
    import textwrap

    from ipykernel.ipkernel import IPythonKernel

    from nixos_repl.interactive.kernel import NixosReplKernel

    assert list(inspect.signature(IPythonKernel._cancel_on_sigint).parameters) == [
        "self",
        "future",
    ]
    assert "_cancel_on_sigint" in vars(NixosReplKernel)
    source = ast.parse(textwrap.dedent(inspect.getsource(IPythonKernel.do_execute)))
    used = {
        node.attr
        for node in ast.walk(source)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if node.value.id == "self"
    }
    assert "_cancel_on_sigint" in used
    # ... and the dependency stops at the releases this was checked against.
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    (pin,) = (
        r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "ipykernel"
    )
    assert any(spec.operator == "<" for spec in pin.specifier)
    assert pin.specifier.contains(importlib.metadata.version("ipykernel"))


def test_interrupt_ends_an_awaited_cell_at_once(jupyter_path: Path, tmp_path: Path) -> None:
    """Through the override, an interrupted ``await`` gets its reply without another request
    (ipykernel 7.4's own version leaves it waiting until the next message arrives)."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    k = Kernel(kernel_env(runtime, None))
    try:
        interrupted(k, "import asyncio\nawait asyncio.sleep(100)", after=1.0)
        assert k.run("1 + 1")[0]["status"] == "ok"
    finally:
        k.shutdown()


# -- ending the kernel with work in flight ------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "vm2"),
    [("shutdown", "command"), ("shutdown", "boot"), ("restart", "command"), ("sigterm", "boot")],
)
def test_the_kernel_ends_with_everything_in_flight(
    jupyter_path: Path, guest_dir: Path, tmp_path: Path, ending: str, vm2: str
) -> None:
    """A shutdown request, a restart request or SIGTERM while vm1 is watched (``%watch``) and
    has a guest shell attached (``%shell``), and a cell waits on vm2 (a running command, or a
    boot): the kernel ends within seconds, and every QEMU, vde_switch and attached shell with
    it."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    k = Kernel(kernel_env(runtime, machines_config(guest_dir, tmp_path, ("vm1", "vm2"))))
    attached: subprocess.Popen[bytes] | None = None
    try:
        for cell in ("%start vm1", "%succeed vm1 true", "%watch vm1 --interval 100", "%shell vm1"):
            reply, outputs = k.run(cell)
            assert reply["status"] == "ok", text_of(outputs)
        attached = subprocess.Popen(
            [str(BIN / "nixos-repl"), "shell", "vm1", "--state-dir", str(runtime / "vm-state-vm1")],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if vm2 == "command":
            assert k.run("%succeed vm2 true")[0]["status"] == "ok"
        else:
            assert k.run("%start vm2")[0]["status"] == "ok"
        k.kc.execute("%succeed vm2 sleep 100")
        time.sleep(1.5)  # the cell waits on vm2
        assert attached.poll() is None
        assert len(qemus_under(runtime)) == 2
        start = time.monotonic()
        if ending == "sigterm":
            k.km.signal_kernel(signal.SIGTERM)
        else:
            k.kc.shutdown(restart=ending == "restart")
        while k.km.is_alive() and time.monotonic() - start < 15:
            time.sleep(0.1)
        assert not k.km.is_alive(), f"the kernel still runs {ending}-requested 15 s ago"
        assert wait_for_no_qemu(runtime, timeout=5) == []
        assert leftovers(runtime) == []
        assert attached.wait(timeout=5) is not None
    finally:
        if attached is not None and attached.poll() is None:
            attached.kill()
        if k.km.is_alive():
            k.km.shutdown_kernel(now=True)
        k.kc.stop_channels()


def test_shutdown_interrupts_a_cell_that_does_not_end(jupyter_path: Path, tmp_path: Path) -> None:
    """A cell busy in the user's own code is interrupted, so the process still ends."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    k = Kernel(kernel_env(runtime, None))
    try:
        k.kc.execute("import time\ntime.sleep(100)")
        time.sleep(1.0)
        start = time.monotonic()
        k.kc.shutdown()
        while k.km.is_alive() and time.monotonic() - start < 15:
            time.sleep(0.1)
        assert not k.km.is_alive()
    finally:
        if k.km.is_alive():
            k.km.shutdown_kernel(now=True)
        k.kc.stop_channels()
