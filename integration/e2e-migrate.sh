#!/usr/bin/env bash
# Live migration with a real VMM: a QEMU guest keeps writing and verifying data
# on a cryptblk disk while QEMU migrates it to a second QEMU on the same host,
# whose disk is a second cryptblk daemon on the same image (shared storage).
#
#   bash integration/e2e-migrate.sh      # two runs, then the negative control:
#       --crypto inline through the page cache (the image mapping), and
#       --crypto workers --direct (O_DIRECT, io_uring). The control serves with
#       --dirty-logging false: QEMU must refuse to migrate, and the run must
#       notice
#   E2E_SERVE_ARGS='--crypto inline' bash integration/e2e-migrate.sh  # one run
#
# The source daemon serves the image on socket A; the destination daemon is
# started at the same time with --incoming on socket B (the source still holds
# the image's locks; see README, "Live migration"). The destination QEMU runs
# with -incoming on a unix socket, connected to B from the start. The guest
# (guest/reconnect.sh, the reconnect test's workload) runs one verified write
# loop per writer: O_DIRECT writes, FLUSH, O_DIRECT read-back. After a few
# rounds the host starts `migrate` over QMP while the writers run; QEMU turns on
# dirty-page logging in the source daemon (VHOST_F_LOG_ALL, SET_LOG_BASE),
# copies RAM while the daemon logs what it writes into guest memory, stops the
# VM (GET_VRING_BASE: the source daemon drains, syncs and hands the image
# over) and resumes it on the destination, whose daemon takes the image at its
# first request. The writers must go on there without an I/O error or a
# mismatch; then the host asks the guest to stop, and the guest reads every
# slot back through the destination daemon (which wrote few of them) and
# through its own kernel's dm-crypt on the image file. The host checks that
# the migration completed, that the source handed the image over and the
# destination took it, and that the image holds no plaintext record.
# (cryptsetup cannot open the image on these hosts, which have no
# device-mapper: the guest's dm-crypt is the independent reader.)
#
# Environment: CRYPTBLK, E2E_PROFILE, E2E_DEBUG, E2E_APPEND, WORK_DIR as for
# e2e-qemu.sh; E2E_SERVE_ARGS (extra `cryptblk serve` options for both
# daemons; set, even empty: one run); MIGRATE_RUN (names the run's directory,
# integration/work/e2e-migrate-NAME); MIGRATE_PROGRESS (seconds the writers
# have to make progress, default 60); MIGRATE_TIMEOUT (seconds for the whole
# guest run, default 300). Exits 0 only if every check passed.
set -euo pipefail
LOG_TAG=e2e-migrate
# shellcheck source=integration/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/guest/writers.sh
. "$INTEGRATION_DIR/guest/writers.sh"

SERVE_ARGS=${E2E_SERVE_ARGS:-}
PROGRESS_S=${MIGRATE_PROGRESS:-60}
TIMEOUT=${MIGRATE_TIMEOUT:-300}
writers_run "e2e-migrate${MIGRATE_RUN:+-$MIGRATE_RUN}"
MIGRATION_SOCK=$RUN/migrate.sock

# Each side: its daemon's socket, log and pid, its QEMU's console, monitor and pid.
SRC_SOCK=$RUN/source.sock DST_SOCK=$RUN/destination.sock
SRC_LOG=$RUN/source.log DST_LOG=$RUN/destination.log
SRC_SERIAL=$RUN/serial-source.log DST_SERIAL=$RUN/serial-destination.log
SRC_QMP=$RUN/qmp-source.sock DST_QMP=$RUN/qmp-destination.sock
src_daemon= dst_daemon= src_qemu= dst_qemu=
MIGRATION=none MIGRATION_S=0 REFUSAL=
# What vm.sh's guest_failed shows: the console of both sides (console keeps
# it current) and the source daemon's log.
SERIAL=$RUN/serial.log
BACKEND_LOG=$SRC_LOG

cleanup_on_exit "$KEYFILE" "$RUN/initramfs/e2e/volume.key"
# vm.sh's cleanup knows one QEMU and one backend: this test has two of each.
cleanup() {
  local pid
  for pid in $src_qemu $dst_qemu $src_daemon $dst_daemon; do
    kill "$pid" 2>/dev/null || true
  done
  rm -f "${CLEANUP_FILES[@]}"
}

# The guest's console so far: on the source until the switch, then on the
# destination.
console() { { cat "$SRC_SERIAL" "$DST_SERIAL" | tr -d '\r' | tee "$SERIAL"; } 2>/dev/null || true; }

