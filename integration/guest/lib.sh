#!/bin/sh
# Helpers for the guest-side test scripts (sourced as /e2e/lib.sh by
# guest/test.sh and guest/reconnect.sh, after /e2e/conf): result lines,
# reading disk regions, telling the disks apart, the kernel log.
# A result line is "E2E-RESULT PASS|FAIL <name> [detail]"; the host requires
# every name it expects. "E2E-INFO ..." lines go to the host's log.
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
# since T0: seconds of uptime since T0 (an earlier uptime_s).
since() { awk -v a="$1" -v b="$(uptime_s)" 'BEGIN { print b - a }'; }

# Forget every cached page of the disk so that the next read goes to the device.
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs "$DISK"
}

# read_region DEV OFF LEN [direct [CPU]]: the LEN bytes at byte offset OFF of
# DEV, read on CPU if given (blk-mq then submits on that CPU's queue).
read_region() {
  flags=skip_bytes,count_bytes
  [ -z "$4" ] || flags=$flags,direct
  taskset -c "${5:-0-$(($(nproc) - 1))}" dd if="$1" iflag="$flags" bs=65536 skip="$2" count="$3" 2>/dev/null
}
# same_region DEV OFF LEN FILE [direct [CPU]]: DEV holds FILE at OFF.
same_region() { read_region "$1" "$2" "$3" "$5" "$6" | cmp -s - "$4"; }

# queue_irqs VIRTIO_DEV Q: interrupts of one virtqueue ("virtioN-req.Q"), summed over CPUs.
queue_irqs() {
  awk -v name="$1-req.$2" '$NF == name {
      for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i
    } END { print n + 0 }' /proc/interrupts
}

# Sets DISK (the vhost-user-blk disk), REF (the disk whose serial is
# REF_SERIAL: the image file itself, read-only) and, if CTL_SERIAL is set, CTL
# (the host's control disk), telling them apart by serial; the backend's
# serial may not even be readable.
find_disks() {
  DISK=
  REF=
  CTL=
  for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    serial=$(cat "$d/serial" 2>/dev/null)
    if [ "$serial" = "$REF_SERIAL" ]; then
      REF=/dev/${d##*/}
    elif [ -n "${CTL_SERIAL:-}" ] && [ "$serial" = "$CTL_SERIAL" ]; then
      CTL=/dev/${d##*/}
    else
      DISK=/dev/${d##*/}
    fi
  done
  [ -n "$DISK" ] && [ -b "$DISK" ] && [ -n "$REF" ] && [ -b "$REF" ] &&
    { [ -z "${CTL_SERIAL:-}" ] || [ -b "$CTL" ]; }
}

wait_for_disks() {
  i=0
  until find_disks; do
    [ $i -lt 100 ] || return 1
    sleep 0.1
    i=$((i + 1))
  done
}

# kernel_errors: the first block or filesystem error lines of the kernel log.
kernel_errors() {
  dmesg | grep -iE 'I/O error|EXT4-fs error|blk_update_request|critical|virtio.*(err|fail)|BAD_RING|not a head|blocked for more than|call trace' | head -5
}
# kernel_log_check NAME: no block or filesystem errors in the kernel log.
kernel_log_check() {
  errors=$(kernel_errors)
  if [ -z "$errors" ]; then
    pass "$1"
  else
    fail "$1" "$(echo "$errors" | tr '\n' ' ')"
  fi
}
