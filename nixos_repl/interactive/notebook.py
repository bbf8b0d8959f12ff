"""``nixos-repl notebook [machine options]``: JupyterLab whose nixos-repl kernels get those
machines.

The machines are written to a driverConfiguration.json whose path the kernel reads from
``NIXOS_REPL_CONFIG``; the kernelspec is put on ``JUPYTER_PATH`` for this server only (nothing
is installed), and nixos-repl is the default kernel of new notebooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config import DriverConfig, MachineConfig
from .kernel import KERNEL_NAME, write_kernelspec
from .session import CONFIG_ENV

__all__ = ["config_json", "notebook_env", "run_notebook"]


def config_json(config: DriverConfig) -> dict[str, object]:
    """``config`` in nixpkgs' driverConfiguration.json shape."""

    def entries(machines: dict[str, MachineConfig]) -> dict[str, object]:
        return {
            name: {"name": name, "start_script": str(m.start_script.absolute())}
            for name, m in machines.items()
        }

    return {
        "vms": entries(config.vms),
        "containers": entries(config.containers),
        "vlans": list(config.vlans),
        "global_timeout": config.global_timeout.total_seconds(),
        "enable_ssh_backdoor": False,
        "test_script": str(config.test_script or "interactive"),
    }


def notebook_env(
    config: DriverConfig, workdir: Path, config_file: Path | None = None
) -> dict[str, str]:
    """The environment of the server: the kernelspec on JUPYTER_PATH, the machines' config.

    With ``config_file`` (``--config``), kernels read that file itself, so ``rebuild()`` in a
    notebook sees what a build changes in it; else a copy of ``config`` is written.
    """
    env = dict(os.environ)
    write_kernelspec(workdir / "share" / "jupyter" / "kernels" / KERNEL_NAME)
    paths = [str(workdir / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in paths if p)
    if config_file is not None:
        env[CONFIG_ENV] = str(config_file.absolute())
    elif config.vms or config.containers:
        path = workdir / "driverConfiguration.json"
        path.write_text(json.dumps(config_json(config), indent=2) + "\n")
        env[CONFIG_ENV] = str(path)
    else:
        env.pop(CONFIG_ENV, None)
    return env


def run_notebook(
    config: DriverConfig,
    out_dir: Path,
    *,
    open_browser: bool = True,
    extra: Sequence[str] = (),
    config_file: Path | None = None,
) -> int:
    """Run JupyterLab in ``out_dir`` until it is stopped; returns its exit status."""
    with tempfile.TemporaryDirectory(prefix="nixos-repl-notebook-") as tmp:
        env = notebook_env(config, Path(tmp), config_file)
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            f"--notebook-dir={out_dir}",
            f"--MultiKernelManager.default_kernel_name={KERNEL_NAME}",
            *([] if open_browser else ["--no-browser"]),
            *(["--allow-root"] if os.geteuid() == 0 else []),
            *extra,
        ]
        names = ", ".join(sorted([*config.vms, *config.containers]))
        names = names or "none (declare them with %machines add)"
        print(f"nixos-repl notebook: kernels get the machines {names}", flush=True)
        server = subprocess.Popen(command, env=env)

        def forward(signum: int, _frame: object) -> None:
            server.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            while True:
                try:
                    return server.wait()
                except KeyboardInterrupt:  # Jupyter got it too, and asks or stops
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
