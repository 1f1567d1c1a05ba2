#!/usr/bin/env bash
# Where should crypto run, and should the cipher do the copy? Measures
# cryptblk against itself with `cryptblk bench` (release build, libblkio
# client) and prints markdown tables with ratios.
#
# Targets (one daemon each, all serving the same prefilled image):
#   none        --cipher none (plaintext baseline), inline
#   inline      --crypto inline
#   workers1    --crypto workers --workers 1
#   workers2    --crypto workers --workers 2
#   none-pread, inline-pread: the same with --io pread (the others use
#               --io mmap), run on the 4K QD32 and 1M workloads only
# Workloads: 4K randread QD1 and QD32, 4K randwrite QD32, 128K seq read and
# write QD8, 1M seq read and write QD4 (QD is per queue), each with 1 and 2
# queues (daemon --queues = bench --queues).
#
# Noise: every (workload, queue count) runs all targets back to back, in a
# rotated order each round (A/B/C, B/C/A, ...), ROUNDS rounds, and the table
# shows medians. The image is in the host page cache: this measures CPU and
# memory paths, not the disk.
#
# Knobs (environment): SIZE=1G RUNTIME=3 (s per run) ROUNDS=3
# QUEUE_COUNTS="1 2" TARGETS="none inline workers1 workers2 none-pread
# inline-pread" SPLIT= (--split-threshold for workers, default the
# daemon's) KEEP=1 (keep the work dir with results.tsv). Needs jq.
set -euo pipefail

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-3}
ROUNDS=${ROUNDS:-3}
QUEUE_COUNTS=${QUEUE_COUNTS:-"1 2"}
TARGETS=${TARGETS:-"none inline workers1 workers2 none-pread inline-pread"}
SPLIT=${SPLIT:-}
WORKLOADS=(
  "4k-randread-qd1   --rw randread  --bs 4k   --iodepth 1"
  "4k-randread-qd32  --rw randread  --bs 4k   --iodepth 32"
  "4k-randwrite-qd32 --rw randwrite --bs 4k   --iodepth 32"
  "128k-read-qd8     --rw read      --bs 128k --iodepth 8"
  "128k-write-qd8    --rw write     --bs 128k --iodepth 8"
  "1m-read-qd4       --rw read      --bs 1m   --iodepth 4"
  "1m-write-qd4      --rw write     --bs 1m   --iodepth 4"
)
# The --io comparison runs only these.
IO_WORKLOADS=" 4k-randread-qd32 4k-randwrite-qd32 1m-read-qd4 1m-write-qd4 "

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_TAG=placement
# shellcheck source=integration/lib.sh
. "$ROOT/integration/lib.sh"
for tool in jq cargo; do
  command -v "$tool" >/dev/null || die "$tool not found: run integration/install-deps.sh"
done

build_release

WORK=$(mktemp -d /tmp/cryptblk-placement.XXXXXX)
declare -A PIDS=()
stop_all() {
  for t in "${!PIDS[@]}"; do kill "${PIDS[$t]}" 2>/dev/null || true; done
  for t in "${!PIDS[@]}"; do wait "${PIDS[$t]}" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_all; drop_work_dir' EXIT
umask 077
IMG=$WORK/image
head -c 64 /dev/urandom >"$WORK/key"
log "prefilling a $SIZE image (random bytes: no holes, all in the page cache)"
bytes=$(numfmt --from=iec "$SIZE")
head -c "$bytes" /dev/urandom >"$IMG"

target_args() { # target -> daemon options
  local io=mmap name=$1
  if [[ $name == *-pread ]]; then io=pread; name=${name%-pread}; fi
  local split=()
  [ -z "$SPLIT" ] || split=(--split-threshold "$SPLIT")
  case $name in
    none) echo --cipher none --crypto inline --io $io ;;
    inline) echo --key-file "$WORK/key" --crypto inline --io $io ;;
    workers1) echo --key-file "$WORK/key" --crypto workers --workers 1 --io $io "${split[@]}" ;;
    workers2) echo --key-file "$WORK/key" --crypto workers --workers 2 --io $io "${split[@]}" ;;
    *) die "unknown target $1" ;;
  esac
}

start_all() { # queues
  for t in $TARGETS; do
    local sock=$WORK/$t.sock
    # shellcheck disable=SC2046 # target_args is a word list on purpose
    "$BIN" serve --socket "$sock" --image "$IMG" --queues "$1" $(target_args "$t") \
      --log-level warn 2>>"$WORK/daemon.log" &
    PIDS[$t]=$!
  done
  for t in $TARGETS; do
    for _ in $(seq 200); do
      listening "$WORK/$t.sock" && continue 2
      kill -0 "${PIDS[$t]}" 2>/dev/null || die "$t exited early: $(tail -5 "$WORK/daemon.log")"
      sleep 0.05
    done
    die "$t did not listen on its socket within 10 s"
  done
}

