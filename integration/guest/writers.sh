# The host side of the verified write loop that guest/reconnect.sh runs in the
# guest (e2e-reconnect.sh, e2e-migrate.sh): the workload's shape, building the
# guest, and following the writers' progress on the console. Sourced after
# integration/lib.sh; sources the guest helpers itself. The callers call
# writers_run DIR-NAME first, set PROGRESS_S, and define console (the guest's
# console so far, without carriage returns) and watch_run (fails the test at
# once when something died or the run took too long).
# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are passed to the guest by name

# shellcheck source=integration/guest/kernel.sh
. "$INTEGRATION_DIR/guest/kernel.sh"
# shellcheck source=integration/guest/initramfs.sh
. "$INTEGRATION_DIR/guest/initramfs.sh"
# shellcheck source=integration/guest/vm.sh
. "$INTEGRATION_DIR/guest/vm.sh"

CPUS=2
QUEUES=2
# Two writers per queue: each writes and reads with O_DIRECT one request at a
# time, so a queue has several requests in flight only with two of them.
WRITERS=$((2 * QUEUES))
MEM=512M
DISK_BYTES=$((64 << 20))
# Each writer cycles through SLOTS slots of SLOT_BYTES (one O_DIRECT write
# each, which the guest splits into several requests in flight at once).
SLOTS=32
SLOT_BYTES=$((256 << 10))
REF_SERIAL="rc-image"
CTL_SERIAL="rc-control"
EXPECTED_RESULTS="modules disk-present queues $(seq -f 'writer-%g' 0 $((WRITERS - 1)) | xargs)
  stopped-by-host final-verify dmcrypt-open dmcrypt-verify both-queues-used kernel-log"

# writers_run NAME: the run's directory (integration/work/NAME) and files: the
# image, its key, the control disk, and the run's id and record marker.
writers_run() {
  RUN=$WORK_DIR/$1
  IMG=$RUN/img.plain
  KEYFILE=$RUN/volume.key
  CTLFILE=$RUN/control
  RUNID=$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')
  MARKER=CRYPTBLK-E2E-$RUNID
  BACKEND=cryptblk
}

# rounds: the last round each writer reported, space-separated.
rounds() {
  local text w r
  text=$(console)
  for w in $(seq 0 $((WRITERS - 1))); do
    r=$(awk -v w="w=$w" '$1 == "RC-ROUND" && $2 == w { sub(/^r=/, "", $3); r = $3 } END { print r }' <<<"$text")
    printf '%s ' "${r:-0}"
  done
}

# wait_rounds MIN WHAT: until every writer has reported round MIN[w] (a list),
# within PROGRESS_S seconds. Sets TOOK, the seconds it took. (Not for $(...):
# its failures must end the test, not a subshell.)
wait_rounds() {
  local t0=$SECONDS start need now w ok
  start=$(now)
  read -r -a need <<<"$1"
  while :; do
    watch_run
    read -r -a now <<<"$(rounds)"
    ok=1
    for w in $(seq 0 $((WRITERS - 1))); do
      [ "${now[$w]}" -ge "${need[$w]}" ] || ok=
    done
    [ -z "$ok" ] || break
    [ $((SECONDS - t0)) -lt "$PROGRESS_S" ] ||
      guest_failed "no progress within ${PROGRESS_S}s $2: writers at rounds $(rounds), need $1"
    sleep 0.2
  done
  TOOK=$(elapsed "$start" "$(now)")
}

# plus N: the current rounds plus N each.
plus() {
  local r out=
  for r in $(rounds); do out+="$((r + $1)) "; done
  echo "$out"
}

make_guest() {
  (umask 077 && head -c 64 /dev/urandom >"$KEYFILE")
  truncate -s "$DISK_BYTES" "$IMG"
  truncate -s 4096 "$CTLFILE"
  local root=$RUN/initramfs
  guest_initramfs_stage "$root"
  install -m 755 "$INTEGRATION_DIR/guest/reconnect.sh" "$root/e2e/test.sh"
  install -m 600 "$KEYFILE" "$root/e2e/volume.key"
  guest_conf "$root/e2e/conf" RUNID QUEUES WRITERS SLOTS SLOT_BYTES REF_SERIAL CTL_SERIAL
  guest_initramfs_pack "$root" "$RUN/initramfs.cpio"
}

# stop_writers: asks the guest (through the control disk) to finish its
# rounds and run its last checks.
stop_writers() {
  printf 'STOP-%s\n' "$RUNID" | dd of="$CTLFILE" conv=notrunc status=none
}
