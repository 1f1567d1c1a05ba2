# Shared helpers for the integration scripts (sourced, not run): logging,
# failing loudly, tool checks and the cache directory.
# shellcheck shell=bash

INTEGRATION_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_DIR=$(dirname "$INTEGRATION_DIR")
# Everything downloaded or built lives here (gitignored) and is reused between runs.
WORK_DIR=${WORK_DIR:-$INTEGRATION_DIR/work}

log() { printf '[%s] %s\n' "${LOG_TAG:-integration}" "$*" >&2; }

die() {
  printf '[%s] FAIL: %s\n' "${LOG_TAG:-integration}" "$*" >&2
  exit 1
}

# Fails (never skips) when a tool is missing, naming the script that installs it.
need_tools() {
  local t missing=()
  for t in "$@"; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] ||
    die "missing tools: ${missing[*]} (run: sudo bash integration/install-deps.sh)"
}

# listening PATH: a socket listens on PATH. Its file appears at bind(2), a
# moment before listen(2), and a frontend that connects in between is refused
# (QEMU then gives up); the kernel flags listening sockets in /proc/net/unix
# (__SO_ACCEPTCON, 00010000). As crates/bench/src/listening.rs does.
# The path is what follows the seven columns, and may hold spaces.
listening() {
  awk -v p="$1" '$4 == "00010000" {
      path = $0
      sub(/^[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ +[^ ]+ /, "", path)
      if (path == p) found = 1
    } END { exit !found }' /proc/net/unix
}

