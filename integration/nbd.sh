#!/usr/bin/env bash
# Issue #15's measurement: cryptblk with its ciphertext on an NBD export,
# against itself without encryption and against qemu-storage-daemon's luks
# driver over its nbd driver, in one run. The export is nbdkit's memory
# plugin, first over a unix socket (no network: the servers are what is
# measured) and then over TCP on 127.0.0.1. On each, one LUKS1 image made by
# qemu-img (copied onto the export with nbdcopy) is served three ways, each
# driven by `cryptblk bench` (release build, libblkio client, 2 queues):
#   cryptblk-xts   cryptblk plain mode on the export (--offset = payload
#                  offset, the volume key): one NBD connection per queue
#                  (nbdkit's memory plugin advertises multi-conn)
#   cryptblk-none  cryptblk --cipher none on the same payload (plaintext)
#   qsd-luks       qemu-storage-daemon: --blockdev driver=nbd, then
#                  driver=luks on it, exported as vhost-user-blk
#   qsd-raw        (not by default) QSD's raw driver on the payload over nbd
#   cryptblk-shared (not by default; SERVER=qemu-nbd) cryptblk-xts on a second
#                  qemu-nbd serving the same file to one client (no
#                  multi-conn): every queue shares one connection
# Workloads: 4K random read/write at QD32 and QD1, 1M sequential read/write at
# QD4 (QD per queue). Before measuring, a pattern is written through qsd-luks
# and read back through cryptblk-xts on each transport: the figures are void
# unless both decrypt the same export to the same data. Targets run A/B/A/B
# within each transport (every target once per round), medians are reported,
# then the issue's targets: encrypted >= 0.9x plaintext in every workload,
# >= 3x qsd-luks at 4K QD32 and at 1M.
#
# Knobs (environment): SIZE=1G (payload; nbdkit holds it in memory) RUNTIME=5
# (s per run) ROUNDS=3 QUEUES=2 TRANSPORTS="unix tcp"
# TARGETS="cryptblk-xts cryptblk-none qsd-luks" KEEP=1 (keep the work dir).
# SERVER=qemu-nbd: the export is a file in /dev/shm served by qemu-nbd
# --shared=8 (multi-conn: a connection per queue), and by a second qemu-nbd
# --shared=1 on the same file for cryptblk-shared (one connection): the two
# connection modes measured against each other on the same server.
# Needs qemu-img, qemu-storage-daemon, cryptsetup, jq, nbdkit, nbdcopy, python3:
# integration/install-deps.sh installs them.
set -euo pipefail

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
QUEUES=${QUEUES:-2}
TRANSPORTS=${TRANSPORTS:-"unix tcp"}
TARGETS=${TARGETS:-"cryptblk-xts cryptblk-none qsd-luks"}
SERVER=${SERVER:-nbdkit}
SEED=4242

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_TAG=nbd
# shellcheck source=integration/lib.sh
. "$ROOT/integration/lib.sh"
QD1=1
bench_workloads

need_tools qemu-img qemu-storage-daemon cryptsetup jq nbdkit nbdcopy python3 qemu-nbd
case $SERVER in nbdkit | qemu-nbd) ;; *) die "SERVER=$SERVER: nbdkit or qemu-nbd" ;; esac
if has cryptblk-shared && [ "$SERVER" != qemu-nbd ]; then
  die "cryptblk-shared needs SERVER=qemu-nbd"
fi
build_release

WORK=$(mktemp -d /tmp/cryptblk-nbd.XXXXXX)
PID=
SERVER_PID=
SHARED_PID=
SHM_FILE=
trap 'rm -f "$SHM_FILE"; end_comparison' EXIT
umask 077

log "creating a $SIZE LUKS1 image with qemu-img (copied onto each export)"
IMG=$WORK/image.luks
luks1_image "$IMG" "$SIZE"
EXPORT_BYTES=$(stat -c %s "$IMG")

# listen_on TRANSPORT NAME: where a server NAME listens. Sets LISTEN (nbdkit's
# options; qemu-nbd's in QEMU_LISTEN), LISTEN_URI, LISTEN_QSD (the server
# options of QEMU's nbd driver) and READY (a command that succeeds once it
# listens).
listen_on() {
  local port
  case $1 in
    unix)
      local sock=$WORK/$2.sock
      rm -f "$sock"
      LISTEN=(--unix "$sock")
      QEMU_LISTEN=(--socket "$sock")
      LISTEN_URI="nbd+unix:///?socket=$sock"
      LISTEN_QSD="server.type=unix,server.path=$sock"
      READY=(listening "$sock")
      ;;
    tcp)
      port=$(free_port)
      LISTEN=(--ipaddr 127.0.0.1 --port "$port")
      QEMU_LISTEN=(--bind 127.0.0.1 --port "$port")
      LISTEN_URI="nbd://127.0.0.1:$port/"
      LISTEN_QSD="server.type=inet,server.host=127.0.0.1,server.port=$port"
      READY=(tcp_listening "$port")
      ;;
    *) die "unknown transport $1 (unix or tcp)" ;;
  esac
}

# wait_server PID: until READY, or dies if PID exits first.
wait_server() {
  for _ in $(seq 200); do
    "${READY[@]}" && return 0
    kill -0 "$1" 2>/dev/null || die "the NBD server exited early: $(tail -5 "$WORK/nbdkit.log")"
    sleep 0.05
  done
  die "the NBD server did not listen"
}

