#!/usr/bin/env bash
# End-to-end test with a real VMM: a QEMU guest writes through a vhost-user-blk
# backend into a LUKS1 image that qemu-img created. Two independent
# implementations then read the image: the guest kernel's dm-crypt (cryptsetup
# opens the image file, attached as a second, read-only disk) and, on the host,
# qemu-img's luks driver; both must see exactly what the guest wrote, and the
# image itself must hold no plaintext.
#
#   bash integration/e2e-qemu.sh                   # BACKEND=cryptblk (default)
#   BACKEND=qsd bash integration/e2e-qemu.sh       # qemu-storage-daemon's luks export
#   BACKEND=plaintext bash integration/e2e-qemu.sh # negative control: MUST fail
#   E2E_FORMAT=plain bash integration/e2e-qemu.sh  # plain dm-crypt image (cryptblk only)
#
# In the guest, dm-crypt opens the image twice: through the LUKS1 header
# (cryptsetup luks) and as plain dm-crypt with the bare volume key and payload
# offset, which is how the backend is configured.
#
# Environment: BACKEND (cryptblk|qsd|plaintext), E2E_FORMAT (luks1|plain), CRYPTBLK (path to the binary; default:
# built here with cargo, profile E2E_PROFILE=debug|release), E2E_TIMEOUT
# (seconds the guest may run, default 180), E2E_DEBUG=1 (kernel messages and a
# shell trace of the guest test on the console), WORK_DIR (cache, default
# integration/work). Exits 0 only if every check passed. Needs the tools from
# integration/install-deps.sh; a missing tool fails the test, it never skips.
set -euo pipefail
LOG_TAG=e2e
# shellcheck source=integration/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/guest/kernel.sh
. "$INTEGRATION_DIR/guest/kernel.sh"
# shellcheck source=integration/guest/initramfs.sh
. "$INTEGRATION_DIR/guest/initramfs.sh"

BACKEND=${BACKEND:-cryptblk}
FORMAT=${E2E_FORMAT:-luks1}
TIMEOUT=${E2E_TIMEOUT:-180}
E2E_PROFILE=${E2E_PROFILE:-debug}
CPUS=2
QUEUES=2
MEM=512M
DISK_BYTES=$((64 << 20))
# Guest layout: an ext4 filesystem on the first 32 MiB, pattern A (4 MiB) at
# 36 MiB, pattern B at a 512-byte but not 4 KiB aligned offset up to the end.
FS_BYTES=$((32 << 20))
PAT_A_OFF=$((36 << 20))
PAT_A_LEN=$((4 << 20))
PAT_B_LEN=$(((2 << 20) + 1536))
PAT_B_OFF=$((DISK_BYTES - PAT_B_LEN))
REF_SERIAL=dmcrypt-ref
EXPECTED_RESULTS="modules disk-present disk-size queues raw-write raw-readback-a raw-readback-b
  both-queues-used mkfs fs-write fsck fs-readback raw-intact-a raw-intact-b
  dmcrypt-plain-open dmcrypt-plain-pattern-a dmcrypt-plain-pattern-b dmcrypt-plain-files kernel-log"
case $FORMAT in
  luks1) EXPECTED_RESULTS+=" dmcrypt-luks-open dmcrypt-luks-pattern-a dmcrypt-luks-pattern-b dmcrypt-luks-files" ;;
  plain) [ "$BACKEND" != qsd ] || die "qemu-storage-daemon cannot serve plain dm-crypt images: E2E_FORMAT=plain needs BACKEND=cryptblk" ;;
  *) die "unknown E2E_FORMAT=$FORMAT (luks1 or plain)" ;;
esac

RUN=$WORK_DIR/e2e-$BACKEND-$FORMAT
SOCK=$RUN/vhost.sock
IMG=$RUN/img.$FORMAT
PASSFILE=$RUN/passphrase
KEYFILE=$RUN/volume.key
SERIAL=$RUN/serial.log
BACKEND_LOG=$RUN/backend.log
RUNID=$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')
MARKER=CRYPTBLK-E2E-$RUNID

