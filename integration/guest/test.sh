#!/bin/sh
# The checks the guest runs on its vhost-user-blk disk. Prints one
# "E2E-RESULT PASS|FAIL <name> [detail]" line per check (the host requires
# every name it expects) and "E2E-INFO ..." lines for the log.
# The guest boots twice. The first boot runs every check, leaves a reboot mark
# on the disk and exits 10 (init then reboots); after the reboot (a device
# reset and re-initialisation over the same vhost-user connection) the mark
# is found and only the data written before are verified; exit 0.
# /e2e/conf (written by the host) sets RUNID, FORMAT (luks1|luks2|plain),
# PAYLOAD_SECTORS (512-byte units), SECTOR (the encryption sector size, also
# the disk's logical block size), DISK_BYTES, QUEUES, FS_BYTES, the raw
# pattern regions PAT_A_OFF/LEN, PAT_B_OFF/LEN, PAT_C_OFF/LEN and the range
# ZERO_OFF/LEN zeroed inside C, DISCARD (1: the backend offers discard) and
# REF_SERIAL. /e2e holds the patterns (pat-a, pat-b, pat-c, and pat-c-zeroed:
# C as it must read after zeroing), fs-src (the tree copied onto the
# filesystem) and the secrets (passphrase for LUKS, volume.key). The disk
# whose serial is REF_SERIAL is the image file itself, read-only, for
# dm-crypt to open.
# shellcheck source=/dev/null
. /e2e/conf
# shellcheck source=integration/guest/lib.sh
. /e2e/lib.sh

if ! wait_for_disks; then
  fail disk-present "10 s after virtio_blk loaded: test disk '$DISK', reference disk '$REF' ($(echo /sys/block/*))"
  exit 0
