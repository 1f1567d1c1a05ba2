#!/usr/bin/env bash
# Reconnect test with a real VMM: a QEMU guest keeps writing and verifying
# data on a cryptblk disk while the host SIGKILLs the daemon 10 times at random
# moments and restarts it on the same socket. QEMU's vhost-user-blk reconnects
# (chardev reconnect-ms) and, with VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the
# new daemon resubmits the requests that were in flight when the old one died:
# the guest must see no I/O error, no hang and no lost or stale write.
#
#   bash integration/e2e-reconnect.sh    # three runs: --crypto inline (page
#       cache mapping), --crypto inline --direct (io_uring: many requests per
#       queue at the disk, completed out of order), then --crypto workers
#       --split-threshold 16K --direct (large requests in the pool, the rest
#       through io_uring). Out of order, the VMM cannot tell from the used
#       ring alone which requests were in flight: only the inflight region can.
#       Then a control run (--inflight-tracking false, 3 kills) that must
#       replay nothing: the check that the runs replayed something has to
#       trip on it, or the test fails
#   E2E_SERVE_ARGS='--crypto inline' bash integration/e2e-reconnect.sh  # one run
#
# The guest (guest/reconnect.sh) runs one verified write loop per queue on the
# raw disk and prints a progress marker per round. The host kills the daemon
# 0.2-1.5 s after a marker (while writes are in flight), restarts it, and
# requires every writer to finish two more rounds within RECONNECT_PROGRESS
# seconds: a hang is a failure, never a skip. After the last kill the host
# asks the guest (through a small control disk) to stop; the guest reads every
# slot it wrote back through the daemon and through its own kernel's dm-crypt
# on the image file, then powers off. The host checks that the image holds no
# plaintext record.
#
# Environment: CRYPTBLK (the binary; default: built here with cargo, profile
# E2E_PROFILE=debug|release); E2E_SERVE_ARGS (extra `cryptblk serve`
# options; set, even empty: one run); RECONNECT_RUN (names the run's
# directory, integration/work/e2e-reconnect-NAME); RECONNECT_KILLS (default 10);
# RECONNECT_PROGRESS (seconds each writer has to make progress after a
# restart, default 60); RECONNECT_TIMEOUT (seconds for the whole guest run,
# default 300); E2E_DEBUG, E2E_APPEND, WORK_DIR as for e2e-qemu.sh.
# Exits 0 only if every check passed.
set -euo pipefail
LOG_TAG=e2e-reconnect
# shellcheck source=integration/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/guest/writers.sh
. "$INTEGRATION_DIR/guest/writers.sh"

SERVE_ARGS=${E2E_SERVE_ARGS:-}
KILLS=${RECONNECT_KILLS:-10}
PROGRESS_S=${RECONNECT_PROGRESS:-60}
TIMEOUT=${RECONNECT_TIMEOUT:-300}
writers_run "e2e-reconnect${RECONNECT_RUN:+-$RECONNECT_RUN}"
SOCK=$RUN/vhost.sock
SERIAL=$RUN/serial.log
BACKEND_LOG=$RUN/backend.log

cleanup_on_exit "$KEYFILE" "$RUN/initramfs/e2e/volume.key"

# start_daemon N: the Nth start of cryptblk on the same socket, image and key,
# appending to one log. A SIGKILLed daemon leaves its socket file behind:
# remove it, so that the socket's reappearance means the new daemon listens.
start_daemon() {
  rm -f "$SOCK"
  echo "==== e2e-reconnect: daemon start $1 at $(date +%T.%3N)" >>"$BACKEND_LOG"
  # shellcheck disable=SC2086 # SERVE_ARGS is a list of options
  RUST_LOG=${RUST_LOG:-info} "$CRYPTBLK" serve --socket "$SOCK" --image "$IMG" --type plain \
    --key-file "$KEYFILE" --key-size 512 --queues "$QUEUES" $SERVE_ARGS >>"$BACKEND_LOG" 2>&1 &
  backend_pid=$!
  wait_for_socket
}