runs_workload() { # target workload -> true if that pair is measured
  [[ $1 != *-pread ]] || [[ $IO_WORKLOADS == *" $2 "* ]]
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
read -r -a target_list <<<"$TARGETS"
for q in $QUEUE_COUNTS; do
  log "$q queue(s): starting ${#target_list[@]} daemons"
  start_all "$q"
  for round in $(seq "$ROUNDS"); do
    for workload in "${WORKLOADS[@]}"; do
      read -r name args <<<"$workload"
      n=${#target_list[@]}
      for i in $(seq 0 $((n - 1))); do
        t=${target_list[$(((i + round) % n))]}
        runs_workload "$t" "$name" || continue
        log "q$q round $round/$ROUNDS $name $t"
        # shellcheck disable=SC2086 # args is a word list on purpose
        "$BIN" bench --socket "$WORK/$t.sock" --queues "$q" --json --pid "${PIDS[$t]}" \
          $args --runtime "$RUNTIME" --seed "$round" >"$WORK/run.json" ||
          echo "   $name on $t reported errors: $(jq -c '.errors' "$WORK/run.json")" >&2
        jq -r --arg t "$t" --arg w "$name" --arg q "$q" \
          '[$q, $t, $w, .total.iops, .total.mib_per_sec, .total.latency_us.p50,
            .total.latency_us.p99, (.daemon_cpu.us_per_io // 0), (.errors | add // 0)] | @tsv' \
          "$WORK/run.json" >>"$RESULTS"
      done
    done
  done
  stop_all
done

# --- tables -------------------------------------------------------------------
median() { # queues target workload column
  awk -F'\t' -v q="$1" -v t="$2" -v w="$3" -v c="$4" '$1 == q && $2 == t && $3 == w {print $c}' "$RESULTS" |
    sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
# Throughput of a cell: kIOPS for 4K rows, MiB/s otherwise.
thr() { # queues target workload
  if [[ $3 == 4k-* ]]; then
    awk -v v="$(median "$1" "$2" "$3" 4)" 'BEGIN {if (v == "nan") print "-"; else printf "%.0fk", v / 1000}'
  else
    awk -v v="$(median "$1" "$2" "$3" 5)" 'BEGIN {if (v == "nan") print "-"; else printf "%.0f", v}'
  fi
}
val() { # queues target workload -> raw throughput number (IOPS or MiB/s)
  local col=5
  [[ $3 == 4k-* ]] && col=4
  median "$1" "$2" "$3" $col
}
main_targets=()
for t in none inline workers1 workers2; do has "$t" && main_targets+=("$t"); done

echo
echo "### cryptblk placement: $SIZE image in the page cache, --io mmap, ${RUNTIME}s runs, median of $ROUNDS rounds (rotated order)"
echo
echo "Throughput: 4K rows in IOPS (k = 1000), other rows in MiB/s."
echo
printf '| workload | Q |'
for t in "${main_targets[@]}"; do printf ' %s |' "$t"; done
printf ' inline/none | workers1/inline | workers2/inline |\n'
printf '|---|---|'
for _ in "${main_targets[@]}"; do printf -- '---:|'; done
printf -- '---:|---:|---:|\n'
for q in $QUEUE_COUNTS; do
  for workload in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$workload"
    printf '| %s | %s |' "$name" "$q"
    for t in "${main_targets[@]}"; do printf ' %s |' "$(thr "$q" "$t" "$name")"; done
    inl=$(val "$q" inline "$name")
    printf ' %s | %s | %s |\n' "$(ratio "$inl" "$(val "$q" none "$name")")" \
      "$(ratio "$(val "$q" workers1 "$name")" "$inl")" "$(ratio "$(val "$q" workers2 "$name")" "$inl")"
  done
done

echo
echo "Latency p50 / p99 (us) and daemon CPU time per I/O (us), as p50/p99/cpu:"
echo
printf '| workload | Q |'
for t in "${main_targets[@]}"; do printf ' %s |' "$t"; done
printf '\n|---|---|'
for _ in "${main_targets[@]}"; do printf -- '---:|'; done
echo
for q in $QUEUE_COUNTS; do
  for workload in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$workload"
    printf '| %s | %s |' "$name" "$q"
    for t in "${main_targets[@]}"; do
      printf ' %s |' "$(awk -v a="$(median "$q" "$t" "$name" 6)" -v b="$(median "$q" "$t" "$name" 7)" \
        -v c="$(median "$q" "$t" "$name" 8)" 'BEGIN {if (a == "nan") print "-"; else printf "%.0f/%.0f/%.2f", a, b, c}')"
    done
    echo
  done
done

if has none-pread || has inline-pread; then
  echo
  echo "--io pread vs --io mmap (throughput as above; cpu = daemon CPU us per I/O):"
  echo
  echo '| workload | Q | none pread | none mmap | mmap/pread | inline pread | inline mmap | mmap/pread | cpu inline pread/mmap |'
  echo '|---|---|---:|---:|---:|---:|---:|---:|---:|'
  for q in $QUEUE_COUNTS; do
    for workload in "${WORKLOADS[@]}"; do
      read -r name _ <<<"$workload"
      [[ $IO_WORKLOADS == *" $name "* ]] || continue
      printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$q" \
        "$(thr "$q" none-pread "$name")" "$(thr "$q" none "$name")" \
        "$(ratio "$(val "$q" none "$name")" "$(val "$q" none-pread "$name")")" \
        "$(thr "$q" inline-pread "$name")" "$(thr "$q" inline "$name")" \
        "$(ratio "$(val "$q" inline "$name")" "$(val "$q" inline-pread "$name")")" \
        "$(awk -v a="$(median "$q" inline-pread "$name" 8)" -v b="$(median "$q" inline "$name" 8)" \
          'BEGIN {if (a == "nan" || b == "nan") print "-"; else printf "%.2f/%.2f", a, b}')"
    done
  done
fi
errors=$(awk -F'\t' '{s += $9} END {print s + 0}' "$RESULTS")
[ "$errors" -eq 0 ] || echo "WARNING: $errors requests failed during the runs (KEEP=1 keeps $RESULTS)"