# start_daemon SIDE SOCKET LOG [OPTIONS...]: starts cryptblk; prints nothing,
# sets backend_pid.
start_daemon() {
  local side=$1 sock=$2 log=$3
  shift 3
  # shellcheck disable=SC2086 # SERVE_ARGS is a list of options
  RUST_LOG=${RUST_LOG:-info} "$CRYPTBLK" serve --socket "$sock" --image "$IMG" --type plain \
    --key-file "$KEYFILE" --key-size 512 --queues "$QUEUES" $SERVE_ARGS "$@" >>"$log" 2>&1 &
  backend_pid=$!
  SOCK=$sock BACKEND_LOG=$log wait_for_socket
  log "$side daemon (pid $backend_pid) listens on $sock"
}

# qemu_args SOCKET SERIAL QMP: sets QEMU_ARGS for one side.
qemu_args() {
  SOCK=$1 SERIAL=$2 guest_qemu_args "$RUN/initramfs.cpio"
  # shellcheck disable=SC2054 # commas inside option values
  QEMU_ARGS+=(-drive if=none,id=ctl,file="$CTLFILE",format=raw,file.locking=off
    -device virtio-blk-pci,drive=ctl,serial="$CTL_SERIAL",num-queues=1 -no-reboot
    -qmp unix:"$3",server=on,wait=off)
}

qmp() { python3 "$INTEGRATION_DIR/qmp.py" "$@"; }

# watch_run: fails at once when a QEMU that should run is gone, the guest
# reported an error, a daemon died, or the run took too long.
watch_run() {
  local text line pid
  for pid in $src_qemu $dst_qemu; do
    kill -0 "$pid" 2>/dev/null ||
      guest_failed "QEMU (pid $pid) exited during the test: $(cat "$RUN"/qemu-*.log | tr '\n' ' ')"
  done
  text=$(console)
  line=$(grep -m1 -E '^(RC-ERROR|E2E-RESULT FAIL)|Kernel panic' <<<"$text" || true)
  [ -z "$line" ] || guest_failed "the guest reported: $line"
  for pid in $src_daemon $dst_daemon; do
    kill -0 "$pid" 2>/dev/null || guest_failed "a daemon (pid $pid) exited on its own"
  done
  [ "$SECONDS" -lt "$TIMEOUT" ] || guest_failed "the test ran over its ${TIMEOUT}s timeout"
}

# migrate: runs the migration to the destination and waits for its end while
# the writers go on. Sets MIGRATION (completed, failed or refused: the text of
# QEMU's refusal in REFUSAL) and MIGRATION_S.
migrate() {
  local start status out
  start=$(now)
  # TCG guests dirty memory slowly; a generous downtime keeps the last stop short
  # in rounds, not in guarantees: the data checks judge the result.
  qmp "$SRC_QMP" migrate-set-parameters '{"downtime-limit": 1000}' >/dev/null
  if ! out=$(qmp "$SRC_QMP" migrate "{\"uri\": \"unix:$MIGRATION_SOCK\"}" 2>&1); then
    MIGRATION=refused REFUSAL=$out
    MIGRATION_S=$(elapsed "$start" "$(now)")
    return 0
  fi
  while :; do
    watch_run
    status=$(qmp "$SRC_QMP" query-migrate | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status", "none"))')
    case $status in
      completed | failed | cancelled) break ;;
    esac
    sleep 0.2
  done
  MIGRATION=$status
  MIGRATION_S=$(elapsed "$start" "$(now)")
}

# logged LOG TEXT: the daemon's log has a line with TEXT.
logged() { grep -qF "$2" "$1"; }

