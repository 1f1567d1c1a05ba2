#!/bin/sh
# The guest side of integration/e2e-reconnect.sh (installed as /e2e/test.sh):
# a verified write loop on the raw vhost-user-blk disk that keeps running
# while the host kills and restarts the backend.
#
# WRITERS writers run at once, writer w pinned to CPU w mod CPUs (blk-mq then
# sends its requests through that CPU's virtqueue). Round r of writer w fills slot
# (r - 1) mod SLOTS of its own region with records naming the run, the writer,
# the round and their own byte offset (a lost, stale or misplaced write cannot
# compare equal), writes it with one O_DIRECT write and a FLUSH (fsync), reads
# it back with O_DIRECT and compares, then prints "RC-ROUND w=W r=R" on the console: the
# host kills the backend between these markers and requires new ones after
# each restart. Any failed dd, any mismatch or any kernel error line prints
# "RC-ERROR ..." (the host stops at once) and fails the run.
# The host writes "STOP-<RUNID>" on the control disk (serial CTL_SERIAL) when
# it is done killing; the writers finish their round, then a last pass reads
# every slot written back, through the backend and through the guest kernel's
# own dm-crypt on the image file (the read-only disk with serial REF_SERIAL),
# and must find the last round written there.
# /e2e/conf sets RUNID, QUEUES, WRITERS, SLOTS, SLOT_BYTES, REF_SERIAL,
# CTL_SERIAL; /e2e/volume.key is the image's plain dm-crypt key (AES-256-XTS).
# shellcheck source=/dev/null
. /e2e/conf
# shellcheck source=integration/guest/lib.sh
. /e2e/lib.sh

error() {
  echo "RC-ERROR $*"
  : >/tmp/stop
}
# kernel_watch: one RC-ERROR for the first kernel error lines.
kernel_watch() {
  [ ! -e /tmp/kernel-error ] || return 0
  errors=$(kernel_errors)
  [ -z "$errors" ] || {
    : >/tmp/kernel-error
    error "kernel log: $(echo "$errors" | tr '\n' ' ')"
  }
}

# slot_off W S: byte offset of slot S of writer W.
slot_off() { echo $((($1 * SLOTS + $2) * SLOT_BYTES)); }

# records W R OFF: the SLOT_BYTES that round R of writer W writes at OFF, as
# 64-byte records.
records() {
  awk -v id="$RUNID" -v w="$1" -v r="$2" -v base="$3" -v n=$((SLOT_BYTES / 64)) 'BEGIN {
      for (i = 0; i < n; i++)
        printf "%-63s\n", sprintf("CRYPTBLK-E2E-%s w=%d r=%06d off=%012d", id, w, r, base + i * 64)
    }'
}

# writer W: rounds until /tmp/stop exists; /tmp/wW.slotS keeps the records
# last verified in slot S (for the final pass), /tmp/wW.rounds the number of
# rounds.
writer() {
  w=$1
  cpu=$((w % $(nproc)))
  pat=/tmp/w$w.pat
  err=/tmp/w$w.err
  r=0
  while [ ! -e /tmp/stop ]; do
    r=$((r + 1))
    s=$(((r - 1) % SLOTS))
    off=$(slot_off "$w" "$s")
    records "$w" "$r" "$off" >"$pat"
    if ! taskset -c "$cpu" dd if="$pat" of="$DISK" bs="$SLOT_BYTES" seek=$((off / SLOT_BYTES)) \
      oflag=direct conv=fsync 2>"$err"; then
      error "writer $w round $r: write at $off failed: $(tr '\n' ' ' <"$err")"
      fail "writer-$w" "round $r: write failed"
      return 1
    fi
    if ! same_region "$DISK" "$off" "$SLOT_BYTES" "$pat" direct "$cpu"; then
      error "writer $w round $r: slot at $off reads back different"
      fail "writer-$w" "round $r: read-back mismatch at $off"
      return 1
    fi
    mv "$pat" "/tmp/w$w.slot$s"
    echo "RC-ROUND w=$w r=$r"
  done
  echo "$r" >"/tmp/w$w.rounds"
  pass "writer-$w" "$r rounds verified"
}

