#!/usr/bin/env bash
# vfsd + a plain QEMU command line (no libvirt). Run as root. Adjust KERNEL/DISK/EXPORT.
#
#   bash deploy/qemu-example.sh
#
# then in the guest:  mount -t virtiofs myfs /mnt
# The important parts: fd-backed *shared* guest memory (memory-backend-memfd,share=on) so vfsd
# can map it, a vhost-user chardev on vfsd's socket, and the vhost-user-fs-pci device.
set -euo pipefail

EXPORT=${EXPORT:-/srv/vfsd/export}
SOCK=${SOCK:-/run/vfsd/example/vfsd.sock}
MEM=${MEM:-4G}
KERNEL=${KERNEL:-/boot/vmlinuz}          # or drop -kernel/-append and boot DISK
DISK=${DISK:-guest.qcow2}
VFSD=${VFSD:-vfsd}                       # or: python -m vfsd

mkdir -p "$(dirname "$SOCK")" "$EXPORT"

# 1. The daemon: listens on $SOCK, serves $EXPORT, exits when QEMU disconnects.
#    Metrics at http://127.0.0.1:9720/metrics (metrics_listen in the YAML config).
"$VFSD" --socket-path "$SOCK" --shared-dir "$EXPORT" --workers 4 --cache auto &
vfsd_pid=$!
trap 'kill "$vfsd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "vfsd did not create $SOCK" >&2; exit 1; }

# 2. QEMU. queue-size=1024 as virtiofsd users do; num-request-queues must not exceed vfsd's
#    num_queues (default 3).
qemu-system-x86_64 \
    -machine q35,accel=kvm:tcg -cpu max -smp 4 -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -numa node,memdev=mem \
    -chardev socket,id=vfs0,path="$SOCK" \
    -device vhost-user-fs-pci,chardev=vfs0,tag=myfs,queue-size=1024 \
    -kernel "$KERNEL" -append "console=ttyS0 root=/dev/vda1 rw" \
    -drive file="$DISK",if=virtio \
    -nographic