main() {
  local t_start t_boot rc=0 before
  t_start=$(now)
  need_tools qemu-system-x86_64 busybox cpio awk grep od timeout python3
  resolve_cryptblk
  rm -rf "$RUN"
  mkdir -p "$RUN"
  guest_kernel_prepare
  make_guest
  start_daemon source "$SRC_SOCK" "$SRC_LOG"
  src_daemon=$backend_pid
  # The destination starts while the source holds the image: --incoming.
  start_daemon destination "$DST_SOCK" "$DST_LOG" --incoming
  dst_daemon=$backend_pid
  backend_pid=

  qemu_args "$DST_SOCK" "$DST_SERIAL" "$DST_QMP"
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" -incoming unix:"$MIGRATION_SOCK" \
    >"$RUN/qemu-destination.log" 2>&1 &
  dst_qemu=$!
  qemu_args "$SRC_SOCK" "$SRC_SERIAL" "$SRC_QMP"
  log "booting the guest on the source; the destination QEMU waits on $MIGRATION_SOCK"
  SECONDS=0
  t_boot=$(now)
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" >"$RUN/qemu-source.log" 2>&1 &
  src_qemu=$!

  wait_rounds "$(plus 1)" "after boot"
  wait_rounds "$(plus 2)" "before the migration"
  before=$(rounds)
  log "guest writing after $(elapsed "$t_boot" "$(now)") s; rounds $before; migrating"
  migrate
  log "migration: $MIGRATION after $MIGRATION_S s${REFUSAL:+: $REFUSAL}"

  if [ "$MIGRATION" = completed ]; then
    [[ "$(qmp "$DST_QMP" query-status)" == *'"running": true'* ]] ||
      guest_failed "the destination VM does not run after the migration"
    # The source stays paused (postmigrate) until it quits; its daemon then
    # waits for a next connection that never comes.
    qmp "$SRC_QMP" quit >/dev/null || true
    wait "$src_qemu" || true
    src_qemu=
    wait_rounds "$(plus 2)" "on the destination"
    log "writers went on on the destination: rounds $before -> $(rounds)"
  fi

  stop_writers
  local guest=${dst_qemu:-}
  [ "$MIGRATION" = completed ] || guest=$src_qemu
  while kill -0 "$guest" 2>/dev/null; do
    watch_run
    sleep 0.5
  done
  wait "$guest" || rc=$?
  [ "$rc" = 0 ] || guest_failed "QEMU exited with status $rc: $(cat "$RUN"/qemu-*.log | tr '\n' ' ')"
  # The other QEMU: the destination that never received a VM (the control
  # run) ends here.
  for pid in $src_qemu $dst_qemu; do
    [ "$pid" = "$guest" ] || kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  src_qemu= dst_qemu=

  backend_pid=$src_daemon BACKEND_LOG=$SRC_LOG stop_backend
  src_daemon=
  backend_pid=$dst_daemon BACKEND_LOG=$DST_LOG stop_backend
  dst_daemon=
  console >/dev/null
  check_guest_results
  host_check image-has-no-plaintext no_plaintext_in_image
  if dirty_logging_off; then
    host_check migration-refused [ "$MIGRATION" = refused ]
    host_check refusal-names-dirty-logging grep -qE 'LOG_ALL|LOG_SHMFD' <<<"${REFUSAL:-}"
  else
    host_check migration-completed [ "$MIGRATION" = completed ]
    host_check source-logged-dirty-pages logged "$SRC_LOG" "dirty-page logging on"
    host_check source-handed-over logged "$SRC_LOG" "handed over"
    host_check destination-took-over logged "$DST_LOG" "taken over"
  fi

  echo "==== e2e-migrate summary (cryptblk${SERVE_ARGS:+ $SERVE_ARGS}, guest kernel $GUEST_KVER) ===="
  # shellcheck disable=SC2086 # counting words
  echo "migration: $MIGRATION in ${MIGRATION_S}s; writers' rounds before: $before, at the end: $(rounds);" \
    "guest checks passed: $GUEST_PASSES of $(set -- $EXPECTED_RESULTS && echo $#);" \
    "host checks failed: ${HOST_FAILS:-none}"
  echo "times: guest run $(elapsed "$t_boot" "$(now)") s, total $(elapsed "$t_start" "$(now)") s; logs in $RUN"
  if [ -n "$GUEST_FAILS" ] || [ -n "$HOST_FAILS" ]; then
    [ -z "$GUEST_FAILS" ] || printf '%s\n' "$GUEST_FAILS" | sed '/^$/d; s/^/  guest: /'
    die "migration test failed"
  fi
  rm -rf "$IMG" "$RUN/initramfs" "$RUN/initramfs.cpio"
  echo "PASS"
}

# dirty_logging_off: this run is the control (the daemons offer no dirty log).
dirty_logging_off() { [[ " $SERVE_ARGS " == *" --dirty-logging false "* ]]; }

# Without E2E_SERVE_ARGS: both placements and both I/O paths, then the control.
all_runs() {
  local status=0 t0 run
  t0=$(now)
  resolve_cryptblk
  export CRYPTBLK
  for run in "inline|--crypto inline" "workers-direct|--crypto workers --direct" \
    "control|--crypto inline --dirty-logging false"; do
    MIGRATE_RUN=${run%%|*} E2E_SERVE_ARGS=${run#*|} bash "${BASH_SOURCE[0]}" || status=1
  done
  echo "==== e2e-migrate: $([ $status = 0 ] && echo PASS || echo FAILED), all runs in $(elapsed "$t0" "$(now)") s"
  return $status
}

if [ -z "${E2E_SERVE_ARGS+set}" ]; then
  all_runs
else
  main "$@"
fi