# tcp_listening PORT: something listens on 127.0.0.1:PORT (a probing
# connection would be a client of the server's).
tcp_listening() {
  awk -v p="$(printf ':%04X' "$1")" '$2 ~ p "$" && $4 == "0A" { found = 1 } END { exit !found }' \
    /proc/net/tcp
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Seconds since the epoch with millisecond precision, for timings.
now() { date +%s.%3N; }

# Elapsed seconds between two now() values, one decimal.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# seed_corpus TARGET DIR: the fuzz target's seeds into DIR: valid requests of
# each type (generated) or real LUKS headers.
seed_corpus() {
  mkdir -p "$2"
  case $1 in
    parse | complete | chain) python3 "$REPO_DIR/fuzz/seeds/make_seeds.py" "$2" >/dev/null ;;
    luks_header) cp "$REPO_DIR"/fuzz/seeds/luks_header/* "$2/" ;;
    *) die "no seeds known for fuzz target $1" ;;
  esac
}

# has TARGET: whether the space-separated $TARGETS names TARGET (the
# comparison scripts' target selection).
has() { [[ " ${TARGETS:-} " == *" $1 "* ]]; }

# drop_work_dir: removes $WORK, or keeps it (and says where) with KEEP=1.
drop_work_dir() {
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}

# --- the comparison scripts (compare.sh, nbd.sh) ------------------------------
# They share: WORK (their work dir), BIN (the release cryptblk), QUEUES, SOCK
# (the vhost-user socket of the target being measured) and PID (its process),
# RESULTS (a TSV file: target, workload, IOPS, MiB/s, p99 us, daemon CPU us per
# I/O, errors) and TARGETS.

# The workloads every comparison runs (name, then `cryptblk bench` arguments);
# QD1=1 adds the 4K QD1 pair.
bench_workloads() {
  WORKLOADS=(
    "4k-randread  --rw randread  --bs 4k --iodepth 32"
    "4k-randwrite --rw randwrite --bs 4k --iodepth 32"
    "1m-read      --rw read      --bs 1m --iodepth 4"
    "1m-write     --rw write     --bs 1m --iodepth 4"
  )
  if [ -n "${QD1:-}" ]; then
    WORKLOADS+=(
      "4k-randr-qd1 --rw randread  --bs 4k --iodepth 1"
      "4k-randw-qd1 --rw randwrite --bs 4k --iodepth 1"
    )
  fi
}

# Builds the release binary and sets BIN.
build_release() {
  need_tools cargo
  log "building cryptblk (release)"
  (cd "$REPO_DIR" && cargo build --release --quiet --bin cryptblk) || die "cargo build --release failed"
  BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/cryptblk
}

# luks1_image IMG SIZE [ALIGN]: a LUKS1 image made by qemu-img (aes-xts-plain64,
# 512-bit key) with a random passphrase in $WORK/passphrase; writes its volume
# key to $WORK/volume.key (from cryptsetup's stdout, never through argv) and
# sets PAYLOAD, its payload offset in 512-byte sectors. With ALIGN (sectors),
# cryptsetup makes it instead, its payload at ALIGN (qemu-img cannot choose:
# it puts the payload 4040 sectors in). Run under umask 077.
luks1_image() {
  local img=$1 hex
  head -c 24 /dev/urandom | base64 | tr -d '\n' >"$WORK/passphrase"
  if [ -n "${3:-}" ]; then
    truncate -s "$2" "$img" && truncate -s "+$(($3 * 512))" "$img" &&
      cryptsetup luksFormat --batch-mode --type luks1 --cipher aes-xts-plain64 --key-size 512 \
        --hash sha256 --pbkdf-force-iterations 1000 --align-payload "$3" \
        --key-file "$WORK/passphrase" "$img" || die "cryptsetup luksFormat failed"
  else
    qemu-img create -q -f luks --object "secret,id=sec0,file=$WORK/passphrase" \
      -o key-secret=sec0,iter-time=10 "$img" "$2" || die "qemu-img create -f luks failed"
  fi
  PAYLOAD=$(cryptsetup luksDump "$img" | awk '/^Payload offset:/ {print $3}')
  [[ "$PAYLOAD" =~ ^[0-9]+$ ]] || die "cannot read the payload offset of $img"
  hex=$(cryptsetup luksDump --batch-mode --dump-volume-key --key-file "$WORK/passphrase" "$img" |
    sed -n '/MK dump:/,$p' | sed 's/.*MK dump://' | grep -oE '\b[0-9a-f]{2}\b' | tr -d '\n' || true)
  [ ${#hex} -eq 128 ] || die "expected a 512-bit volume key from cryptsetup luksDump"
  printf '%b' "$(sed 's/../\\x&/g' <<<"$hex")" >"$WORK/volume.key"
  log "$img: payload offset $PAYLOAD sectors, aes-xts-plain64, 512-bit key"
}

# qsd_export NODE: qemu-storage-daemon's --export of NODE on $SOCK.
qsd_export() {
  echo "type=vhost-user-blk,id=exp0,node-name=$1,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=$QUEUES"
}

# wait_listening NAME [SECONDS]: the target just started (PID) listens on SOCK
# within SECONDS (default 10).
wait_listening() {
  local _ limit=${2:-10}
  for _ in $(seq $((limit * 20))); do
    listening "$SOCK" && return 0
    kill -0 "$PID" 2>/dev/null || {
      PID=
      die "$1 exited early: $(tail -5 "$WORK/daemon.log")"
    }
    sleep 0.05
  done
  die "$1 did not listen on its socket within $limit s"
}

# ab_rounds PREFIX START: ROUNDS rounds over TARGETS (A/B/A/B), each target
# started with `START TARGET`, measured on every workload of WORKLOADS into
# bench rows labelled PREFIX followed by the target, then stopped. With
# REFILL set, each target first rewrites the whole device sequentially in 1M
# writes, so that every target starts from the same store state (see rbd.sh).
ab_rounds() {
  local prefix=$1 start=$2 round target workload name args
  for round in $(seq "$ROUNDS"); do
    for target in $TARGETS; do
      log "${prefix}round $round/$ROUNDS: $target"
      "$start" "$target"
      if [ -n "${REFILL:-}" ]; then
        bench --rw write --bs 1m --iodepth 4 --seed "$SEED" >"$WORK/refill.json" ||
          die "rewriting the device through $target failed: $(jq -c '.errors' "$WORK/refill.json")"
      fi
      for workload in "${WORKLOADS[@]}"; do
        read -r name args <<<"$workload"
        # shellcheck disable=SC2086 # args is a word list on purpose
        bench_row "$prefix$target" "$name" $args --runtime "$RUNTIME" --seed "$round"
      done
      stop_target
    done
  done
}

# --- the network-store comparisons (nbd.sh, rbd.sh) ---------------------------
# Both serve one LUKS1 image (PAYLOAD, $WORK/volume.key, $WORK/passphrase) on
# their store, and start their targets with a function of their own (START).

# start_store_target NAME NODE BLOCKDEV PLAIN...: starts in the background the
# targets both serve (the caller takes the PID from $!): cryptblk-xts and
# cryptblk-none (`cryptblk serve` on SOCK with PLAIN... and the cipher) and
# qsd-luks (QSD's luks driver on BLOCKDEV, its node NODE).
start_store_target() {
  local name=$1 node=$2 blockdev=$3
  shift 3
  case $name in
    cryptblk-xts)
      "$BIN" serve --socket "$SOCK" "$@" --cipher aes-xts-plain64 2>>"$WORK/daemon.log" &
      ;;
    cryptblk-none)
      "$BIN" serve --socket "$SOCK" "$@" --cipher none 2>>"$WORK/daemon.log" &
      ;;
    qsd-luks)
      qemu-storage-daemon --object "secret,id=sec0,file=$WORK/passphrase" --blockdev "$blockdev" \
        --blockdev "driver=luks,file=$node,key-secret=sec0,node-name=luks0" \
        --export "$(qsd_export luks0)" 2>>"$WORK/daemon.log" &
      ;;
    *) die "unknown target $name" ;;
  esac
}

# cross_check START WHAT [LABEL]: before measuring, a pattern is written
# through qsd-luks and read back through cryptblk-xts (each started with
# `START TARGET`): the figures are void unless both decrypt the same WHAT
# (export, image) to the same data. Without both, the first of TARGETS fills
# WHAT: every target still reads written data, not the holes a store answers
# without reading (nbdkit's memory plugin, librbd without the OSD). LABEL
# prefixes the log line.
cross_check() {
  local start=$1 what=$2 label=${3:-}
  if has qsd-luks && has cryptblk-xts; then
    log "${label}writing a pattern through qsd-luks, reading it back through cryptblk-xts"
    "$start" qsd-luks
    bench --rw write --bs 1m --iodepth 4 --seed "$SEED" --verify >"$WORK/fill.json" ||
      die "pattern write through qsd-luks failed: $(jq -c '.errors, .verify.mismatches' "$WORK/fill.json")"
    stop_target
    "$start" cryptblk-xts
    bench --verify-only --bs 1m --iodepth 4 --seed "$SEED" >"$WORK/check.json" ||
      die "cryptblk-xts does not read back what qsd-luks wrote: $(jq -c '.verify' "$WORK/check.json")"
    stop_target
  else
    "$start" "${TARGETS%% *}"
    bench --rw write --bs 1m --iodepth 4 --seed "$SEED" >"$WORK/fill.json" || die "filling the $what failed"
    stop_target
  fi
}

# cpu_model: the CPU's model name, for the report's header.
cpu_model() { sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1; }

# target_line LABEL A B MIN WORKLOAD...: whether A/B >= MIN in each workload,
# in each group of results of RESULT_GROUPS ("PREFIX [TAG]": the targets are
# named PREFIX<target> in RESULTS, their ratios shown as TAG<workload>).
target_line() {
  local label=$1 a=$2 b=$3 min=$4 group prefix tag name col r verdict=met detail=
  shift 4
  for group in "${RESULT_GROUPS[@]}"; do
    read -r prefix tag <<<"$group"
    for name in "$@"; do
      col=3
      [[ $name == 1m-* ]] && col=4
      # Three decimals: a ratio that rounds to the target is not always on it.
      r=$(awk -v x="$(median_of "$prefix$a" "$name" $col)" -v y="$(median_of "$prefix$b" "$name" $col)" \
        'BEGIN { if (x == "nan" || y == "nan" || y + 0 == 0) print "-"; else printf "%.3f", x / y }')
      detail+=" $tag$name=$r"
      awk -v r="$r" -v m="$min" 'BEGIN { exit !(r != "-" && r + 0 >= m) }' || verdict="NOT met"
    done
  done
  echo "$label: $verdict ($detail )"
}

# issue_targets ISSUE FACTOR: the store issue's targets, met or not, over
# RESULT_GROUPS: encrypted >= 0.9x plaintext in every workload, >= FACTOR x
# qsd-luks at 4K QD32 and 1M.
issue_targets() {
  local names=() workload
  echo
  echo "issue #$1's targets:"
  for workload in "${WORKLOADS[@]}"; do names+=("${workload%% *}"); done
  if has cryptblk-xts && has cryptblk-none; then
    target_line "encrypted >= 0.9x plaintext, every workload" cryptblk-xts cryptblk-none 0.9 "${names[@]}"
  fi
  if has cryptblk-xts && has qsd-luks; then
    target_line ">= $2x qsd-luks at 4K QD32 and 1M" cryptblk-xts qsd-luks "$2" \
      4k-randread 4k-randwrite 1m-read 1m-write
  fi
}

# warn_failed_requests: a warning when requests failed in the runs of RESULTS
# (their 7th column).
warn_failed_requests() {
  local errors
  errors=$(awk -F'\t' '{s += $7} END {print s + 0}' "$RESULTS")
  [ "$errors" -eq 0 ] || echo "WARNING: $errors requests failed during the runs (see $RESULTS with KEEP=1)"
}

stop_target() {
  [ -n "${PID:-}" ] || return 0
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
}

# The comparison scripts' EXIT trap: the target, any server below it
# (SERVER_PID) and the work dir.
end_comparison() {
  stop_target
  if [ -n "${SERVER_PID:-}" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  drop_work_dir
}

bench() { # extra args...; prints the JSON report
  "$BIN" bench --socket "$SOCK" --queues "$QUEUES" --json --pid "$PID" "$@"
}

# bench_row TARGET WORKLOAD ARGS...: one `cryptblk bench` run on the target,
# appended to RESULTS.
bench_row() {
  local target=$1 name=$2
  shift 2
  bench "$@" >"$WORK/run.json" ||
    echo "   $name on $target reported errors: $(jq -c '.errors' "$WORK/run.json")" >&2
  jq -r --arg t "$target" --arg w "$name" \
    '[$t, $w, .total.iops, .total.mib_per_sec, .total.latency_us.p99,
      (.daemon_cpu.us_per_io // 0), (.errors | add // 0)] | @tsv' \
    "$WORK/run.json" >>"$RESULTS"
}

# median_of TARGET WORKLOAD COLUMN: the median of RESULTS' values ("nan": none).
median_of() {
  awk -F'\t' -v t="$1" -v w="$2" -v c="$3" '$1 == t && $2 == w {print $c}' "$RESULTS" |
    sort -g | awk '{v[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# ratio A B: A/B with two decimals, "-" when either is missing or B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || b + 0 == 0) print "-"; else printf "%.2f", a / b}'; }

# results_table PREFIX PAIR...: the medians of every target in TARGETS (named
# PREFIX<target> in RESULTS) for every workload, 4K rows in IOPS and 1M rows
# in MiB/s, then one ratio column per PAIR ("a b label": a/b), then p99 and
# daemon CPU per I/O.
results_table() {
  local prefix=$1 p t a b label name col workload
  shift
  echo "throughput: 4k rows in IOPS, 1m rows in MiB/s"
  printf '%-13s' workload
  for t in $TARGETS; do printf ' %14s' "$t"; done
  for p in "$@"; do
    read -r _ _ label <<<"$p"
    printf ' %12s' "$label"
  done
  echo
  for workload in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$workload"
    col=3
    [[ $name == 1m-* ]] && col=4
    printf '%-13s' "$name"
    for t in $TARGETS; do printf ' %14.0f' "$(median_of "$prefix$t" "$name" $col)"; done
    for p in "$@"; do
      read -r a b _ <<<"$p"
      printf ' %12s' "$(ratio "$(median_of "$prefix$a" "$name" $col)" "$(median_of "$prefix$b" "$name" $col)")"
    done
    echo
  done
  echo
  echo "p99 latency (us) / daemon CPU per I/O (us):"
  for workload in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$workload"
    printf '%-13s' "$name"
    for t in $TARGETS; do
      printf ' %14s' "$(printf '%.0f/%.1f' "$(median_of "$prefix$t" "$name" 5)" "$(median_of "$prefix$t" "$name" 6)")"
    done
    echo
  done
}