# verify_all DEV NAME: every slot holds the records of the last round that
# wrote it; one result line.
verify_all() {
  dev=$1
  name=$2
  good=0
  bad=
  for f in /tmp/w*.slot*; do
    [ -e "$f" ] || continue
    w=${f#/tmp/w}
    w=${w%%.*}
    s=${f##*.slot}
    off=$(slot_off "$w" "$s")
    if same_region "$dev" "$off" "$SLOT_BYTES" "$f" direct "$((w % $(nproc)))"; then
      good=$((good + 1))
    else
      bad="$bad w$w/s$s@$off"
    fi
  done
  if [ -z "$bad" ] && [ "$good" -gt 0 ]; then
    pass "$name" "$good slots of $SLOT_BYTES bytes"
  else
    fail "$name" "$good slots good; wrong:${bad:- none written}"
  fi
}

if ! wait_for_disks; then
  fail disk-present "10 s after virtio_blk loaded: test disk '$DISK', image '$REF', control '$CTL' ($(echo /sys/block/*))"
  exit 0
fi
pass disk-present
sysblk=/sys/block/${DISK#/dev/}
vdev=$(basename "$(readlink "$sysblk/device")")
set -- "$sysblk"/mq/*
if [ $# = "$QUEUES" ]; then
  pass queues
else
  fail queues "$# queues, expected $QUEUES"
fi

info "disks ready at uptime $(uptime_s): vhost-user-blk $DISK, image $REF, control $CTL; $WRITERS writers"
echo "RC-START"
t0=$(uptime_s)
pids=
w=0
while [ $w -lt "$WRITERS" ]; do
  writer $w &
  pids="$pids $!"
  w=$((w + 1))
done

# Until the writers are done: watch the control disk and the kernel log.
stop_seen=
while :; do
  alive=
  for p in $pids; do
    ! kill -0 "$p" 2>/dev/null || alive=1
  done
  [ -n "$alive" ] || break
  if [ -z "$stop_seen" ] &&
    dd if="$CTL" iflag=direct bs=512 count=1 2>/dev/null | grep -q "STOP-$RUNID"; then
    stop_seen=1
    info "stop requested at uptime $(uptime_s)"
    : >/tmp/stop
  fi
  kernel_watch
  sleep 0.5
done
for p in $pids; do wait "$p"; done
rounds=$(cat /tmp/w*.rounds 2>/dev/null | tr '\n' ' ')
info "writers done after $(since "$t0") s; rounds per writer: $rounds"
if [ -n "$stop_seen" ]; then
  pass stopped-by-host
else
  fail stopped-by-host "the writers stopped before the host asked"
fi

# The last pass: through the backend, then through dm-crypt on the image.
drop_caches
verify_all "$DISK" final-verify
if DM_DISABLE_UDEV=1 /sbin/cryptsetup open --batch-mode --readonly --type plain \
  --cipher aes-xts-plain64 --key-size 512 --key-file /e2e/volume.key "$REF" rc-image \
  </dev/null >/tmp/cryptsetup.log 2>&1; then
  pass dmcrypt-open
  verify_all /dev/mapper/rc-image dmcrypt-verify
  DM_DISABLE_UDEV=1 /sbin/cryptsetup close rc-image </dev/null || info "cryptsetup close failed"
else
  fail dmcrypt-open "$(tail -3 /tmp/cryptsetup.log | tr '\n' ' ')"
fi

q0=$(queue_irqs "$vdev" 0)
q1=$(queue_irqs "$vdev" 1)
if [ "$q0" -gt 0 ] && [ "$q1" -gt 0 ]; then
  pass both-queues-used "req.0=$q0 req.1=$q1 interrupts"
else
  fail both-queues-used "req.0=$q0 req.1=$q1 interrupts"
fi
kernel_log_check kernel-log
