"""The boot cache: keys (pure), and machines started from a saved boot on the tiny guest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nixos_repl import Machine, Registry
from nixos_repl.machine.bootcache import ENV, BootCache, key_parts

from .helpers import BIN, machines_config


def script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run-x-vm"
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A boot cache for the machines this test starts."""
    monkeypatch.setenv(ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def boot_solo(guest_dir: Path, out: Path) -> None:
    with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=out) as reg:
        assert reg["solo"].succeed("echo up") == "up\n"


@pytest.fixture(scope="module")
def saved_solo(guest_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding solo's saved boot, booted once for the tests that start from one."""
    root = tmp_path_factory.mktemp("saved-solo")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV, str(root / "cache"))
        boot_solo(guest_dir, root)
    return root / "cache"


def test_the_key_covers_what_shapes_the_vm(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel")
    start = script(tmp_path, f'#!/bin/sh\nexec qemu-system-x86_64 -kernel {kernel} "$@"\n')
    base = key_parts(str(start), {})
    assert key_parts(str(start), {}) == base, "the same machine, the same key"
    assert (
        key_parts(str(start), {"QEMU_OPTS": "-m 512"})["the environment"] != base["the environment"]
    )
    assert key_parts(str(start), {"QEMU_VDE_SOCKET_1": "/x"})["the VLANs"] == "1"
    assert key_parts(str(start), {"UNRELATED": "1"}) == base
    kernel.write_bytes(b"another kernel")
    assert key_parts(str(start), {})["a file it names"] != base["a file it names"]
    start.write_text(start.read_text() + "# edited\n")
    assert key_parts(str(start), {})["the start script"] != base["the start script"]
    assert "QEMU emulator version" in base["QEMU's version"]


def test_a_miss_says_which_part_changed(tmp_path: Path) -> None:
    cache = BootCache(tmp_path / "cache")
    parts = {"the start script": "a", "QEMU's version": "7.2"}
    assert cache.lookup("vm1", parts) == (None, "no entry for it yet")
    state = tmp_path / "state.qcow2"
    state.write_bytes(b"state")
    entry = cache.store("vm1", parts, state, {}, {"label": "booted", "size": 5})
    found, _ = cache.lookup("vm1", parts)
    assert found is not None and found.path == entry.path
    assert cache.lookup("vm1", {**parts, "QEMU's version": "8.0"}) == (
        None,
        "QEMU's version changed",
    )
    assert [e.meta["name"] for e in cache.entries()] == ["vm1"]
    assert not list((tmp_path / "cache").glob(".tmp-*")), "nothing half-written is left"
    assert cache.clear() == 1 and cache.entries() == []


def test_a_second_run_starts_from_the_saved_boot(
    guest_dir: Path, tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        out.mkdir()
        caplog.clear()
        with caplog.at_level("INFO"):
            with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=out) as reg:
                solo = reg["solo"]
                if run == 1:
                    reg.start_all()  # start() forks too: the machine is up when it returns
                    assert solo.state == "up"
                solo.succeed("echo hello > /tmp/shared/from-guest")
                runs.append(caplog.text)
                assert solo.succeed("grep -c 9p /proc/mounts") == "2\n"
                assert solo.shell is not None and solo.shell.fast
                if run == 1:
                    assert "restored snapshot booted" in solo.get_console_log()
                    solo.succeed("touch /root/only-in-run-2")
                    solo.restore()  # its saved boot is a snapshot like any other
                    solo.fail("test -e /root/only-in-run-2")
    assert "booting solo cold (no entry for it yet)" in runs[0]
    assert "saved the boot of solo" in runs[0]
    assert "solo started from its saved boot" in runs[1]


def test_a_restart_forks_from_the_saved_boot_until_the_machine_has_snapshots_of_its_own(
    guest_dir: Path,
    tmp_path: Path,
    cache: Path,
    saved_solo: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutil.copytree(saved_solo, cache)
    with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=tmp_path) as reg:
        solo = reg["solo"]
        solo.succeed("touch /root/before-the-crash")
        solo.crash()
        with caplog.at_level("INFO"):
            solo.start()
        assert solo.state == "up" and "solo started again from its saved boot" in caplog.text
        solo.fail("test -e /root/before-the-crash")  # a boot, as after a cold one
        solo.snapshot("mine")
        solo.crash()
        caplog.clear()
        with caplog.at_level("INFO"):
            solo.start()
        assert solo.state == "starting", "its snapshots are kept: it boots"
        assert solo.succeed("echo up") == "up\n"
    assert "started again" not in caplog.text


def test_a_restart_keeps_what_the_machine_wrote_to_its_disk(
    guest_dir: Path, tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A writable disk in the state directory (a NixOS VM's) keeps its changes over a restart,
    as without the cache: the machine boots, it does not fork from its saved boot."""
    start = script(
        tmp_path,
        "#!/bin/sh\n[ -e disk.qcow2 ] || qemu-img create -q -f qcow2 disk.qcow2 1M\n"
        f'exec {guest_dir}/run-crashy-vm -drive file="$PWD/disk.qcow2",if=virtio "$@"\n',
    )
    with Registry([("crashy", start)], out_dir=tmp_path) as reg:
        crashy = reg["crashy"]
        crashy.succeed("echo on-the-disk | dd of=/dev/vda conv=fsync 2>/dev/null")
        crashy.shutdown()
        with caplog.at_level("INFO"):
            assert crashy.succeed("head -c 12 /dev/vda") == "on-the-disk\n"
    assert [e.meta["disks"] for e in BootCache(cache).entries()] == [["disk.qcow2"]]
    assert "started again" not in caplog.text


def test_a_machine_driven_while_it_boots_is_not_saved(
    guest_dir: Path, tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        with Registry.from_start_scripts([guest_dir / "run-solo-vm"], out_dir=tmp_path) as reg:
            solo = reg["solo"]
            solo.start()
            solo.send_key("ctrl-alt-f2")  # the saved state would not be a boot's
            assert solo.succeed("echo up") == "up\n"
    assert "boot cache: not saving solo: it was driven while booting" in caplog.text
    assert BootCache(cache).entries() == []


def test_a_changed_machine_boots_cold_and_says_why(
    guest_dir: Path,
    tmp_path: Path,
    cache: Path,
    saved_solo: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copytree(saved_solo, cache)
    monkeypatch.setenv("QEMU_KERNEL_PARAMS", "quiet")
    with caplog.at_level("INFO"):
        boot_solo(guest_dir, tmp_path)
    assert "booting solo cold (the environment changed)" in caplog.text


def test_two_saves_of_the_same_machine_at_once_leave_one_whole_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = BootCache(tmp_path / "cache")
    parts = {"the start script": "a"}
    state = tmp_path / "state.qcow2"
    state.write_bytes(b"state")
    copy = shutil.copyfile

    def copy_while_another_saves(src: Path, dst: Path) -> None:
        monkeypatch.setattr(shutil, "copyfile", copy)
        cache.store("vm1", parts, state, {}, {"label": "booted", "by": "the other"})
        copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_while_another_saves)
    cache.store("vm1", parts, state, {}, {"label": "booted", "by": "this one"})
    found, _ = cache.lookup("vm1", parts)
    assert found is not None and (found.path / "snapshots.qcow2").read_bytes() == b"state"
    assert [e.meta["by"] for e in cache.entries()] == ["this one"]
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([found.path.name, "names"])


@pytest.mark.parametrize("damage", ["a truncated state", "a file gone"])
def test_a_damaged_entry_is_dropped_and_the_machine_boots(
    guest_dir: Path,
    tmp_path: Path,
    cache: Path,
    saved_solo: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    shutil.copytree(saved_solo, cache)
    (entry,) = BootCache(cache).entries()
    if damage == "a truncated state":
        state = entry.path / "snapshots.qcow2"
        with open(state, "r+b") as f:
            f.truncate(state.stat().st_size // 2)
    else:  # the entry names a disk it does not hold
        (entry.path / "meta.json").write_text(json.dumps({**entry.meta, "disks": ["disk.img"]}))
    with caplog.at_level("INFO"):
        boot_solo(guest_dir, tmp_path)
    assert "booting solo cold: its saved boot failed" in caplog.text
    assert "saved the boot of solo" in caplog.text, "saved anew by the cold boot"
    (again,) = BootCache(cache).entries()
    assert again.meta["disks"] == [] and again.meta["created"] >= entry.meta["created"]
    assert again.meta["command"] == str(guest_dir / "run-solo-vm")


def test_a_cache_that_cannot_be_written_costs_only_the_save(
    guest_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(ENV, str(tmp_path / "a-file" / "cache"))
    with caplog.at_level("INFO"):
        boot_solo(guest_dir, tmp_path)
    assert "boot cache: could not save the boot of solo" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_state_directory_boots_cold_and_keeps_the_entry(
    guest_dir: Path,
    tmp_path: Path,
    cache: Path,
    saved_solo: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shutil.copytree(saved_solo, cache)
    (entry,) = BootCache(cache).entries()
    small = tmp_path / "small"  # too small for the saved boot: it can neither load nor save
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(small)], check=True)
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(small))
        with caplog.at_level("INFO"):
            boot_solo(guest_dir, tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert "booting solo cold: its saved boot failed" in caplog.text
    assert "boot cache: could not save the boot of solo" in caplog.text
    assert [e.path for e in BootCache(cache).entries()] == [entry.path], "not the entry's fault"


def test_the_shell_framing_is_in_the_key(
    guest_dir: Path, tmp_path: Path, cache: Path, saved_solo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast framing's setup changes the guest's shell: a nixpkgs-framed machine boots."""
    shutil.copytree(saved_solo, cache)
    machine = Machine(
        str(guest_dir / "run-solo-vm"),
        tmp_dir=tmp_path / "run",
        out_dir=tmp_path,
        shell_framing="nixpkgs",
    )
    try:
        with caplog.at_level("INFO"):
            assert machine.succeed("echo up") == "up\n"
    finally:
        machine.release()
    assert "booting solo cold (the environment changed)" in caplog.text


def test_batch_with_a_boot_cache_and_the_cache_command(guest_dir: Path, tmp_path: Path) -> None:
    test = tmp_path / "test.py"
    test.write_text('vm1.succeed("true")\n')
    config = machines_config(guest_dir, tmp_path, ("vm1",))
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop(ENV, None)
    for expected in ("booting vm1 cold", "vm1 started from its saved boot"):
        result = subprocess.run(
            [str(BIN / "nixos-repl"), "--batch", str(test), "--config", str(config),
             "--boot-cache", str(cache), "-o", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert expected in result.stderr
    listing = subprocess.run(
        [str(BIN / "nixos-repl"), "cache", "list", "--dir", str(cache)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert listing.returncode == 0 and listing.stdout.startswith("vm1 ")
    meta = json.loads(next(cache.glob("*/meta.json")).read_text())
    assert meta["label"] == "booted" and meta["token"]
    cleared = subprocess.run(
        [str(BIN / "nixos-repl"), "cache", "clear", "--dir", str(cache)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert cleared.stdout.startswith("removed 1 entries")
    assert BootCache(cache).entries() == []