backend_pid=
qemu_pid=
cleanup() {
  local pid
  for pid in $qemu_pid $backend_pid; do
    kill "$pid" 2>/dev/null || true
  done
  # The key and passphrase are test values, but still do not leave them around.
  rm -f "$KEYFILE" "$PASSFILE" "$RUN/initramfs/e2e/passphrase" "$RUN/initramfs/e2e/volume.key"
}
trap cleanup EXIT
# Turn signals into an exit so that the EXIT trap always runs.
trap 'exit 130' INT
trap 'exit 143' TERM

# gen_pattern TAG OFF LEN: LEN bytes of 64-byte records, each naming the run,
# the tag and its own byte offset on the disk, so that a misplaced or stale
# sector cannot compare equal.
gen_pattern() {
  [ $(($3 % 64)) -eq 0 ] || die "gen_pattern: length $3 is not a multiple of 64"
  awk -v id="$RUNID" -v tag="$1" -v base="$2" -v n=$(($3 / 64)) 'BEGIN {
      for (i = 0; i < n; i++)
        printf "%-63s\n", sprintf("CRYPTBLK-E2E-%s %s off=%012d", id, tag, base + i * 64)
    }'
}

check_tools() {
  need_tools qemu-system-x86_64 qemu-img cryptsetup busybox cpio awk cmp grep od \
    timeout debugfs e2fsck diff
  [ "$BACKEND" = cryptblk ] || need_tools qemu-storage-daemon
}

# The image, its volume key and payload offset in 512-byte sectors (what a
# dm-crypt table or `cryptblk serve --offset` needs).
make_image() {
  if [ "$FORMAT" = plain ]; then
    (umask 077 && head -c 64 /dev/urandom >"$KEYFILE")
    truncate -s "$DISK_BYTES" "$IMG"
    PAYLOAD=0
  else
    make_luks1_image
  fi
}

# A LUKS1 image made by qemu-img, checked against what the test assumes.
make_luks1_image() {
  printf '%s' "e2e-passphrase-$RUNID" >"$PASSFILE"
  chmod 600 "$PASSFILE"
  qemu-img create -q -f luks -o iter-time=10,key-secret=sec0 \
    --object secret,id=sec0,file="$PASSFILE" "$IMG" "$DISK_BYTES" ||
    die "qemu-img create -f luks failed"
  local dump
  dump=$(cryptsetup luksDump "$IMG") || die "cryptsetup luksDump $IMG failed"
  field() { awk -F: -v k="$1" '$1 == k { gsub(/[ \t]/, "", $2); print $2; exit }' <<<"$dump"; }
  [ "$(field Version)" = 1 ] || die "expected a LUKS1 image, luksDump says version $(field Version)"
  [ "$(field 'Cipher name')-$(field 'Cipher mode')" = aes-xts-plain64 ] ||
    die "expected aes-xts-plain64, luksDump says $(field 'Cipher name')-$(field 'Cipher mode')"
  [ "$(field 'MK bits')" = 512 ] || die "expected a 512-bit volume key, luksDump says $(field 'MK bits')"
  PAYLOAD=$(field 'Payload offset')
  [[ "$PAYLOAD" =~ ^[0-9]+$ ]] || die "no payload offset in luksDump output"
  (umask 077 && cryptsetup luksDump --dump-volume-key --volume-key-file "$KEYFILE" \
    --batch-mode --key-file "$PASSFILE" "$IMG" >/dev/null) ||
    die "cryptsetup could not dump the volume key"
  [ "$(stat -c %s "$KEYFILE")" = 64 ] || die "volume key file is not 64 bytes"
  [ "$(stat -c %s "$IMG")" = $((DISK_BYTES + PAYLOAD * 512)) ] ||
    die "image size $(stat -c %s "$IMG") != payload offset + $DISK_BYTES"
}

