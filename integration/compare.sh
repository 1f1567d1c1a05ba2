#!/usr/bin/env bash
# Compares cryptblk with qemu-storage-daemon on this machine: one LUKS1 image
# made by qemu-img, served four ways, each driven by `cryptblk bench` (release
# build, libblkio client, 2 queues) with the same workloads:
#   qsd-luks       QSD's luks driver (the reference encrypted backend)
#   qsd-raw        QSD raw over the same payload (plaintext baseline)
#   cryptblk-xts   cryptblk plain mode: --offset = payload offset, volume key
#   cryptblk-none  cryptblk --cipher none over the same payload (plaintext baseline)
#   cryptblk-workers  cryptblk-xts with --crypto workers
#   cryptblk-sync  cryptblk-xts with --aio sync (one request at a time per queue)
#   cryptblk-pread cryptblk-xts with --io pread (buffered io_uring instead of the
#                  page-cache mapping; without DIRECT only)
#   fio            fio (io_uring, one job per queue) on the same payload bytes:
#                  what the disk gives without any vhost-user server
# Targets run A/B/A/B (every target once per round, ROUNDS rounds) and medians
# are reported. Before measuring, the payload is written with a pattern through
# QSD's luks driver and read back through every encrypted target: the
# comparison is void unless both decrypt the same image to the same data.
#
# Knobs (environment): SIZE=1G RUNTIME=5 (s per run) ROUNDS=3 QUEUES=2
# TARGETS="qsd-luks qsd-raw cryptblk-xts cryptblk-none" CRYPTO=inline|workers
# DIRECT=1 (every server bypasses the host page cache: QSD with
# cache.direct=on,aio=io_uring, cryptblk with --direct, fio with direct=1;
# the image lives in WORK_PARENT, default /var/tmp, which must be a disk, not
# tmpfs) QD1=1 (add 4K QD1 workloads) KEEP=1 (keep the work dir).
# Needs qemu-img, qemu-storage-daemon, cryptsetup, jq (and fio for the fio
# target): integration/install-deps.sh installs them. Without DIRECT both
# servers use the host page cache, so this measures CPU paths, not the disk.
set -euo pipefail

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
QUEUES=${QUEUES:-2}
TARGETS=${TARGETS:-"qsd-luks qsd-raw cryptblk-xts cryptblk-none"}
CRYPTO=${CRYPTO:-}
DIRECT=${DIRECT:-}
SEED=4242

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_TAG=compare
# shellcheck source=integration/lib.sh
. "$ROOT/integration/lib.sh"
bench_workloads

for tool in qemu-img qemu-storage-daemon cryptsetup jq cargo; do
  command -v "$tool" >/dev/null || die "$tool not found: run integration/install-deps.sh"
done
[[ " $TARGETS " != *" fio "* ]] || need_tools fio

build_release
if [[ " $TARGETS " == *" cryptblk-"* ]] && ! "$BIN" serve --help >/dev/null 2>&1; then
  die "this build has no 'cryptblk serve'; run with TARGETS='qsd-luks qsd-raw' to compare QSD only"
fi

if [ -n "$DIRECT" ]; then
  WORK=$(mktemp -d "${WORK_PARENT:-/var/tmp}/cryptblk-compare.XXXXXX")
  [ "$(stat -f -c %T "$WORK")" != tmpfs ] || die "$WORK is on tmpfs: O_DIRECT needs a disk (set WORK_PARENT)"
else
  WORK=$(mktemp -d /tmp/cryptblk-compare.XXXXXX)
fi
PID=
trap end_comparison EXIT
umask 077
IMG=$WORK/image.luks

# --- the image, its payload offset and its volume key -------------------------
log "creating a $SIZE LUKS1 image with qemu-img"
luks1_image "$IMG" "$SIZE"

# --- targets ------------------------------------------------------------------
start_target() { # name
  SOCK=$WORK/$1.sock
  rm -f "$SOCK"
  local file0="driver=file,filename=$IMG,node-name=file0"
  local crypto=() plain=(--type plain --image "$IMG" --key-file "$WORK/volume.key" --key-size 512
    --offset "$PAYLOAD" --queues "$QUEUES")
  [ -z "$CRYPTO" ] || crypto=(--crypto "$CRYPTO")
  if [ -n "$DIRECT" ]; then
    file0+=",cache.direct=on,aio=io_uring"
    plain+=(--direct)
  fi
  case $1 in
    fio)
      PID=
      return 0
      ;;
    qsd-luks)
      qemu-storage-daemon --object "secret,id=sec0,file=$WORK/passphrase" --blockdev "$file0" \
        --blockdev driver=luks,file=file0,key-secret=sec0,node-name=luks0 \
        --export "$(qsd_export luks0)" 2>>"$WORK/daemon.log" &
      ;;
    qsd-raw)
      qemu-storage-daemon --blockdev "$file0" \
        --blockdev "driver=raw,file=file0,offset=$((PAYLOAD * 512)),node-name=raw0" \
        --export "$(qsd_export raw0)" 2>>"$WORK/daemon.log" &
      ;;
    cryptblk-xts)
      "$BIN" serve --socket "$SOCK" "${plain[@]}" --cipher aes-xts-plain64 "${crypto[@]}" \
        2>>"$WORK/daemon.log" &
      ;;
    cryptblk-workers)
      "$BIN" serve --socket "$SOCK" "${plain[@]}" --cipher aes-xts-plain64 --crypto workers \
        2>>"$WORK/daemon.log" &
      ;;
    cryptblk-sync)
      "$BIN" serve --socket "$SOCK" "${plain[@]}" --cipher aes-xts-plain64 --aio sync "${crypto[@]}" \
        2>>"$WORK/daemon.log" &
      ;;
    cryptblk-pread)
      "$BIN" serve --socket "$SOCK" "${plain[@]}" --cipher aes-xts-plain64 --io pread "${crypto[@]}" \
        2>>"$WORK/daemon.log" &
      ;;
    cryptblk-none)
      "$BIN" serve --socket "$SOCK" "${plain[@]}" --cipher none "${crypto[@]}" \
        2>>"$WORK/daemon.log" &
      ;;
    *) die "unknown target $1" ;;
  esac
  PID=$!
  wait_listening "$1"
}

