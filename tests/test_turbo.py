"""TCG turbo: what the driver adds to a start script's environment, and what a guest gets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nixos_repl import Machine
from nixos_repl.guests import find_kernel
from nixos_repl.machine.turbo import turbo_env

LOG = logging.getLogger("test")


@pytest.fixture
def nixos_script(tmp_path: Path) -> Path:
    """A start script shaped like NixOS's run-vm script, booting the host's bzImage."""
    vmlinuz, _ = find_kernel()
    script = tmp_path / "run-machine-vm"
    script.write_text(
        "#!/bin/sh\nexec qemu-kvm -machine accel=kvm:tcg \\\n"
        f"    -kernel ${{NIXPKGS_QEMU_KERNEL_machine:-{vmlinuz}}} \\\n"
        '    -append "$(cat /nix/store/x-kernel-params) $QEMU_KERNEL_PARAMS" "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_under_tcg_the_kernel_is_the_cached_elf_and_norandmaps_is_added(
    nixos_script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXOS_REPL_CACHE", str(tmp_path / "cache"))
    env = {"NIXOS_REPL_ACCEL": "tcg", "QEMU_KERNEL_PARAMS": "console=ttyS0"}
    extra = turbo_env("machine", str(nixos_script), env, LOG)
    elf = Path(extra["NIXPKGS_QEMU_KERNEL_machine"])
    assert elf.parent == tmp_path / "cache" / "kernels"
    assert elf.read_bytes()[:4] == b"\x7fELF"
    assert extra["QEMU_KERNEL_PARAMS"] == "console=ttyS0 norandmaps"
    mtime = elf.stat().st_mtime_ns
    assert turbo_env("machine", str(nixos_script), env, LOG) == extra
    assert elf.stat().st_mtime_ns == mtime, "extracted once, then taken from the cache"


def test_opt_outs_and_kvm(
    nixos_script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXOS_REPL_CACHE", str(tmp_path / "cache"))
    script = str(nixos_script)
    assert turbo_env("machine", script, {"NIXOS_REPL_ACCEL": "kvm"}, LOG) == {}
    assert (
        turbo_env("machine", script, {"NIXOS_REPL_ACCEL": "tcg", "NIXOS_REPL_TURBO": "0"}, LOG)
        == {}
    )
    only = turbo_env(
        "machine", script, {"NIXOS_REPL_ACCEL": "tcg", "NIXOS_REPL_TURBO": "norandmaps"}, LOG
    )
    assert only == {"QEMU_KERNEL_PARAMS": "norandmaps"}
    # A kernel the user chose is left alone; so is a script without NixOS's kernel variable.
    chosen = {"NIXOS_REPL_ACCEL": "tcg", "NIXPKGS_QEMU_KERNEL_machine": "/my/kernel"}
    assert "NIXPKGS_QEMU_KERNEL_machine" not in turbo_env("machine", script, chosen, LOG)
    other = tmp_path / "other"
    other.write_text('#!/bin/sh\nexec qemu -kernel /boot/vmlinuz "$@"\n')
    assert turbo_env("x", str(other), {"NIXOS_REPL_ACCEL": "tcg"}, LOG) == {
        "QEMU_KERNEL_PARAMS": "norandmaps"
    }


def test_a_tcg_guest_boots_with_norandmaps(vm1: Machine) -> None:
    assert "norandmaps" in vm1.succeed("cat /proc/cmdline").split()