# The guest's payload: the test, its parameters, the raw patterns and the tree
# it copies onto the filesystem (the host keeps the same files to compare).
make_guest_data() {
  local e2e=$1/e2e i
  install -m 755 "$INTEGRATION_DIR/guest/test.sh" "$e2e/test.sh"
  cat >"$e2e/conf" <<EOF
RUNID=$RUNID
DISK_BYTES=$DISK_BYTES
QUEUES=$QUEUES
FS_BYTES=$FS_BYTES
PAT_A_OFF=$PAT_A_OFF
PAT_A_LEN=$PAT_A_LEN
PAT_B_OFF=$PAT_B_OFF
PAT_B_LEN=$PAT_B_LEN
REF_SERIAL=$REF_SERIAL
FORMAT=$FORMAT
PAYLOAD_SECTORS=$PAYLOAD
EOF
  install -m 600 "$KEYFILE" "$e2e/volume.key"
  [ "$FORMAT" != luks1 ] || install -m 600 "$PASSFILE" "$e2e/passphrase"
  gen_pattern A "$PAT_A_OFF" "$PAT_A_LEN" >"$RUN/pat-a"
  gen_pattern B "$PAT_B_OFF" "$PAT_B_LEN" >"$RUN/pat-b"
  cp "$RUN/pat-a" "$RUN/pat-b" "$e2e/"
  rm -rf "$RUN/fs-src"
  mkdir -p "$RUN/fs-src/small/deeper"
  # A file whose length is not a multiple of any block size.
  gen_pattern F 0 $((3 << 20)) | head -c $(((3 << 20) - 100)) >"$RUN/fs-src/big.bin"
  echo "$MARKER hello from the host" >"$RUN/fs-src/hello.txt"
  for i in $(seq 1 64); do
    echo "$MARKER small file $i" >"$RUN/fs-src/small/f$i"
  done
  gen_pattern D 0 $((64 << 10)) >"$RUN/fs-src/small/deeper/d.bin"
  cp -a "$RUN/fs-src" "$e2e/fs-src"
}

resolve_cryptblk() {
  if [ -n "${CRYPTBLK:-}" ]; then
    [ -x "$CRYPTBLK" ] || die "CRYPTBLK=$CRYPTBLK is not an executable"
  else
    need_tools cargo
    local flag=()
    [ "$E2E_PROFILE" = debug ] || flag=(--profile "$E2E_PROFILE")
    log "building cryptblk ($E2E_PROFILE)"
    (cd "$REPO_DIR" && cargo build --quiet --bin cryptblk "${flag[@]}") || die "cargo build failed"
    CRYPTBLK=${CARGO_TARGET_DIR:-$REPO_DIR/target}/$E2E_PROFILE/cryptblk
  fi
  "$CRYPTBLK" serve --help >/dev/null 2>&1 ||
    die "$CRYPTBLK has no 'serve' subcommand (yet?); BACKEND=qsd runs the test against qemu-storage-daemon"
}

start_backend() {
  rm -f "$SOCK"
  case $BACKEND in
    cryptblk)
      RUST_LOG=${RUST_LOG:-info} "$CRYPTBLK" serve --socket "$SOCK" --type plain --image "$IMG" --key-file "$KEYFILE" --key-size 512 \
        --offset "$PAYLOAD" --queues "$QUEUES" >"$BACKEND_LOG" 2>&1 &
      ;;
    qsd)
      [ "$FORMAT" = luks1 ] || die "BACKEND=qsd serves only LUKS1 images"
      qemu-storage-daemon \
        --object secret,id=sec0,file="$PASSFILE" \
        --blockdev driver=file,node-name=file0,filename="$IMG" \
        --blockdev driver=luks,node-name=luks0,file=file0,key-secret=sec0 \
        --export type=vhost-user-blk,id=exp0,node-name=luks0,writable=on,num-queues="$QUEUES",addr.type=unix,addr.path="$SOCK" \
        >"$BACKEND_LOG" 2>&1 &
      ;;
    plaintext)
      # Stores the guest's data unencrypted where the LUKS payload belongs:
      # every check that looks at the ciphertext must catch it.
      qemu-storage-daemon \
        --blockdev driver=file,node-name=file0,filename="$IMG" \
        --blockdev driver=raw,node-name=raw0,file=file0,offset=$((PAYLOAD * 512)),size="$DISK_BYTES" \
        --export type=vhost-user-blk,id=exp0,node-name=raw0,writable=on,num-queues="$QUEUES",addr.type=unix,addr.path="$SOCK" \
        >"$BACKEND_LOG" 2>&1 &
      ;;
    *) die "unknown BACKEND=$BACKEND (cryptblk, qsd or plaintext)" ;;
  esac
  backend_pid=$!
  local i
  for i in $(seq 100); do
    [ -S "$SOCK" ] && return 0
    kill -0 "$backend_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$BACKEND_LOG" >&2
  die "$BACKEND did not create its socket $SOCK"
}