# One fio run on the payload bytes with a workload's bench arguments, as one
# TSV row (the columns the bench rows have; fio has no daemon CPU).
fio_row() { # target workload args...
  local target=$1 name=$2 rw bs depth runtime
  shift 2
  while [ $# -gt 0 ]; do
    case $1 in
      --rw) rw=$2 ;; --bs) bs=$2 ;; --iodepth) depth=$2 ;; --runtime) runtime=$2 ;;
    esac
    shift 2
  done
  local dir=read
  [[ $rw == *write ]] && dir=write
  # Each job gets its own slice of the payload, as each bench queue does
  # (the disk's first reads of a cold region are slow: compare like with like).
  local slice=$(($(numfmt --from=iec "$SIZE") / QUEUES / 1048576))M
  fio --name=limit --filename="$IMG" --offset=$((PAYLOAD * 512)) --size="$slice" \
    --offset_increment="$slice" \
    --rw="$rw" --bs="$bs" --iodepth="$depth" --numjobs="$QUEUES" --group_reporting \
    --ioengine=io_uring --direct="${DIRECT:-0}" --time_based --runtime="$runtime" \
    --output-format=json >"$WORK/fio.json" 2>>"$WORK/daemon.log" || die "fio failed"
  jq -r --arg t "$target" --arg w "$name" --arg d "$dir" \
    '.jobs[0][$d] | [$t, $w, .iops, (.bw_bytes / 1048576), (.clat_ns.percentile["99.000000"] / 1000),
      0, 0] | @tsv' "$WORK/fio.json"
}

# --- cross-check: every encrypted target reads what QSD's luks driver wrote ----
log "writing a pattern through qsd-luks"
start_target qsd-luks
bench --rw write --bs 1m --iodepth 4 --seed "$SEED" --verify >"$WORK/fill.json" ||
  die "pattern write through qsd-luks failed: $(jq -c '.errors, .verify.mismatches' "$WORK/fill.json")"
stop_target
for target in $TARGETS; do
  case $target in qsd-luks | cryptblk-xts | cryptblk-workers | cryptblk-sync | cryptblk-pread) ;; *) continue ;; esac
  log "reading it back through $target"
  start_target "$target"
  bench --verify-only --bs 1m --iodepth 4 --seed "$SEED" >"$WORK/check.json" ||
    die "$target does not read back what qsd-luks wrote: $(jq -c '.verify' "$WORK/check.json")"
  stop_target
done

# --- A/B/A/B rounds -----------------------------------------------------------
RESULTS=$WORK/results.tsv
: >"$RESULTS"
for round in $(seq "$ROUNDS"); do
  for target in $TARGETS; do
    log "round $round/$ROUNDS: $target"
    start_target "$target"
    for workload in "${WORKLOADS[@]}"; do
      read -r name args <<<"$workload"
      if [ "$target" = fio ]; then
        # shellcheck disable=SC2086 # args is a word list on purpose
        fio_row fio "$name" $args --runtime "$RUNTIME" >>"$RESULTS"
        continue
      fi
      # shellcheck disable=SC2086 # args is a word list on purpose
      bench_row "$target" "$name" $args --runtime "$RUNTIME" --seed "$round"
    done
    stop_target
  done
done

# --- medians and ratios -------------------------------------------------------
echo
echo "cryptblk vs qemu-storage-daemon: $SIZE LUKS1 image, $QUEUES queues, ${RUNTIME}s runs," \
  "median of $ROUNDS rounds (A/B/A/B), client: cryptblk bench (libblkio)," \
  "$([ -n "$DIRECT" ] && echo O_DIRECT || echo 'page cache'), $(lscpu | sed -n 's/^Model name: *//p')"
pairs=()
has cryptblk-xts && has cryptblk-none && pairs+=("cryptblk-xts cryptblk-none xts/none")
has qsd-luks && has qsd-raw && pairs+=("qsd-luks qsd-raw luks/raw")
has cryptblk-xts && has qsd-luks && pairs+=("cryptblk-xts qsd-luks xts/qsdluks")
has cryptblk-xts && has fio && pairs+=("cryptblk-xts fio xts/fio")
has cryptblk-workers && has fio && pairs+=("cryptblk-workers fio wrk/fio")
has cryptblk-workers && has cryptblk-xts && pairs+=("cryptblk-workers cryptblk-xts wrk/inline")
has cryptblk-pread && has cryptblk-xts && pairs+=("cryptblk-pread cryptblk-xts pread/mmap")
has cryptblk-none && has qsd-raw && pairs+=("cryptblk-none qsd-raw none/qsdraw")
# How close any vhost-user backend gets to the disk here: QSD's plaintext
# export over the same client path, against fio in the same process.
has qsd-raw && has fio && pairs+=("qsd-raw fio qsdraw/fio")
results_table "" "${pairs[@]}"
warn_failed_requests
