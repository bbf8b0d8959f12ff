"""Embedded guests for demos and tests, built from Debian packages without Nix.

The ``tiny`` guest is the Debian kernel (booted as the extracted ELF ``vmlinux``, which is twice as
fast under TCG as the compressed bzImage) plus an initramfs with busybox-static, bash-static, a few
dynamically linked helpers nixpkgs commands need (``nc -z``) and the virtio modules. Its ``/init``
runs the backdoor exactly like NixOS's ``backdoor.service``. Each machine gets a ``run-<name>-vm``
script that honours the NixOS run-vm environment contract.

The ``debian`` guest (``debian.py``) is a debootstrapped systemd Debian 12 with NixOS's
``backdoor.service``, booted by the same kernel and run-script template. The
``debian-container`` guest (``container.py``) runs its root filesystem as systemd-nspawn
containers (``run-<name>-nspawn``).

Builds are cached (kernel and initramfs keyed by a hash of their inputs) and redone only when an
input changes; run scripts are rewritten atomically.
"""

from .container import build_debian_container
from .debian import build_debian
from .tiny import Cpio, build_tiny, cache_dir, extract_vmlinux, find_kernel, module_order

__all__ = [
    "Cpio",
    "build_debian",
    "build_debian_container",
    "build_tiny",
    "cache_dir",
    "extract_vmlinux",
    "find_kernel",
    "module_order",
]