fi
pass disk-present
info "disks ready at uptime $(uptime_s): vhost-user-blk $DISK, reference $REF"
sysblk=/sys/block/${DISK#/dev/}
vdev=$(basename "$(readlink "$sysblk/device")")

# The reboot mark: one sector naming the run, just above the filesystem.
MARK_OFF=$FS_BYTES
printf "%-$((SECTOR - 1))s\n" "CRYPTBLK-E2E-$RUNID rebooted" >/tmp/mark

# Second boot: everything the first boot wrote must read back the same.
after_reboot() {
  info "second boot: the reboot mark is on $DISK"
  check reboot-pattern-a same_region "$DISK" "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a direct 0
  check reboot-pattern-b same_region "$DISK" "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b direct 1
  check reboot-zeroes same_region "$DISK" "$PAT_C_OFF" "$PAT_C_LEN" /e2e/pat-c-zeroed
  (cd /e2e/fs-src && find . -type f | sort | xargs md5sum) >/tmp/src.sums
  if mount -t ext4 -o ro "$DISK" /mnt; then
    check reboot-files sh -c 'cd /mnt/e2e && md5sum -c -s /tmp/src.sums'
    umount /mnt
  else
    fail reboot-files "mount failed"
  fi
  q0=$(queue_irqs "$vdev" 0)
  q1=$(queue_irqs "$vdev" 1)
  if [ "$q0" -gt 0 ] && [ "$q1" -gt 0 ]; then
    pass reboot-queues
  else
    fail reboot-queues "req.0=$q0 req.1=$q1 interrupts"
  fi
  kernel_log_check reboot-kernel-log
  [ "$RESIZE_BYTES" = 0 ] || resize_check
}

# The host grows the disk once it reads E2E-RESIZE-NOW on the console: QEMU
# gets CONFIG_CHANGE_MSG, re-reads the config space and interrupts the
# driver, which updates the size. The new space must then be usable.
resize_check() {
  before=$(cat "$sysblk/size")
  echo "E2E-RESIZE-NOW sectors=$before"
  i=0
  while [ "$(cat "$sysblk/size")" = "$before" ] && [ $i -lt 1200 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  after=$(cat "$sysblk/size")
  if [ "$after" = $((RESIZE_BYTES / 512)) ]; then
    pass resize-seen
  else
    fail resize-seen "$DISK has $after sectors after $((i / 10)) s (was $before), expected $((RESIZE_BYTES / 512))"
    return
  fi
  # 1 MiB of pattern A right after the old end (pattern B ends there), and
  # the same at the very end of the new space.
  head -c $((1 << 20)) /e2e/pat-a >/tmp/across
  old_end=$((before * 512))
  for at in $old_end $((RESIZE_BYTES - (1 << 20))); do
    resize_write "$at" || return
  done
  drop_caches
  check resize-usable resized_regions_read_back "$old_end"
}
resized_regions_read_back() {
  same_region "$DISK" "$1" $((1 << 20)) /tmp/across direct &&
    same_region "$DISK" $((RESIZE_BYTES - (1 << 20))) $((1 << 20)) /tmp/across direct
}
resize_write() {
  at=$1
  dd if=/tmp/across of="$DISK" bs=65536 seek=$((at / 65536)) oflag=direct 2>/tmp/dd-resize && return 0
  fail resize-usable "write at $at: $(cat /tmp/dd-resize)"
  return 1
}

if same_region "$DISK" "$MARK_OFF" "$SECTOR" /tmp/mark direct; then
  pass reboot-disk-present
  after_reboot
  exit 0
fi

q=$sysblk/queue
info "$DISK: write_cache=$(cat "$q/write_cache") logical_block=$(cat "$q/logical_block_size")" \
  "physical_block=$(cat "$q/physical_block_size") max_segments=$(cat "$q/max_segments")" \
  "max_sectors_kb=$(cat "$q/max_sectors_kb") discard_max=$(cat "$q/discard_max_bytes")" \
  "write_zeroes_max=$(cat "$q/write_zeroes_max_bytes") serial='$(cat "$sysblk/serial" 2>/dev/null)'"

size=$(($(cat "$sysblk/size") * 512))
if [ "$size" = "$DISK_BYTES" ]; then
  pass disk-size
else
  fail disk-size "$size bytes, expected $DISK_BYTES"
fi
# The encryption sector is the smallest unit the backend can write on its own.
lbs=$(cat "$sysblk/queue/logical_block_size")
if [ "$lbs" = "$SECTOR" ]; then
  pass block-size
else
  fail block-size "logical block size $lbs, expected $SECTOR"
fi
# One directory per blk-mq hardware queue, i.e. per virtqueue the driver uses.
set -- "$sysblk"/mq/*
if [ $# = "$QUEUES" ]; then
  pass queues
else
  fail queues "$# queues, expected $QUEUES"
fi

# Raw I/O: two writers at once, pinned to different CPUs so that blk-mq sends
# them through different virtqueues. A: 64 KiB O_DIRECT writes. B: buffered
# writes of one sector each, from an offset that (with 512-byte sectors) is not
# 4 KiB aligned to the last byte of the disk (the kernel merges and splits
# them its own way).
t0=$(uptime_s)
taskset -c 0 dd if=/e2e/pat-a of="$DISK" bs=65536 seek=$((PAT_A_OFF / 65536)) oflag=direct 2>/tmp/dd-a &
pid_a=$!
taskset -c 1 dd if=/e2e/pat-b of="$DISK" bs="$SECTOR" seek=$((PAT_B_OFF / SECTOR)) 2>/tmp/dd-b &
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
# Buffered writes may be flushed from any CPU; these O_DIRECT reads make sure
# that each queue carries requests.
check raw-readback-a same_region "$DISK" "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a direct 0
check raw-readback-b same_region "$DISK" "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b direct 1
info "raw write+readback took $(since "$t0") s"

q0=$(queue_irqs "$vdev" 0)
q1=$(queue_irqs "$vdev" 1)
info "$vdev virtqueue interrupts: req.0=$q0 req.1=$q1 (vectors: $(grep "$vdev-" /proc/interrupts | awk '{ print $NF }' | tr '\n' ' '))"
if [ "$QUEUES" -ge 2 ]; then
  if [ "$q0" -gt 0 ] && [ "$q1" -gt 0 ]; then
    pass both-queues-used
  else
    fail both-queues-used "req.0=$q0 req.1=$q1 interrupts"
  fi
fi

# Write-zeroes: pattern C, then zero a range inside it whose ends are not
# 4 KiB aligned (BLKZEROOUT uses WRITE_ZEROES when the device offers it).
# The zeros must read back as zeros here and through dm-crypt: the backend
# has to store encrypted zeros, not holes.
dd if=/e2e/pat-c of="$DISK" bs=65536 seek=$((PAT_C_OFF / 65536)) oflag=direct 2>/tmp/dd-c &&
  sync && /sbin/blkdiscard -f -z -o "$ZERO_OFF" -l "$ZERO_LEN" "$DISK" >/tmp/zero.log 2>&1
rc=$?
if [ $rc = 0 ]; then
  pass write-zeroes
else
  fail write-zeroes "$(cat /tmp/dd-c /tmp/zero.log | tr '\n' ' ')"
fi
drop_caches
check write-zeroes-readback same_region "$DISK" "$PAT_C_OFF" "$PAT_C_LEN" /e2e/pat-c-zeroed direct

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
# With DISCARD=1 the backend offers discard: free a file's blocks and trim them;
# fsck and the read-back below show that only free blocks went.
if [ "$DISCARD" = 1 ]; then
  if mount -t ext4 "$DISK" /mnt && cp /e2e/pat-a /mnt/junk && sync && rm /mnt/junk && sync &&
    fstrim -v /mnt >/tmp/trim.log 2>&1 && umount /mnt; then
    pass fs-trim
    info "$(cat /tmp/trim.log)"
  else
    fail fs-trim "$(tr '\n' ' ' </tmp/trim.log)"
    umount /mnt 2>/dev/null
  fi
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
info "mkfs+fill+fsck+remount took $(since "$t0") s"

# The filesystem work must not have touched the patterns; read them through the page cache this time.
drop_caches
check raw-intact-a same_region "$DISK" "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a
check raw-intact-b same_region "$DISK" "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b

# dmcrypt_check METHOD CRYPTSETUP-OPEN-ARGS...: the kernel's own dm-crypt,
# set up by cryptsetup, reads the image file (served by QEMU itself, below the
# backend) and must see exactly what went through the backend: the raw
# patterns and the filesystem's files.
dmcrypt_check() {
  method=$1
  shift
  t0=$(uptime_s)
  # --batch-mode and no stdin: cryptsetup must never wait for a "YES" (it asks
  # when it sees a filesystem signature on the device, e.g. on a plaintext image).
  if ! DM_DISABLE_UDEV=1 /sbin/cryptsetup open --batch-mode --readonly "$@" "$REF" "e2e-$method" \
    </dev/null >/tmp/cryptsetup.log 2>&1; then
    fail "dmcrypt-$method-open" "$(tail -3 /tmp/cryptsetup.log | tr '\n' ' ')"
    return
  fi
  pass "dmcrypt-$method-open"
  mapped=/dev/mapper/e2e-$method
  drop_caches
  check "dmcrypt-$method-pattern-a" same_region "$mapped" "$PAT_A_OFF" "$PAT_A_LEN" /e2e/pat-a
  check "dmcrypt-$method-pattern-b" same_region "$mapped" "$PAT_B_OFF" "$PAT_B_LEN" /e2e/pat-b direct
  check "dmcrypt-$method-zeroes" same_region "$mapped" "$PAT_C_OFF" "$PAT_C_LEN" /e2e/pat-c-zeroed
  # noload: the device is read-only, so no journal replay (none is needed after a clean umount).
  if mount -t ext4 -o ro,noload "$mapped" /mnt; then
    check "dmcrypt-$method-files" sh -c 'cd /mnt/e2e && md5sum -c -s /tmp/src.sums'
    umount /mnt
  else
    fail "dmcrypt-$method-files" "mount of $mapped failed"
  fi
  DM_DISABLE_UDEV=1 /sbin/cryptsetup close "e2e-$method" </dev/null || info "cryptsetup close e2e-$method failed"
  info "dm-crypt $method checks took $(since "$t0") s"
}

# LUKS: as a user would open the image (header, passphrase, key slot).
[ "$FORMAT" = plain ] ||
  dmcrypt_check luks --type luks --key-file /e2e/passphrase
# Plain: the bare volume key and payload offset, i.e. how the backend is
# configured in plain mode; for a LUKS image this proves that key + offset
# (IVs in 512-byte units, as LUKS2 with 4 KiB sectors has them) reads the same data.
# shellcheck disable=SC2086 # PLAIN_IV is a list of options
dmcrypt_check plain --type plain --cipher aes-xts-plain64 --key-size 512 \
  --sector-size "$SECTOR" --key-file /e2e/volume.key --offset "$PAYLOAD_SECTORS" $PLAIN_IV

kernel_log_check kernel-log

# Leave the mark and ask init for a reboot.
if dd if=/tmp/mark of="$DISK" bs="$SECTOR" seek=$((MARK_OFF / SECTOR)) oflag=direct 2>/tmp/dd-mark && sync; then
  exit 10
fi
fail reboot-mark "$(cat /tmp/dd-mark)"