# Stops the backend once the guest is gone (it may already have exited when the
# frontend disconnected): SIGTERM must make it exit cleanly and promptly.
stop_backend() {
  local i rc=0
  if kill -0 "$backend_pid" 2>/dev/null; then
    kill -TERM "$backend_pid"
    for i in $(seq 100); do
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
  # 143: ended by the SIGTERM we sent, without handling it.
  [ "$rc" = 0 ] || [ "$rc" = 143 ] || {
    tail -20 "$BACKEND_LOG" >&2
    die "$BACKEND exited with status $rc"
  }
  BACKEND_EXIT=$rc
}

qemu_accel() {
  if { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; } && [ -w /dev/kvm ]; then
    echo "-accel kvm -cpu host"
  else
    # /dev/kvm may be a paravirtual hypervisor that Debian's kernel dies under.
    echo "-accel tcg,thread=multi -cpu max"
  fi
}

run_guest() {
  local accel rc=0
  accel=$(qemu_accel)
  local cmdline_extra=quiet
  [ "${E2E_DEBUG:-0}" = 0 ] || cmdline_extra=e2edebug
  log "booting the guest ($accel, $CPUS vCPUs, $QUEUES queues, timeout ${TIMEOUT}s)"
  # shellcheck disable=SC2086 # $accel is a list of options
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot \
    $accel -machine q35,memory-backend=mem -m "$MEM" -smp "$CPUS" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -kernel "$GUEST_VMLINUX" -initrd "$RUN/initramfs.cpio" \
    -append "console=ttyS0 rdinit=/init panic=-1 mitigations=off $cmdline_extra" \
    -serial file:"$SERIAL" \
    -chardev socket,id=vhost0,path="$SOCK" \
    -device vhost-user-blk-pci,chardev=vhost0,num-queues="$QUEUES" \
    -drive if=none,id=ref,file="$IMG",format=raw,readonly=on,file.locking=off \
    -device virtio-blk-pci,drive=ref,serial="$REF_SERIAL",num-queues=1 \
    >"$RUN/qemu.log" 2>&1 &
  qemu_pid=$!
  wait "$qemu_pid" || rc=$?
  qemu_pid=
  case $rc in
    0) ;;
    124 | 137) guest_failed "QEMU killed after the ${TIMEOUT}s timeout" ;;
    *) guest_failed "QEMU exited with status $rc: $(tr '\n' ' ' <"$RUN/qemu.log")" ;;
  esac
}

guest_failed() {
  echo "---- last lines of the guest console ($SERIAL) ----" >&2
  tail -30 "$SERIAL" >&2 || true
  echo "---- last lines of the backend log ($BACKEND_LOG) ----" >&2
  tail -10 "$BACKEND_LOG" >&2 || true
  die "$1"
}

# Every expected check must report PASS, between both markers.
check_guest_results() {
  local log=$RUN/serial.txt name
  tr -d '\r' <"$SERIAL" >"$log"
  grep -q '^E2E-RESULTS-BEGIN' "$log" || guest_failed "the guest never reached its init script"
  grep -q '^E2E-RESULTS-END' "$log" || guest_failed "the guest did not finish its checks"
  grep '^E2E-INFO' "$log" | sed 's/^E2E-INFO /  guest: /' >&2 || true
  GUEST_FAILS=$(grep '^E2E-RESULT FAIL' "$log" || true)
  for name in $EXPECTED_RESULTS; do
    grep -q "^E2E-RESULT PASS $name\$" "$log" ||
      grep -q "^E2E-RESULT FAIL $name" "$log" ||
      GUEST_FAILS+=$'\n'"E2E-RESULT FAIL $name (never reported)"
  done
  GUEST_PASSES=$(grep -c '^E2E-RESULT PASS' "$log" || true)
  BOOT_S=$(sed -n 's/^E2E-BOOTED uptime=//p' "$log")
  END_S=$(sed -n 's/^E2E-RESULTS-END uptime=//p' "$log")
}

