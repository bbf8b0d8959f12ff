"""The demo: two tiny guests on one VLAN, driven through the public API.

Run with ``nixos-repl demo`` (or ``./dev.sh demo``, which also installs what it needs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .guests import build_tiny
from .registry import Registry

__all__ = ["run_demo"]


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(guests: Path | None, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nixos-repl-demo-") as tmp:
        scripts = build_tiny(["vm1", "vm2"], guests or Path(tmp))
        say(f"built start scripts: {', '.join(str(s) for s in scripts)}")
        with Registry.from_start_scripts(scripts, vlans=[1], out_dir=out_dir) as registry:
            vm1, vm2 = registry["vm1"], registry["vm2"]
            t = time.monotonic()
            registry.start_all()
            vm1.connect()
            vm2.connect()
            say(f"both machines up in {time.monotonic() - t:.1f} s: {registry.states()}")
            say(f"vm1 kernel: {vm1.succeed('uname -r').strip()}")
            say(f"vm2 hostname: {vm2.succeed('hostname').strip()}")
            vm1.succeed("ping -c 1 -W 5 192.168.1.2")
            say("vm1 pings vm2 over VLAN 1 (192.168.1.1 -> 192.168.1.2)")
            status, out = vm2.execute("echo oops; exit 3")
            say(f"a failing command: status {status}, output {out.strip()!r}")
            t = time.monotonic()
            for _ in range(100):
                vm1.succeed("true")
            say(f"100 commands on vm1: {(time.monotonic() - t) * 10:.2f} ms each")
            vm1.send_chars("echo typed-on-tty1\n")
            vm1.wait_until_tty_matches("1", r"typed-on-tty1\s+typed-on-tty1", timeout=30)
            shot = vm1.screenshot("vm1-screen")
            say(f"typed on vm1's tty1, screenshot {shot.width}x{shot.height} saved as {shot.path}")
            vm2.succeed("echo hello from vm2 > /tmp/greeting")
            vm2.copy_from_machine("/tmp/greeting")
            say(f"copied from vm2: {(out_dir / 'greeting').read_text().strip()!r}")
            vm1.shutdown()
            say(f"vm1 shut down; states now {registry.states()}")
        say("done: every VM is gone")
    return 0


if __name__ == "__main__":
    guests = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    sys.exit(run_demo(guests, Path("demo-out")))