# qemu_nbd CLIENTS: qemu-nbd on the file in /dev/shm (image locking off: a
# second qemu-nbd serves the same file), where LISTEN says.
qemu_nbd() {
  qemu-nbd --persistent --shared="$1" --cache=writeback "${QEMU_LISTEN[@]}" --image-opts \
    "driver=raw,file.driver=file,file.filename=$SHM_FILE,file.locking=off" \
    2>>"$WORK/nbdkit.log" &
}

# start_server TRANSPORT: nbdkit's memory plugin (or qemu-nbd, SERVER), export
# size = the image's, with the image copied onto it. Sets SERVER_PID, URI
# (cryptblk's --image) and QSD_SERVER (the server options of QEMU's nbd
# driver); with qemu-nbd also SHARED_PID and SHARED_URI (the one-client one).
start_server() {
  listen_on "$1" nbd
  URI=$LISTEN_URI
  QSD_SERVER=$LISTEN_QSD
  if [ "$SERVER" = qemu-nbd ]; then
    SHM_FILE=$(mktemp /dev/shm/cryptblk-nbd.XXXXXX)
    cp "$IMG" "$SHM_FILE"
    qemu_nbd 8
    SERVER_PID=$!
    wait_server "$SERVER_PID"
    listen_on "$1" nbd-shared
    SHARED_URI=$LISTEN_URI
    qemu_nbd 1
    SHARED_PID=$!
    wait_server "$SHARED_PID"
    log "$1: qemu-nbd on a file in /dev/shm, --shared=8 at $URI, --shared=1 at $SHARED_URI"
    return
  fi
  nbdkit --foreground --exit-with-parent "${LISTEN[@]}" memory size="$EXPORT_BYTES" \
    2>>"$WORK/nbdkit.log" &
  SERVER_PID=$!
  wait_server "$SERVER_PID"
  nbdcopy "$IMG" "$URI" || die "nbdcopy could not copy the image onto $URI"
  log "$1: nbdkit memory plugin, $EXPORT_BYTES bytes, at $URI"
}

stop_server() {
  local pid
  for pid in $SERVER_PID $SHARED_PID; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PID=
  SHARED_PID=
  rm -f "$SHM_FILE"
}

start_nbd_target() { # name: as compare.sh's start_target, on the export
  SOCK=$WORK/$1.sock
  rm -f "$SOCK"
  local plain=(--image "$URI" --type plain --key-file "$WORK/volume.key" --key-size 512
    --offset "$PAYLOAD" --queues "$QUEUES")
  local nbd0="driver=nbd,node-name=nbd0,$QSD_SERVER"
  case $1 in
    qsd-raw)
      qemu-storage-daemon --blockdev "$nbd0" \
        --blockdev "driver=raw,file=nbd0,offset=$((PAYLOAD * 512)),node-name=raw0" \
        --export "$(qsd_export raw0)" 2>>"$WORK/daemon.log" &
      ;;
    cryptblk-shared)
      plain[1]=$SHARED_URI
      start_store_target cryptblk-xts nbd0 "$nbd0" "${plain[@]}"
      ;;
    *) start_store_target "$1" nbd0 "$nbd0" "${plain[@]}" ;;
  esac
  PID=$!
  wait_listening "$1"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
for transport in $TRANSPORTS; do
  start_server "$transport"
  # --- cross-check: cryptblk reads what QSD's luks driver wrote ----------------
  cross_check start_nbd_target export "$transport: "
  # --- A/B/A/B rounds ----------------------------------------------------------
  ab_rounds "$transport:" start_nbd_target
  stop_server
done

# --- medians, ratios and the issue's targets -----------------------------------
pairs=()
has cryptblk-xts && has cryptblk-none && pairs+=("cryptblk-xts cryptblk-none xts/none")
has cryptblk-xts && has qsd-luks && pairs+=("cryptblk-xts qsd-luks xts/qsdluks")
has qsd-luks && has qsd-raw && pairs+=("qsd-luks qsd-raw luks/raw")
has cryptblk-none && has qsd-raw && pairs+=("cryptblk-none qsd-raw none/qsdraw")
has cryptblk-shared && has cryptblk-xts && pairs+=("cryptblk-shared cryptblk-xts shared/perqueue")
has cryptblk-shared && has qsd-luks && pairs+=("cryptblk-shared qsd-luks shared/qsdluks")
for transport in $TRANSPORTS; do
  echo
  server="nbdkit memory plugin"
  [ "$SERVER" = qemu-nbd ] && server="qemu-nbd on /dev/shm"
  echo "cryptblk on NBD ($transport: $server): $SIZE LUKS1 payload, $QUEUES queues," \
    "${RUNTIME}s runs, median of $ROUNDS rounds (A/B/A/B), client: cryptblk bench (libblkio)," \
    "$(date -u +%F), $(cpu_model)" \
    "(family $(sed -n 's/^cpu family[[:space:]]*: //p' /proc/cpuinfo | head -1)," \
    "model $(sed -n 's/^model[[:space:]]*: //p' /proc/cpuinfo | head -1))," \
    "$(nproc) CPUs, $(nbdkit --version), $(qemu-storage-daemon --version | head -1)"
  results_table "$transport:" "${pairs[@]}"
done

RESULT_GROUPS=()
for transport in $TRANSPORTS; do RESULT_GROUPS+=("$transport: $transport/"); done
issue_targets 15 3
warn_failed_requests
