"""The X11 helpers and ``switch_root`` on the tiny guest, with stand-ins for what NixOS provides.

nixpkgs' ``wait_for_x`` reads the journal and looks for the X socket, ``get_window_names`` and
``wait_for_window`` parse ``xwininfo -root -tree``, and ``switch_root`` leaves a systemd initrd
for stage 2. The tiny guest has neither X nor systemd: the tests install a stand-in
``journalctl``, ``xwininfo`` and ``systemctl`` that answer as the real ones do, so what is
tested is the driver's side (the commands it sends, how it reads the replies, how it waits).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import pytest

from nixos_repl import Machine, RequestedAssertionFailed

JOURNALCTL = """#!/bin/sh
# journalctl -b SYSLOG_IDENTIFIER=systemd: the boot's systemd lines, graphical once flagged.
echo "Dec 04 20:00:00 vm1 systemd[1]: Reached target Multi-User System."
[ -e /tmp/x11-test/graphical ] &&
    echo "Dec 04 20:00:01 vm1 systemd[1]: Reached target Current graphical user interface."
exit 0
"""
# `xwininfo -root -tree` as X.Org prints it: named and unnamed windows, nested children.
XWININFO = """#!/bin/sh
cat <<'EOF'

xwininfo: Window id: 0x1e7 (the root window) (has no name)

  Root window id: 0x1e7 (the root window) (has no name)
  Parent window id: 0x0 (none)
     2 children:
     0x400001 "xterm": ("xterm" "XTerm")  484x316+0+0  +0+0
        1 child:
        0x400002 (has no name): ()  1x1+-1+-1  +-1+-1
EOF
[ -e /tmp/x11-test/browser ] &&
    echo '     0x600001 "Firefox - Mozilla": ("Navigator" "firefox")  800x600+10+10  +10+10'
exit 0
"""
STANDINS = {"/usr/bin/journalctl": JOURNALCTL, "/usr/bin/xwininfo": XWININFO}


def install(vm: Machine, files: dict[str, str]) -> None:
    for path, text in files.items():
        vm.succeed(f"cat > {path} <<'STANDIN'\n{text}STANDIN\nchmod +x {path}")


@pytest.fixture
def x11(vm1: Machine) -> Iterator[Machine]:
    install(vm1, STANDINS)
    vm1.succeed("rm -rf /tmp/x11-test /tmp/.X11-unix; mkdir -p /tmp/x11-test")
    try:
        yield vm1
    finally:
        vm1.succeed(f"rm -rf {' '.join(STANDINS)} /tmp/x11-test /tmp/.X11-unix")


def later(vm: Machine, seconds: float, command: str) -> None:
    vm.succeed(f"(sleep {seconds}; {command}) >/dev/null 2>&1 &")


def test_wait_for_x_needs_the_graphical_target_and_the_socket(x11: Machine) -> None:
    with pytest.raises(RequestedAssertionFailed, match="action timed out"):
        x11.wait_for_x(timeout=dt.timedelta(seconds=1))
    x11.succeed("touch /tmp/x11-test/graphical")
    with pytest.raises(RequestedAssertionFailed, match="action timed out"):
        x11.wait_for_x(timeout=dt.timedelta(seconds=1))  # the target, but no X socket yet
    later(x11, 1, "mkdir -p /tmp/.X11-unix && touch /tmp/.X11-unix/X0")
    start = time.monotonic()
    x11.wait_for_x(timeout=dt.timedelta(seconds=30))
    assert 0.8 < time.monotonic() - start < 10


def test_get_window_names_parses_xwininfo(x11: Machine) -> None:
    assert x11.get_window_names() == ["xterm"]
    x11.succeed("touch /tmp/x11-test/browser")
    assert x11.get_window_names() == ["xterm", "Firefox - Mozilla"]


def test_wait_for_window_matches_a_regexp(x11: Machine) -> None:
    x11.wait_for_window("^xt", timeout=dt.timedelta(seconds=10))
    later(x11, 1, "touch /tmp/x11-test/browser")
    start = time.monotonic()
    x11.wait_for_window(r"Firefox .* Mozilla", timeout=dt.timedelta(seconds=30))
    assert 0.8 < time.monotonic() - start < 10
    with pytest.raises(RequestedAssertionFailed, match="action timed out"):
        x11.wait_for_window("Chromium", timeout=dt.timedelta(seconds=1))


def test_get_window_names_without_xwininfo_fails_like_succeed(vm1: Machine) -> None:
    with pytest.raises(RequestedAssertionFailed, match=r"command `xwininfo -root -tree .*` failed"):
        vm1.get_window_names()


# A systemd initrd as far as switch_root sees it: initrd.target is active, and isolating
# initrd-switch-root.target ends the initrd's backdoor; a new one starts in the new root.
SYSTEMCTL = """#!/bin/sh
case "$*" in
    *show*initrd.target*ActiveState*) echo ActiveState=active ;;
    "isolate --no-block initrd-switch-root.target")
        setsid /usr/bin/stage2 </dev/null >/dev/null 2>&1 & ;;
    *) echo "stand-in systemctl: $*" >&2; exit 1 ;;
esac
"""
# The second root: a tmpfs with the initramfs's programs and a marker, entered with chroot.
STAGE2 = """#!/bin/sh
mkdir -p /sysroot
mount -t tmpfs tmpfs /sysroot
for d in bin sbin usr etc lib root; do [ -d /$d ] && cp -a /$d /sysroot/; done
mkdir -p /sysroot/dev /sysroot/proc /sysroot/sys /sysroot/tmp
mount -o bind /dev /sysroot/dev
mount -t proc proc /sysroot/proc
mount -t sysfs sysfs /sysroot/sys
echo stage-2 > /sysroot/etc/stage
# The initrd's backdoor ends (and the subshells it forked, same command line), as systemd
# stops it when it isolates initrd-switch-root.target.
backdoor() {
    for p in /proc/[0-9]*; do
        line=$(tr '\\0' ' ' <"$p/cmdline" 2>/dev/null)
        [ "$line" = "bash --norc /dev/hvc0 " ] && echo "${p#/proc/}"
    done
}
kill -HUP $(backdoor)
while [ -n "$(backdoor)" ]; do sleep 0.05; done
exec chroot /sysroot /bin/bash -c '
    cd /tmp
    exec </dev/hvc0 >/dev/hvc0 2>/dev/ttyS0
    stty -F /dev/hvc0 raw -echo
    echo "Spawning backdoor root shell..."
    PS1="" exec bash --norc /dev/hvc0'
"""


def test_switch_root_waits_for_the_backdoor_of_the_new_root(crashy: Machine) -> None:
    crashy.start()
    install(crashy, {"/usr/bin/systemctl": SYSTEMCTL, "/usr/bin/stage2": STAGE2})
    crashy.fail("cat /etc/stage")
    crashy.switch_root()
    assert crashy.succeed("cat /etc/stage") == "stage-2\n"
    assert crashy.execute("echo out; exit 3") == (3, "out\n")
    assert crashy.succeed("seq 3000 | wc -l") == "3000\n"
    crashy.fail("test -e /proc/1/root/etc/stage")  # the old root, where PID 1 still is
