"""``nixos-repl --demo``: the REPL on two embedded tiny guests, one command from a prompt.

With a terminal it opens the REPL; without one (CI, a pipe) it runs :data:`TOUR`, a short
scripted tour through the same magics, and exits 0 when every step worked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import DriverConfig, MachineConfig
from ..driver import Driver
from ..guests import build_tiny, cache_dir
from .repl import run_repl

__all__ = ["DEMO_BANNER", "TOUR", "run_demo"]

DEMO_BANNER = """\
nixos-repl demo: two tiny guests, {machines}, on VLAN 1 (192.168.1.1 and .2).
  %start --all                      boot both (watch the status line)
  %succeed vm1 ping -c 1 192.168.1.2
  %machines                         state, uptime, pid, last console line
  %type vm1 echo hello\\n            type on vm1's screen, then:
  %screenshot vm1                   draw it here (and save the PNG)
  %shell vm1                        a root shell on a guest tty (Ctrl-] comes back)
  await asyncio.gather(vm1.aio.succeed("uname -r"), vm2.aio.succeed("hostname"))
Tab completes machine names; %succeed? shows help. Leave with Ctrl-D: the machines stop.
"""

TOUR = """\
%machines

%start --all

%machines

%succeed vm1 uname -sr

%succeed vm1 ping -c 1 -W 5 192.168.1.2

%execute vm2 echo oops; exit 3

%%sh vm2
echo "a cell runs as one script on $(hostname)"
for i in 1 2 3; do echo "line $i"; done

%type vm1 echo typed by the tour\\n

vm1.wait_until_tty_matches("1", "typed by the tour", timeout=30)

%screenshot vm1 tour-vm1

%console vm1 -n 3

import asyncio
await asyncio.gather(vm1.aio.succeed("hostname"), vm2.aio.succeed("hostname"))

%shutdown vm2

%machines
"""


def demo_driver(out_dir: Path) -> Driver:
    """vm1 and vm2, tiny guests built on first use (cached), on VLAN 1."""
    guests = cache_dir() / "demo"
    scripts = build_tiny(["vm1", "vm2"], guests)
    vms = {s.name[len("run-") : -len("-vm")]: s for s in scripts}
    config = DriverConfig(vms={n: MachineConfig(n, s) for n, s in vms.items()}, vlans=[1])
    return Driver(config, out_dir=out_dir, interactive=True)


def run_demo(out_dir: Path, *, verbose: bool = False, tour: bool | None = None) -> int:
    """The demo REPL on a terminal, else the scripted tour."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir = out_dir.resolve()
    if tour is None:
        tour = not sys.stdin.isatty()
    print("nixos-repl demo: building the tiny guests (cached after the first time)", flush=True)
    driver = demo_driver(out_dir)
    if tour:
        print("stdin is not a terminal: running the scripted tour\n", flush=True)
        return run_repl(driver, verbose=verbose, script=TOUR)
    return run_repl(driver, verbose=verbose, banner=DEMO_BANNER)