# daemon_busy: a thread of the daemon is running, runnable or in disk sleep
# (processing a request, e.g. in fdatasync for a FLUSH: idle vring threads
# and workers sleep interruptibly in epoll or on a condvar).
daemon_busy() {
  awk '{ sub(/^.*\) /, ""); if ($1 == "R" || $1 == "D") busy = 1 } END { exit !busy }' \
    /proc/"$backend_pid"/task/*/stat 2>/dev/null
}

# inflight_mapped: the running daemon maps the in-flight region (the memfd
# that cryptblk creates for GET_INFLIGHT_FD and QEMU hands back to every new
# daemon with SET_INFLIGHT_FD). Sets MAPPED (yes or no) and counts the
# daemons that do in INFLIGHT_MAPPED.
INFLIGHT_MAPPED=0
inflight_mapped() {
  MAPPED=no
  grep -q 'memfd:cryptblk-inflight' /proc/"$backend_pid"/maps 2>/dev/null || return 0
  MAPPED=yes
  INFLIGHT_MAPPED=$((INFLIGHT_MAPPED + 1))
}

# kill_daemon: SIGKILL, preferably while the daemon is processing requests
# (polled for 1 to 2 s). Sets KILLED_BUSY (yes or no) and counts BUSY_KILLS.
BUSY_KILLS=0
kill_daemon() {
  local rc=0 until=$((SECONDS + 2))
  KILLED_BUSY=no
  while [ "$SECONDS" -lt "$until" ]; do
    if daemon_busy; then
      KILLED_BUSY=yes
      break
    fi
  done
  kill -KILL "$backend_pid" 2>/dev/null || true
  [ "$KILLED_BUSY" = no ] || BUSY_KILLS=$((BUSY_KILLS + 1))
  # (stderr: no "Killed" job message from bash)
  wait "$backend_pid" 2>/dev/null || rc=$?
  backend_pid=
  # 137 = 128 + SIGKILL; anything else means it had already ended on its own.
  [ "$rc" = 137 ] || guest_failed "the daemon had exited with status $rc before it was killed"
}

# The guest's console without carriage returns.
console() { { tr -d '\r' <"$SERIAL"; } 2>/dev/null || true; }
# watch_run: stops the test at once when QEMU is gone, the guest reported an error or
# panicked, the daemon died on its own, or the whole run took too long.
watch_run() {
  local text line
  kill -0 "$qemu_pid" 2>/dev/null ||
    guest_failed "QEMU exited during the test: $(tr '\n' ' ' <"$RUN/qemu.log")"
  text=$(console)
  line=$(grep -m1 -E '^(RC-ERROR|E2E-RESULT FAIL)|Kernel panic' <<<"$text" || true)
  [ -z "$line" ] || guest_failed "the guest reported: $line"
  [ -z "$backend_pid" ] || kill -0 "$backend_pid" 2>/dev/null ||
    guest_failed "the daemon exited on its own (see $BACKEND_LOG)"
  [ "$SECONDS" -lt "$TIMEOUT" ] || guest_failed "the test ran over its ${TIMEOUT}s timeout"
}

main() {
  local t_start t_boot k delay at kill_log=() rc=0
  t_start=$(now)
  need_tools qemu-system-x86_64 busybox cpio awk grep od timeout cmp truncate
  resolve_cryptblk
  rm -rf "$RUN"
  mkdir -p "$RUN"
  guest_kernel_prepare
  make_guest
  start_daemon 1
  # QEMU 10.0 takes both reconnect=1 (seconds, deprecated since 9.2) and
  # reconnect-ms=1000: use the one that stays.
  guest_qemu_args "$RUN/initramfs.cpio" ,reconnect-ms=1000
  # shellcheck disable=SC2054 # commas inside option values
  QEMU_ARGS+=(-drive if=none,id=ctl,file="$CTLFILE",format=raw,file.locking=off
    -device virtio-blk-pci,drive=ctl,serial="$CTL_SERIAL",num-queues=1 -no-reboot)
  log "booting the guest; then $KILLS kills of the daemon (timeout ${TIMEOUT}s)"
  SECONDS=0
  t_boot=$(now)
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" >"$RUN/qemu.log" 2>&1 &
  qemu_pid=$!

  # Boot: every writer has verified a first round.
  wait_rounds "$(plus 1)" "after boot"
  log "guest writing after $(elapsed "$t_boot" "$(now)") s; rounds $(rounds)"
  for k in $(seq 1 "$KILLS"); do
    # A new marker, then a random 0.2-1.5 s into the next rounds.
    wait_rounds "$(plus 1)" "before kill $k"
    delay=$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + (r % 1301) / 1000 }')
    sleep "$delay"
    watch_run
    inflight_mapped
    kill_daemon
    at=$(rounds)
    start_daemon $((k + 1))
    # Two more rounds each: at least one whole round went through the new daemon.
    wait_rounds "$(plus 2)" "after kill $k (rounds at the kill: $at)"
    kill_log+=("kill $k: ${delay}s after a marker, daemon busy: $KILLED_BUSY, in-flight region mapped: $MAPPED, rounds at the kill: $at-> two more rounds each in ${TOOK}s")
    log "${kill_log[-1]}"
  done

  inflight_mapped
  log "daemon $((k + 1)) (the last) maps the in-flight region: $MAPPED; asking the guest to stop"
  stop_writers
  while kill -0 "$qemu_pid" 2>/dev/null; do
    watch_run
    sleep 0.5
  done
  wait "$qemu_pid" || rc=$?
  qemu_pid=
  [ "$rc" = 0 ] || guest_failed "QEMU exited with status $rc: $(tr '\n' ' ' <"$RUN/qemu.log")"
  stop_backend
  check_guest_results
  host_check kills-done [ "$k" = "$KILLS" ]
  host_check image-has-no-plaintext no_plaintext_in_image
  if without_region; then
    # The control run (all_runs): no daemon may have had the region, or the
    # control would not show what a run without it looks like.
    host_check inflight-region-in-no-daemon [ "$INFLIGHT_MAPPED" = 0 ]
  else
    # Every daemon, the first included, must have had the region: without it
    # QEMU can only restart a queue at its used index, which loses requests
    # that completed out of order (see the run with --crypto workers).
    host_check inflight-region-in-every-daemon [ "$INFLIGHT_MAPPED" = $((k + 1)) ]
  fi

  # crates/core/src/device/queue.rs logs "queue Q: replaying N requests ..." when a
  # restarted daemon finds requests its predecessor left in flight. A run
  # may replay nothing (no kill caught a request in flight): awk alone, as
  # grep's "no match" status would end this script under pipefail.
  local replays replayed
  read -r replays replayed < <(awk '{ for (i = 1; i < NF; i++) if ($i == "replaying" && $(i + 2) == "requests") { n++; s += $(i + 1) } }
    END { print n + 0, s + 0 }' "$BACKEND_LOG")
  echo "==== e2e-reconnect summary (cryptblk${SERVE_ARGS:+ $SERVE_ARGS}, guest kernel $GUEST_KVER) ===="
  printf '%s\n' "${kill_log[@]}"
  # shellcheck disable=SC2086 # counting words
  echo "kills: $k of $KILLS; writers' last rounds: $(rounds); guest checks passed: $GUEST_PASSES of" \
    "$(set -- $EXPECTED_RESULTS && echo $#); host checks failed: ${HOST_FAILS:-none}"
  echo "kills while a daemon thread was busy: $BUSY_KILLS of $k; daemons that mapped the in-flight region:" \
    "$INFLIGHT_MAPPED of $((k + 1)); requests replayed from the in-flight region: $replayed" \
    "(by $replays queue restarts)"
  echo "times: guest run $(elapsed "$t_boot" "$(now)") s (init reached at ${BOOT_S:-?} s uptime," \
    "checks done at ${END_S:-?} s), total $(elapsed "$t_start" "$(now)") s; logs in $RUN"
  if [ -n "$GUEST_FAILS" ] || [ -n "$HOST_FAILS" ]; then
    [ -z "$GUEST_FAILS" ] || printf '%s\n' "$GUEST_FAILS" | sed '/^$/d; s/^/  guest: /'
    die "reconnect test failed"
  fi
  rm -rf "$IMG" "$RUN/initramfs" "$RUN/initramfs.cpio"
  echo "PASS"
}

# without_region: this run serves with --inflight-tracking false (the control
# run): the daemon offers no INFLIGHT_SHMFD, so QEMU hands it no region.
without_region() { [[ " $SERVE_ARGS " == *" --inflight-tracking false "* ]]; }

# replay_check N: the check on the replays of a set of runs. Kills that never
# caught a request in flight would pass without testing the replay at all:
# the runs together must have replayed something.
replay_check() { [ "$1" -gt 0 ]; }

# Without E2E_SERVE_ARGS: both crypto placements and both I/O paths, each a run
# of this script, then the negative control of the replay check.
all_runs() {
  local status=0 t0 out replayed=0 n control_rc=0 detected=no
  t0=$(now)
  resolve_cryptblk
  export CRYPTBLK
  out=$(mktemp)
  one_run() { # name serve-args [kills]: sets n, the run's replays
    local rc=0
    RECONNECT_RUN=$1 E2E_SERVE_ARGS=$2 RECONNECT_KILLS=${3:-$KILLS} bash "${BASH_SOURCE[0]}" |
      tee "$out" || rc=1
    n=$(sed -n 's/.*requests replayed from the in-flight region: \([0-9]*\).*/\1/p' "$out" | tail -1)
    n=${n:-0}
    return $rc
  }
  local run
  for run in "inline|--crypto inline" "direct|--crypto inline --direct" \
    "workers|--crypto workers --split-threshold 16K --direct"; do
    n=0
    one_run "${run%%|*}" "${run#*|}" || status=1
    replayed=$((replayed + n))
  done
  if ! replay_check "$replayed"; then
    log "FAIL: no run replayed a request from the in-flight region; the replay went untested"
    status=1
  fi
  # Negative control: the same workload with INFLIGHT_SHMFD disabled (fewer
  # kills: it only has to show the check trips). QEMU then restarts each
  # queue at its used index, which hides the loss from the guest's checks
  # (README, "Status"), so only the replay count can tell: it must be 0 and
  # the replay check must fail on it. A control that replayed something, or
  # whose own checks failed, is a failure of the test.
  n=0
  one_run control '--crypto inline --inflight-tracking false' 3 || control_rc=1
  if [ "$control_rc" != 0 ]; then
    log "FAIL: the control run (--inflight-tracking false) failed its own checks"
    status=1
  elif replay_check "$n"; then
    log "FAIL: the control run replayed $n requests without an in-flight region;" \
      "the replay count does not measure the region"
    status=1
  else
    detected=yes
    log "control (--inflight-tracking false): $n requests replayed, the replay check trips as it must"
  fi
  rm -f "$out"
  echo "==== e2e-reconnect: $([ $status = 0 ] && echo PASS || echo FAILED)," \
    "$replayed requests replayed, control detected: $detected, all runs in $(elapsed "$t0" "$(now)") s"
  return $status
}

if [ -z "${E2E_SERVE_ARGS+set}" ]; then
  all_runs
else
  main "$@"
fi
