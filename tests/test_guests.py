"""The embedded guest builder (pure parts, and the build itself)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from nixos_repl.cli import main
from nixos_repl.errors import GuestBuildError
from nixos_repl.guests import Cpio, build_tiny, extract_vmlinux, find_kernel, module_order


def test_module_order_puts_dependencies_first() -> None:
    _, moddir = find_kernel()
    order = [Path(p).name for p in module_order(moddir, ["virtio_console", "9pnet_virtio"])]
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") or "virtio.ko" in order
    assert order.index("9pnet.ko") < order.index("9pnet_virtio.ko")
    assert order[-1] == "9pnet_virtio.ko"
    with pytest.raises(GuestBuildError, match="no_such_module"):
        module_order(moddir, ["no_such_module"])


def test_extract_vmlinux_finds_the_elf_kernel() -> None:
    vmlinuz, _ = find_kernel()
    elf = extract_vmlinux(vmlinuz.read_bytes())
    assert elf is not None and elf.startswith(b"\x7fELF")
    assert extract_vmlinux(b"not a kernel") is None


def test_cpio_is_reproducible() -> None:
    def archive() -> bytes:
        cpio = Cpio()
        cpio.file("bin/tool", b"#!/bin/sh\n")
        cpio.symlink("bin/sh", "bash")
        cpio.chardev("dev/console", 5, 1)
        return cpio.pack()

    data = archive()
    assert data == archive()
    assert data.startswith(b"070701") and b"TRAILER!!!" in data and b"bin/tool" in data


def test_build_writes_run_scripts_and_reuses_the_cache(tmp_path: Path) -> None:
    scripts = build_tiny(["alpha", "beta"], tmp_path)
    assert [s.name for s in scripts] == ["run-alpha-vm", "run-beta-vm"]
    for script in scripts:
        assert os.access(script, os.X_OK)
        text = script.read_text()
        assert "nixos_repl.name=" in text and "QEMU_OPTS" in text
        assert not re.search(r"@[A-Z]+@", text), "every placeholder was filled"
    start = time.monotonic()
    build_tiny(["alpha"], tmp_path)
    assert time.monotonic() - start < 1.0, "a second build reuses the cached kernel and initramfs"


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="invalid machine name"):
        build_tiny(["bad name"], tmp_path)
    with pytest.raises(GuestBuildError, match="unique"):
        build_tiny(["a", "a"], tmp_path)


def test_cli_guest_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guest", "build", "tiny", "--name", "cli1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "run-cli1-vm").exists()
    assert str(tmp_path / "run-cli1-vm") in capsys.readouterr().out
    assert main(["guest", "build", "tiny", "--name", "bad name", "--out", str(tmp_path)]) == 1
