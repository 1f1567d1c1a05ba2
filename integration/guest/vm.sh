# The host side of a guest test: the QEMU command line, the backend's socket
# and its shutdown, and the guest's results on the serial console.
# Sourced after integration/lib.sh and guest/kernel.sh. The callers set:
# SOCK (the vhost-user socket), SERIAL (QEMU's console file), RUN (the run's
# directory), BACKEND (its name) and BACKEND_LOG, backend_pid (the running
# backend), server_pid (a server below the backend, if any: e2e-qemu.sh's
# nbdkit), IMG and REF_SERIAL (the image, given to the guest read-only as a
# second disk with that serial, for its dm-crypt), MEM, CPUS, QUEUES, MARKER
# (the prefix of every record the guest writes) and EXPECTED_RESULTS; REF_DRIVE,
# if set, is the reference disk's -drive instead of the file IMG (e2e-qemu.sh's
# RBD run: the image in the cluster, through QEMU's rbd driver).
# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are the callers' results

# cleanup_on_exit SECRET-FILE...: from now on, ending the script in any way
# (exit, INT, TERM) kills QEMU (qemu_pid), the backend (backend_pid) and the
# server below it (server_pid) and removes the files given: keys and passphrases are test values, but still
# do not leave them around.
backend_pid=
qemu_pid=
server_pid=
cleanup_on_exit() {
  CLEANUP_FILES=("$@")
  trap cleanup EXIT
  # Turn signals into an exit so that the EXIT trap always runs.
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
cleanup() {
  local pid
  for pid in $qemu_pid $backend_pid $server_pid; do
    kill "$pid" 2>/dev/null || true
  done
  rm -f "${CLEANUP_FILES[@]}"
}

qemu_accel() {
  if { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && [ -w /dev/kvm ]; then
    echo "-accel kvm -cpu host"
  else
    # /dev/kvm may be a paravirtual hypervisor that Debian's kernel dies under.
    echo "-accel tcg,thread=multi -cpu max"
  fi
}

# guest_qemu_args INITRD [CHARDEV-OPTIONS]: sets QEMU_ARGS, the arguments of
# qemu-system-x86_64 for the test guest booting INITRD, with the vhost-user-blk
# disk on SOCK (CHARDEV-OPTIONS, e.g. ",reconnect-ms=1000", are appended to
# its -chardev) and the read-only image disk. E2E_DEBUG=1 puts kernel messages
# and a shell trace of the guest test on the console; E2E_APPEND adds kernel
# parameters.
guest_qemu_args() {
  local accel cmdline_extra=quiet
  accel=$(qemu_accel)
  [ "${E2E_DEBUG:-0}" = 0 ] || cmdline_extra=e2edebug
  log "guest: $accel, $CPUS vCPUs, $QUEUES queues"
  # SC2206: $accel is a list of options; SC2054: commas inside option values.
  # shellcheck disable=SC2206,SC2054
  QEMU_ARGS=(-nodefaults -no-user-config -display none
    $accel -machine q35,memory-backend=mem -m "$MEM" -smp "$CPUS"
    -object memory-backend-memfd,id=mem,size="$MEM",share=on
    -kernel "$GUEST_VMLINUX" -initrd "$1"
    -append "console=ttyS0 rdinit=/init panic=-1 mitigations=off $cmdline_extra ${E2E_APPEND:-}"
    -serial file:"$SERIAL"
    -chardev socket,id=vhost0,path="$SOCK${2:-}"
    -device vhost-user-blk-pci,chardev=vhost0,num-queues="$QUEUES"
    -drive "${REF_DRIVE:-if=none,id=ref,file=$IMG,format=raw,readonly=on,file.locking=off}"
    -device virtio-blk-pci,drive=ref,serial="$REF_SERIAL",num-queues=1)
}

# Sets CRYPTBLK, the daemon under test: the given path, or a binary built here
# with cargo (profile E2E_PROFILE: debug, the default, or release).
resolve_cryptblk() {
  local profile=${E2E_PROFILE:-debug}
  if [ -n "${CRYPTBLK:-}" ]; then
    [ -x "$CRYPTBLK" ] || die "CRYPTBLK=$CRYPTBLK is not an executable"
  else
    need_tools cargo
    local flag=()
    [ "$profile" = debug ] || flag=(--profile "$profile")
    log "building cryptblk ($profile)"
    (cd "$REPO_DIR" && cargo build --quiet --bin cryptblk "${flag[@]}") || die "cargo build failed"
    CRYPTBLK=${CARGO_TARGET_DIR:-$REPO_DIR/target}/$profile/cryptblk
  fi
  "$CRYPTBLK" serve --help >/dev/null 2>&1 || die "$CRYPTBLK has no 'serve' subcommand"
}

# Waits until the backend just started (backend_pid) listens on SOCK.
wait_for_socket() {
  local _
  for _ in $(seq 100); do
    listening "$SOCK" && return 0
    kill -0 "$backend_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$BACKEND_LOG" >&2
  die "$BACKEND did not listen on its socket $SOCK"
}

# Stops the backend once the guest is gone (it may already have exited when the
# frontend disconnected): SIGTERM must make it exit cleanly and promptly.
# Sets BACKEND_EXIT.
stop_backend() {
  local _ rc=0
  if kill -0 "$backend_pid" 2>/dev/null; then
    kill -TERM "$backend_pid"
    for _ in $(seq 100); do
      kill -0 "$backend_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$backend_pid" 2>/dev/null; then
      kill -KILL "$backend_pid"
      wait "$backend_pid" 2>/dev/null || true
      backend_pid=
      die "$BACKEND did not exit within 10 s of SIGTERM"
    fi
  fi
  wait "$backend_pid" || rc=$?
  backend_pid=
  # cryptblk handles SIGTERM (finish requests, sync, remove the socket) and
  # must exit 0; 143 (killed by the signal, unhandled) is tolerated only for
  # the peers we do not own.
  [ "$rc" = 0 ] || { [ "$rc" = 143 ] && [ "$BACKEND" != cryptblk ]; } || {
    tail -20 "$BACKEND_LOG" >&2
    die "$BACKEND exited with status $rc"
  }
  BACKEND_EXIT=$rc
}

guest_failed() {
  echo "---- last lines of the guest console ($SERIAL) ----" >&2
  tail -30 "$SERIAL" >&2 || true
  echo "---- last lines of the backend log ($BACKEND_LOG) ----" >&2
  tail -10 "$BACKEND_LOG" >&2 || true
  if [ -s "$RUN/qemu.log" ]; then
    echo "---- last lines of QEMU's log ($RUN/qemu.log) ----" >&2
    tail -10 "$RUN/qemu.log" >&2
  fi
  die "$1"
}

# Every expected check must report PASS, between both markers. Sets
# GUEST_FAILS (the failed or missing checks' lines), GUEST_PASSES (how many
# names passed) and the guest's uptimes at its milestones: BOOT_S (init
# reached, one per boot), REBOOT_S (first boot done, if it rebooted), END_S.
check_guest_results() {
  local log=$RUN/serial.txt name
  tr -d '\r' <"$SERIAL" >"$log"
  grep -q '^E2E-RESULTS-BEGIN' "$log" || guest_failed "the guest never reached its init script"
  grep -q '^E2E-RESULTS-END' "$log" || guest_failed "the guest did not finish its checks"
  grep '^E2E-INFO' "$log" | sed 's/^E2E-INFO /  guest: /' >&2 || true
  GUEST_FAILS=$(grep '^E2E-RESULT FAIL' "$log" || true)
  for name in $EXPECTED_RESULTS; do
    grep -qE "^E2E-RESULT PASS $name( |\$)" "$log" ||
      grep -q "^E2E-RESULT FAIL $name" "$log" ||
      GUEST_FAILS+=$'\n'"E2E-RESULT FAIL $name (never reported)"
  done
  # "modules" passes on both boots: count names, not lines.
  GUEST_PASSES=$(awk '$1 == "E2E-RESULT" && $2 == "PASS" && !seen[$3]++ { n++ } END { print n + 0 }' "$log")
  BOOT_S=$(sed -n 's/^E2E-BOOTED uptime=//p' "$log" | paste -sd/)
  REBOOT_S=$(sed -n 's/^E2E-REBOOT uptime=//p' "$log")
  END_S=$(sed -n 's/^E2E-RESULTS-END uptime=//p' "$log")
}

# The host's own view of the image after the guest and backend are gone:
# host_check NAME COMMAND... logs PASS or FAIL and collects the failures in
# HOST_FAILS.
HOST_FAILS=
host_check() {
  local name=$1
  shift
  if "$@"; then
    log "host: PASS $name"
  else
    log "host: FAIL $name"
    HOST_FAILS+=" $name"
  fi
}
no_plaintext_in_image() { [ "$(grep -aFc "$MARKER" "$IMG" || true)" = 0 ]; }
