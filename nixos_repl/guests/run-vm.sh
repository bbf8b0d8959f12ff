#!/usr/bin/env bash
# run-@NAME@-vm: starts the @KIND@ guest "@NAME@" and honours the NixOS run-vm environment contract:
# QEMU_OPTS, QEMU_NET_OPTS, QEMU_KERNEL_PARAMS, TMPDIR/USE_TMPDIR, SHARED_DIR, QEMU_VDE_SOCKET_<N>,
# NIXPKGS_QEMU_KERNEL_<name> (the kernel to boot instead of the default one), and appends "$@".
# NIXOS_REPL_ACCEL=kvm|tcg forces the accelerator.
set -e

if [ -z "$TMPDIR" ] || [ -z "$USE_TMPDIR" ]; then
    TMPDIR=$(mktemp -d nix-vm.XXXXXXXXXX --tmpdir)
fi
mkdir -p "$TMPDIR/xchg"
@DISK_SETUP@

# KVM when it is usable, else TCG. Inside a VM (nested virtualisation) KVM guests can hang,
# so auto-detection prefers TCG there; NIXOS_REPL_ACCEL=kvm overrides.
accel="${NIXOS_REPL_ACCEL:-auto}"
if [ "$accel" = auto ]; then
    accel=tcg
    if [ -r /dev/kvm ] && [ -w /dev/kvm ] && ! grep -qw hypervisor /proc/cpuinfo; then
        accel=kvm
    fi
fi
case "$accel" in
    kvm) accel_opts=(-machine q35 -accel kvm -cpu host) ;;
    tcg) accel_opts=(-machine q35 -accel tcg,tb-size=32) ;;
    *) echo "run-@NAME@-vm: NIXOS_REPL_ACCEL must be kvm or tcg, not '$accel'" >&2; exit 2 ;;
esac

# One NIC per VLAN socket the driver exported, MAC 52:54:00:12:<vlan>:<node>.
vlan_opts=()
i=1
for var in $(compgen -v QEMU_VDE_SOCKET_ | sort -t_ -k4 -n); do
    vlan=${var#QEMU_VDE_SOCKET_}
    mac=$(printf '52:54:00:12:%02x:%02x' "$vlan" @NODE@)
    vlan_opts+=(-device "virtio-net-pci,netdev=vlan$i,mac=$mac" -netdev "vde,id=vlan$i,sock=${!var}")
    i=$((i + 1))
done

if ! command -v @QEMU@ >/dev/null; then
    echo "run-@NAME@-vm: @QEMU@ not found on PATH; install it (Debian: apt-get install qemu-system-x86)" >&2
    exit 127
fi

# shellcheck disable=SC2086 # QEMU_OPTS is word-split on purpose, as in NixOS.
exec @QEMU@ "${accel_opts[@]}" \
    -name @NAME@ -m @MEMORY@ -smp 1 \
    -kernel "${NIXPKGS_QEMU_KERNEL_@VAR@:-@KERNEL@}" -initrd @INITRD@ \
    -append "console=ttyS0 console=tty0 panic=1 @KERNEL_PARAMS@ $QEMU_KERNEL_PARAMS" \
    @DISK_OPTS@ \
    -vga std \
    -device virtio-rng-pci \
    -device virtio-net-pci,netdev=user.0 \
    -netdev "user,id=user.0${QEMU_NET_OPTS:+,$QEMU_NET_OPTS}" \
    -virtfs "local,path=${SHARED_DIR:-$TMPDIR/xchg},security_model=none,mount_tag=shared" \
    -virtfs "local,path=$TMPDIR/xchg,security_model=none,mount_tag=xchg" \
    "${vlan_opts[@]}" \
    $QEMU_OPTS "$@"
