#!/bin/bash
# /init of the tiny guest: mounts, modules, network, a shell on tty1 and the NixOS-style backdoor.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd

# Kernel modules, dependencies first (the order was read from modules.dep at build time).
while read -r mod; do insmod "/lib/modules/$mod" 2>/dev/null; done < /etc/modules.order

name=machine
nodes=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nixos_repl.name=*) name="${arg#nixos_repl.name=}" ;;
        nixos_repl.nodes=*) nodes=$(echo "${arg#nixos_repl.nodes=}" | tr , ' ') ;;
    esac
done
hostname "$name"
echo "$name" > /etc/hostname

# Wait for the virtio consoles the backdoor needs (module probing is asynchronous).
for _ in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.02; done

# Networking: eth0 is QEMU user networking (DHCP); VLAN NICs carry MAC 52:54:00:12:<vlan>:<node>
# and get 192.168.<vlan>.<node>/24, like a NixOS test network; /etc/hosts names every machine of
# the test (nixos_repl.nodes=, node numbers in that order) on each VLAN.
ip link set lo up
for dev in /sys/class/net/eth*; do
    [ -e "$dev" ] || continue
    ifname=${dev##*/}
    ip link set "$ifname" up
    read -r mac < "$dev/address"
    # eth0 is always user networking (as in NixOS); only later NICs can be VLAN NICs.
    [ "$ifname" = eth0 ] && mac=user
    case "$mac" in
        52:54:00:12:*)
            vlan=$((16#$(echo "$mac" | cut -d: -f5)))
            node=$((16#$(echo "$mac" | cut -d: -f6)))
            ip addr add "192.168.$vlan.$node/24" dev "$ifname"
            echo "192.168.$vlan.$node $name" >> /etc/hosts
            i=1
            for peer in $nodes; do
                [ "$peer" = "$name" ] || echo "192.168.$vlan.$i $peer" >> /etc/hosts
                i=$((i + 1))
            done
            ;;
        *) udhcpc -q -f -n -t 5 -i "$ifname" -s /etc/udhcpc.script >/dev/null 2>&1 & ;;
    esac
done

# 9p shares, as a NixOS VM mounts them.
mkdir -p /tmp/shared /tmp/xchg
mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384 shared /tmp/shared 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384 xchg /tmp/xchg 2>/dev/null

# A login shell on tty1, so that typed keys and screenshots show something.
setsid bash -c 'exec bash --login -i <>/dev/tty1 >&0 2>&1' &

# The backdoor, exactly as NixOS's backdoor.service runs it.
(
    export USER=root HOME=/root DISPLAY=:0.0
    [ -e /etc/profile ] && source /etc/profile
    export PAGER=
    cd /tmp
    exec < /dev/hvc0 > /dev/hvc0
    while ! exec 2> /dev/ttyS0; do sleep 0.1; done
    echo "connecting to host..." >&2
    stty -F /dev/hvc0 raw -echo
    echo "Spawning backdoor root shell..."
    PS1="" exec bash --norc /dev/hvc0
) &

# PID 1 stays: it reaps orphans and turns busybox's poweroff/reboot signals into the real thing.
trap 'sync; poweroff -f' USR2
trap 'sync; reboot -f' TERM INT
trap 'sync; halt -f' USR1
while :; do
    sleep 3600 &
    wait $!
done
