#!/usr/bin/env bash
# Issue #16's measurement: cryptblk with its ciphertext on a Ceph RBD image,
# against itself without encryption and against qemu-storage-daemon's rbd
# driver (with its luks driver on top, and with librbd's own LUKS2), in one
# run on the single-node cluster of integration/ceph.sh (one monitor, one
# memstore OSD, all on 127.0.0.1: the cluster is in RAM, so what is measured
# is the client side). One LUKS1 image, its payload at 4 MiB (RADOS objects
# are 4 MiB: a payload off that boundary makes one 1M write in four straddle
# two objects, 1.2x slower, as qemu-img's 4040 sectors did until session 12),
# is `rbd import`ed and served these ways, each driven by `cryptblk bench` (release build, libblkio
# client, 2 queues):
#   cryptblk-xts    cryptblk plain mode on the image (--offset = payload
#                   offset, the volume key): one librbd image handle, every
#                   queue's requests in flight through rbd_aio_*
#   cryptblk-none   cryptblk --cipher none on the same payload (plaintext)
#   qsd-luks        qemu-storage-daemon: --blockdev driver=rbd, then
#                   driver=luks on it, exported as vhost-user-blk
#   qsd-librbd      qemu-storage-daemon's rbd driver with librbd's own
#                   encryption (encrypt.format=luks2) on a second image made by
#                   `rbd encryption format luks2` (argon2id: ~10 s to format)
# Workloads: 4K random read/write at QD32 and QD1, 1M sequential read/write at
# QD4 (QD per queue). Before measuring, a pattern is written through qsd-luks
# and read back through cryptblk-xts: the figures are void unless both
# decrypt the same image to the same data. Targets run A/B/A/B (every target
# once per round), medians are reported, then the issue's targets: encrypted
# >= 0.9x plaintext in every workload, >= 2x qsd-luks at 4K QD32 and at 1M.
#
# Knobs (environment): SIZE=512M (payload; the memstore OSD holds it in RAM)
# RUNTIME=5 (s per run) ROUNDS=1 QUEUES=2
# TARGETS="cryptblk-xts cryptblk-none qsd-luks qsd-librbd" KEEP=1 (keep the
# work dir). Needs qemu-img, qemu-storage-daemon (with qemu-block-extra's rbd
# driver), cryptsetup, jq, python3, ceph-mon, ceph-osd, rbd:
# integration/install-deps.sh installs them. Not run by ./test.sh.
set -euo pipefail

SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-1}
QUEUES=${QUEUES:-2}
TARGETS=${TARGETS:-"cryptblk-xts cryptblk-none qsd-luks qsd-librbd"}
SEED=4242

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_TAG=rbd
# shellcheck source=integration/lib.sh
. "$ROOT/integration/lib.sh"
# shellcheck source=integration/ceph.sh
. "$ROOT/integration/ceph.sh"
QD1=1
bench_workloads

need_tools qemu-img qemu-storage-daemon cryptsetup jq python3
ceph_need
build_release

WORK=$(mktemp -d /tmp/cryptblk-rbd.XXXXXX)
PID=
CEPH_DIR=$WORK/ceph
end_rbd() {
  end_comparison_keep_work
  ceph_stop "$CEPH_DIR"
  drop_work_dir
}
# The comparison's own trap, without removing WORK before the cluster stops.
end_comparison_keep_work() {
  stop_target
}
trap end_rbd EXIT
umask 077

log "creating a $SIZE LUKS1 image, payload at 4 MiB (the RADOS object size)"
IMG=$WORK/image.luks
luks1_image "$IMG" "$SIZE" 8192
IMAGE_BYTES=$(stat -c %s "$IMG")

# The images live in the OSD's RAM: room for both and the cluster's own.
CEPH_MEMSTORE_BYTES=$((3 * IMAGE_BYTES + (512 << 20))) ceph_start "$CEPH_DIR" >/dev/null
CONF=$CEPH_DIR/ceph.conf
rbd -c "$CONF" import --no-progress "$IMG" rbd/bench || die "rbd import failed"
rm -f "$IMG"
if has qsd-librbd; then
  log "formatting rbd/bench-librbd with rbd encryption format luks2 (argon2id)"
  # The same payload as the LUKS1 image behind a 16 MiB LUKS2 header.
  rbd -c "$CONF" create --size $(((IMAGE_BYTES >> 20) + 17))M rbd/bench-librbd
  rbd -c "$CONF" encryption format rbd/bench-librbd luks2 "$WORK/passphrase" ||
    die "rbd encryption format failed"
fi

start_rbd_target() { # name: as compare.sh's start_target, on the RBD image
  SOCK=$WORK/$1.sock
  rm -f "$SOCK"
  local plain=(--image rbd:rbd/bench --ceph-conf "$CONF" --type plain --key-file "$WORK/volume.key"
    --key-size 512 --offset "$PAYLOAD" --queues "$QUEUES")
  local rbd0="driver=rbd,node-name=rbd0,pool=rbd,image=bench,conf=$CONF"
  case $1 in
    qsd-librbd)
      qemu-storage-daemon --object "secret,id=sec0,file=$WORK/passphrase" \
        --blockdev "driver=rbd,node-name=enc0,pool=rbd,image=bench-librbd,conf=$CONF,encrypt.format=luks2,encrypt.key-secret=sec0" \
        --export "$(qsd_export enc0)" 2>>"$WORK/daemon.log" &
      ;;
    *) start_store_target "$1" rbd0 "$rbd0" "${plain[@]}" ;;
  esac
  PID=$!
  # librbd's LUKS2 unlock (argon2id) takes seconds: wait up to 60 s.
  wait_listening "$1" 60
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
# --- cross-check: cryptblk reads what QSD's luks driver wrote ------------------
cross_check start_rbd_target image
if has qsd-librbd; then
  start_rbd_target qsd-librbd
  bench --rw write --bs 1m --iodepth 4 --seed "$SEED" >"$WORK/fill2.json" || die "filling the librbd image failed"
  stop_target
fi
# --- A/B/A/B rounds ----------------------------------------------------------
# The memstore OSD keeps an object as a list of buffers: every 4K random
# write splits it further, and reads of a fragmented object cost the OSD
# more (4K randread QD32 fell from ~30k to ~15k IOPS after the write
# workloads, for every target alike). Without a rewrite, the first target
# measured read a freshly filled image and the others one fragmented by the
# previous target's writes. A sequential 1M rewrite before each target
# joins the buffers again, so all targets start from the same state.
REFILL=1 ab_rounds rbd: start_rbd_target

# --- medians, ratios and the issue's targets -----------------------------------
pairs=()
has cryptblk-xts && has cryptblk-none && pairs+=("cryptblk-xts cryptblk-none xts/none")
has cryptblk-xts && has qsd-luks && pairs+=("cryptblk-xts qsd-luks xts/qsdluks")
has cryptblk-xts && has qsd-librbd && pairs+=("cryptblk-xts qsd-librbd xts/librbd")
echo
echo "cryptblk on Ceph RBD (single-node cluster, memstore OSD, 127.0.0.1): $SIZE LUKS1 payload," \
  "$QUEUES queues, ${RUNTIME}s runs, median of $ROUNDS rounds (A/B/A/B), client: cryptblk bench" \
  "(libblkio), $(date -u +%F), $(cpu_model)," \
  "$(nproc) CPUs, librbd $(rbd --version | awk '{print $3}'), $(qemu-storage-daemon --version | head -1)"
results_table "rbd:" "${pairs[@]}"

RESULT_GROUPS=("rbd:")
issue_targets 16 2
warn_failed_requests
