#!/bin/busybox sh
# PID 1 of the VM lane's initramfs (tests/vm/lane.py builds it around busybox-static and the
# few Debian 6.1 modules needed to reach the disks): load virtio, 9p, ext4 and overlay, make
# the guest's root an overlay of the host's root (9p, read-only) under a tmpfs (so the host
# never sees a write), then hand over to tests/vm/guest.sh inside that root.
# Anything that fails here is printed on the serial console, which the driver keeps.
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo /sbin/modprobe > /proc/sys/kernel/modprobe

fail() {
    echo "vm-init: $*"
    echo "vm-init: FAILED" 
    poweroff -f
}

for m in virtio_pci virtio_blk 9pnet_virtio 9p crc32c_generic ext4 overlay; do
    modprobe "$m" || fail "modprobe $m"
done

mkdir -p /host /ovl /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=262144 hostroot /host || fail "mount 9p root"
mount -t tmpfs -o mode=0755,size=1g tmpfs /ovl || fail "tmpfs"
mkdir -p /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot || fail "overlay root"
repo=
for arg in $(cat /proc/cmdline); do
    case "$arg" in jc.repo=*) repo="${arg#jc.repo=}" ;; esac
done
[ -f "/newroot$repo/tests/vm/guest.sh" ] || fail "no $repo/tests/vm/guest.sh in the host's root"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/bash "$repo/tests/vm/guest.sh"