# The host's own view of the image after the guest and backend are gone.
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
plaintext_in_decrypted() { [ "$(grep -aFc "$MARKER" "$RUN/out.raw" || true)" -gt 0 ]; }
decrypted_region() { cmp -s -n "$2" -i "$1:0" "$RUN/out.raw" "$3"; }
decrypted_fsck() { e2fsck -f -n "$RUN/out.raw" >"$RUN/host-fsck.log" 2>&1; }
decrypted_files() {
  rm -rf "$RUN/fs-dump"
  mkdir -p "$RUN/fs-dump"
  debugfs -R "rdump /e2e $RUN/fs-dump" "$RUN/out.raw" >"$RUN/debugfs.log" 2>&1 &&
    diff -r "$RUN/fs-src" "$RUN/fs-dump/e2e" >"$RUN/fs-diff.log" 2>&1
}

host_checks() {
  host_check image-has-no-plaintext no_plaintext_in_image
  # qemu-img reads only LUKS; for plain images the guest's dm-crypt is the oracle.
  [ "$FORMAT" = luks1 ] || return 0
  qemu-img convert --object secret,id=sec0,file="$PASSFILE" \
    --image-opts driver=luks,key-secret=sec0,file.filename="$IMG" -O raw "$RUN/out.raw" ||
    die "qemu-img could not decrypt $IMG"
  host_check qemu-img-sees-plaintext plaintext_in_decrypted
  host_check qemu-img-pattern-a decrypted_region "$PAT_A_OFF" "$PAT_A_LEN" "$RUN/pat-a"
  host_check qemu-img-pattern-b decrypted_region "$PAT_B_OFF" "$PAT_B_LEN" "$RUN/pat-b"
  host_check qemu-img-fsck decrypted_fsck
  host_check qemu-img-files decrypted_files
}

main() {
  local t_start t_kernel0 t_kernel t_boot t_guest t_end
  t_start=$(now)
  check_tools
  [ "$BACKEND" != cryptblk ] || resolve_cryptblk
  rm -rf "$RUN"
  mkdir -p "$RUN"
  t_kernel0=$(now)
  guest_kernel_prepare
  t_kernel=$(now)
  make_image
  guest_initramfs_stage "$RUN/initramfs"
  make_guest_data "$RUN/initramfs"
  guest_initramfs_pack "$RUN/initramfs" "$RUN/initramfs.cpio"
  log "$FORMAT image $IMG, payload offset $PAYLOAD sectors; initramfs $(($(stat -c %s "$RUN/initramfs.cpio") >> 20)) MiB"
  start_backend
  t_boot=$(now)
  run_guest
  t_guest=$(now)
  stop_backend
  check_guest_results
  host_checks
  t_end=$(now)

  echo "==== e2e-qemu summary (backend $BACKEND, $FORMAT image, guest kernel $GUEST_KVER) ===="
  # shellcheck disable=SC2086 # counting words
  echo "guest checks passed: $GUEST_PASSES of $(set -- $EXPECTED_RESULTS && echo $#); host checks failed: ${HOST_FAILS:-none}"
  echo "times: guest kernel $(elapsed "$t_kernel0" "$t_kernel") s, guest run $(elapsed "$t_boot" "$t_guest") s" \
    "(init reached at ${BOOT_S:-?} s guest uptime, checks done at ${END_S:-?} s), total $(elapsed "$t_start" "$t_end") s"
  echo "backend exit status: $BACKEND_EXIT; logs in $RUN"
  if [ -n "$GUEST_FAILS" ] || [ -n "$HOST_FAILS" ]; then
    [ -z "$GUEST_FAILS" ] || printf '%s\n' "$GUEST_FAILS" | sed '/^$/d; s/^/  guest: /'
    die "end-to-end test failed"
  fi
  echo "PASS"
}

main "$@"
