#!/bin/sh
# The checks the guest runs on its vhost-user-blk disk. Prints one
# "E2E-RESULT PASS|FAIL <name> [detail]" line per check (the host requires
# every name it expects) and "E2E-INFO ..." lines for the log.
# /e2e/conf (written by the host) sets RUNID, DISK_BYTES, QUEUES, FS_BYTES,
# PAT_A_OFF, PAT_A_LEN, PAT_B_OFF, PAT_B_LEN; /e2e/pat-a and /e2e/pat-b are the
# raw patterns and /e2e/fs-src the tree copied onto the filesystem.
. /e2e/conf
DISK=/dev/vda

pass() { echo "E2E-RESULT PASS $*"; }
fail() { echo "E2E-RESULT FAIL $*"; }
info() { echo "E2E-INFO $*"; }
# check NAME COMMAND...: one result line from a command's exit status.
check() {
  name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# Forget every cached page of the disk so that the next read goes to the device.
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs "$DISK"
}

# read_region OFF LEN [direct]: the LEN bytes at byte offset OFF of the disk.
read_region() {
  flags=skip_bytes,count_bytes
  [ -z "$3" ] || flags=$flags,direct
  dd if="$DISK" iflag="$flags" bs=65536 skip="$1" count="$2" 2>/dev/null
}
# same_region OFF LEN FILE [direct]: the disk holds FILE at OFF.
same_region() { read_region "$1" "$2" "$4" | cmp -s - "$3"; }

# Interrupt count of one virtqueue ("virtioN-req.Q"), summed over CPUs.
queue_irqs() {
  awk -v q="req.$1" '$NF ~ /^virtio[0-9]+-/ && $NF ~ q "$" {
      for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i
    } END { print n + 0 }' /proc/interrupts
}

wait_for_disk() {
  i=0
  while [ ! -b "$DISK" ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  [ -b "$DISK" ]
}

if ! wait_for_disk; then
  fail disk-present "no $DISK 10 s after virtio_blk loaded"
  exit 0
fi
pass disk-present
info "disk ready at uptime $(uptime_s)"

size=$(($(cat /sys/block/vda/size) * 512))
[ "$size" = "$DISK_BYTES" ] && pass disk-size || fail disk-size "$size bytes, expected $DISK_BYTES"
nq=$(ls /sys/block/vda/mq | wc -l)
[ "$nq" = "$QUEUES" ] && pass queues || fail queues "$nq queues, expected $QUEUES"

# Raw I/O: two writers at once, pinned to different CPUs so that blk-mq sends
# them through different virtqueues. A: 64 KiB O_DIRECT writes. B: 512-byte
# buffered writes starting at an offset that is not 4 KiB aligned and ending at
# the last byte of the disk (the kernel merges and splits them its own way).
t0=$(uptime_s)
taskset -c 0 dd if=/e2e/pat-a of="$DISK" bs=65536 seek=$((PAT_A_OFF / 65536)) oflag=direct 2>/tmp/dd-a &
pid_a=$!
taskset -c 1 dd if=/e2e/pat-b of="$DISK" bs=512 seek=$((PAT_B_OFF / 512)) 2>/tmp/dd-b &
pid_b=$!
wait $pid_a
rc_a=$?
wait $pid_b
rc_b=$?
sync
if [ $rc_a = 0 ] && [ $rc_b = 0 ]; then
  pass raw-write
else
  fail raw-write "dd exit codes $rc_a $rc_b: $(cat /tmp/dd-a /tmp/dd-b | tr '\n' ' ')"
fi
drop_caches
check raw-readback-a same_region "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a
check raw-readback-b same_region "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b direct
info "raw write+readback took $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { print b - a }') s"

q0=$(queue_irqs 0)
q1=$(queue_irqs 1)
info "virtqueue interrupts: req.0=$q0 req.1=$q1 ($(grep virtio /proc/interrupts | awk '{ print $NF }' | tr '\n' ' '))"
if [ "$QUEUES" -ge 2 ]; then
  [ "$q0" -gt 0 ] && [ "$q1" -gt 0 ] && pass both-queues-used ||
    fail both-queues-used "req.0=$q0 req.1=$q1 interrupts"
fi

# A filesystem on the first FS_BYTES (the patterns live above it): make it,
# fill it, check it offline, and read it back after a remount from a cold cache.
t0=$(uptime_s)
if /sbin/mke2fs -q -F -t ext4 -L e2e -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 \
  "$DISK" "$((FS_BYTES / 1024))k" >/tmp/mkfs.log 2>&1; then
  pass mkfs
else
  fail mkfs "$(tr '\n' ' ' </tmp/mkfs.log)"
fi
(cd /e2e/fs-src && find . -type f | sort | xargs md5sum) >/tmp/src.sums
if mount -t ext4 "$DISK" /mnt && cp -a /e2e/fs-src /mnt/e2e && sync && umount /mnt; then
  pass fs-write
else
  fail fs-write
  umount /mnt 2>/dev/null
fi
if /sbin/e2fsck -f -n "$DISK" >/tmp/fsck.log 2>&1; then
  pass fsck
else
  fail fsck "$(tail -5 /tmp/fsck.log | tr '\n' ' ')"
fi
drop_caches
if mount -t ext4 -o ro "$DISK" /mnt; then
  if (cd /mnt/e2e && md5sum -c -s /tmp/src.sums); then
    pass fs-readback
  else
    fail fs-readback "$(cd /mnt/e2e && md5sum -c /tmp/src.sums 2>&1 | grep -v ': OK' | head -3 | tr '\n' ' ')"
  fi
  umount /mnt
else
  fail fs-readback "remount failed"
fi
info "mkfs+fill+fsck+remount took $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { print b - a }') s"

# The filesystem work must not have touched the patterns; read them the other way round.
drop_caches
check raw-intact-a same_region "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a direct
check raw-intact-b same_region "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b

errors=$(dmesg | grep -iE 'I/O error|EXT4-fs error|blk_update_request|critical|virtio_blk.*(err|fail)|call trace' | head -5)
if [ -z "$errors" ]; then
  pass kernel-log
else
  fail kernel-log "$(echo "$errors" | tr '\n' ' ')"
fi
