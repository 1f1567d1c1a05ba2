#!/usr/bin/env bash
# End-to-end test with a real VMM: a QEMU guest writes through a vhost-user-blk
# backend into an encrypted image (LUKS1 from qemu-img, LUKS2 from cryptsetup,
# or plain dm-crypt). Independent implementations then read the image: the
# guest kernel's dm-crypt and, for LUKS1, qemu-img's luks driver on the host;
# they must see exactly what the guest wrote, and the image itself must hold
# no plaintext.
#
#   bash integration/e2e-qemu.sh                   # BACKEND=cryptblk (default): eight runs,
#       a qemu-img LUKS1 image served in plain mode with its volume key and
#       payload offset (--crypto inline); a cryptsetup LUKS2 image with 4 KiB
#       sectors unlocked by passphrase (--crypto inline --io pread); a LUKS2 image
#       that `cryptblk format` made (4 KiB sectors, --direct); a plain image with
#       4 KiB sectors, --iv-large-sectors --skip 8, --crypto workers, a small
#       --split-threshold, --direct and --allow-discards; the qemu-img LUKS1
#       image again, unlocked by passphrase, on an NBD export (E2E_NBD=1:
#       nbdkit's file plugin serves the image file over a unix socket, with
#       --allow-discards); a cryptsetup LUKS2 image over TCP to qemu-nbd, which
#       takes one client, so the queues share one connection (E2E_NBD=qemu-nbd,
#       --crypto workers --allow-discards); a plain image over qemu-storage-daemon's
#       NBD export (E2E_NBD=qsd); the LUKS1 image imported into a single-node Ceph
#       cluster and served from RBD (E2E_RBD=1, --allow-discards); then the
#       negative control below, which must fail on exactly the ciphertext checks
#   E2E_FORMAT=luks1 E2E_UNLOCK=passphrase E2E_NBD=1 bash integration/e2e-qemu.sh  # one run, on NBD
#   E2E_FORMAT=luks1 E2E_UNLOCK=passphrase E2E_RBD=1 bash integration/e2e-qemu.sh  # one run, on RBD
#   E2E_FORMAT=plain E2E_SERVE_ARGS='--crypto workers' bash integration/e2e-qemu.sh  # one run
#   BACKEND=qsd bash integration/e2e-qemu.sh       # qemu-storage-daemon's luks export
#   BACKEND=plaintext bash integration/e2e-qemu.sh # negative control: MUST fail
#
# In the guest, dm-crypt opens the image file (a second, read-only disk below
# the backend) through the LUKS header (cryptsetup open --type luks) and as
# plain dm-crypt with the bare volume key and payload offset.
#
# Environment: BACKEND (cryptblk|qsd|plaintext); E2E_FORMAT (luks1|luks2|plain;
# set: one run); E2E_UNLOCK (key|passphrase: how cryptblk opens a LUKS image;
# default key for luks1, passphrase for luks2); E2E_SECTOR (luks2 sector size,
# default 4096; plain: default 512); E2E_LUKS2_MAKER (cryptsetup|cryptblk);
# E2E_RESIZE (1: grow the disk online after the reboot, see below);
# E2E_NBD (1 or nbdkit, qemu-nbd, qsd: cryptblk reaches the image through that
# server, see below);
# E2E_RBD (1: the image lives in a Ceph cluster, see below);
# E2E_PLAIN_IV (plain mode's IV options for both sides); E2E_SERVE_ARGS (extra `cryptblk serve` options); CRYPTBLK
# (path to the binary; default: built here with cargo, profile
# E2E_PROFILE=debug|release); E2E_TIMEOUT (seconds the guest may run, default
# 180); E2E_DEBUG=1 (kernel messages and a shell trace of the guest test on the
# console); E2E_APPEND (more kernel parameters); WORK_DIR (cache, default
# integration/work). Exits 0 only if every
# check passed. Needs the tools from integration/install-deps.sh; a missing
# tool fails the test, it never skips.
set -euo pipefail
LOG_TAG=e2e
# shellcheck source=integration/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=integration/guest/kernel.sh
. "$INTEGRATION_DIR/guest/kernel.sh"
# shellcheck source=integration/guest/initramfs.sh
. "$INTEGRATION_DIR/guest/initramfs.sh"
# shellcheck source=integration/guest/vm.sh
. "$INTEGRATION_DIR/guest/vm.sh"

BACKEND=${BACKEND:-cryptblk}
FORMAT=${E2E_FORMAT:-luks1}
SERVE_ARGS=${E2E_SERVE_ARGS:-}
# E2E_RESIZE=1: after the reboot the host grows the disk by 16 MiB through the
# control socket while the guest runs, and the guest must see and use it.
RESIZE=${E2E_RESIZE:-0}
# E2E_NBD=1: the ciphertext goes over NBD. nbdkit's file plugin serves the
# image file on a unix socket and cryptblk's --image is that export
# (nbd+unix://); the file is still here, below nbdkit, for the guest's
# read-only reference disk and the host's checks, which thereby read what
# went over the wire. nbdkit's stats filter counts the commands it served.
# E2E_NBD=qemu-nbd: qemu-nbd serves the file over TCP on 127.0.0.1 to one
# client at a time (--shared=1, no multi-conn), so every queue drives
# cryptblk's one shared connection. E2E_NBD=qsd: qemu-storage-daemon's NBD
# export of the file (its file driver) on a unix socket, the export named
# after the node, with multi-conn (a connection per queue).
case ${E2E_NBD:-0} in
  0) NBD=0 NBD_SERVER= ;;
  1 | nbdkit) NBD=1 NBD_SERVER=nbdkit ;;
  qemu-nbd) NBD=1 NBD_SERVER=qemu-nbd ;;
  qsd) NBD=1 NBD_SERVER=qemu-storage-daemon ;;
  *) die "unknown E2E_NBD=$E2E_NBD (0, 1 or nbdkit, qemu-nbd, qsd)" ;;
esac
# E2E_RBD=1: the ciphertext lives in Ceph. integration/ceph.sh starts a
# single-node cluster (stopped when this script exits), the image file is
# `rbd import`ed, and cryptblk's --image is rbd:rbd/e2e: the LUKS header is
# read and unlocked through librbd, every guest request goes to the cluster.
# The guest's read-only reference disk is the same RBD image through QEMU's
# own rbd driver (uncached), and the host's checks run on an `rbd export`
# of it taken after cryptblk exited.
RBD=${E2E_RBD:-0}
# Who formats a LUKS2 image: cryptsetup, or cryptblk itself (then the guest's
# dm-crypt proves that cryptblk's headers are what cryptsetup expects).
LUKS2_MAKER=${E2E_LUKS2_MAKER:-cryptsetup}
# Plain mode's IV options, given to cryptblk serve and to the guest's
# cryptsetup alike (e.g. "--iv-large-sectors --skip 8").
PLAIN_IV=${E2E_PLAIN_IV:-}
# How cryptblk opens a LUKS image: "key" (the volume key with the payload
# offset, in plain mode: what dm-crypt's table holds) or "passphrase" (it
# reads the header itself, as cryptsetup open does).
case $FORMAT in
  luks2) UNLOCK=${E2E_UNLOCK:-passphrase} SECTOR=${E2E_SECTOR:-4096} ;;
  plain) UNLOCK=${E2E_UNLOCK:-key} SECTOR=${E2E_SECTOR:-512} ;;
  *) UNLOCK=${E2E_UNLOCK:-key} SECTOR=512 ;;
esac
case $FORMAT in
  luks1 | luks2) ;;
  plain) [ "$UNLOCK" = key ] || die "a plain image has no passphrase: E2E_UNLOCK=key" ;;
  *) die "unknown E2E_FORMAT=$FORMAT (luks1, luks2 or plain)" ;;
esac
[ "$FORMAT" = luks1 ] || [ "$BACKEND" != qsd ] ||
  die "qemu-storage-daemon serves only LUKS1 images: E2E_FORMAT=$FORMAT needs BACKEND=cryptblk"
if [ "$NBD" = 1 ]; then
  [ "$BACKEND" = cryptblk ] || die "E2E_NBD=1 needs BACKEND=cryptblk"
  [ "$RESIZE" = 0 ] || die "E2E_NBD=1 cannot resize: an export's size is its server's"
  [[ " $SERVE_ARGS " != *" --direct "* ]] || die "E2E_NBD=1: cryptblk refuses --direct on an NBD export"
fi
if [ "$RBD" = 1 ]; then
  [ "$BACKEND" = cryptblk ] || die "E2E_RBD=1 needs BACKEND=cryptblk"
  [ "$NBD" = 0 ] || die "E2E_RBD=1 and E2E_NBD=1 exclude each other"
  [ "$RESIZE" = 0 ] || die "E2E_RBD=1 cannot resize: cryptblk does not resize RBD images"
  [[ " $SERVE_ARGS " != *" --direct "* ]] || die "E2E_RBD=1: cryptblk refuses --direct on an RBD image"
fi
TIMEOUT=${E2E_TIMEOUT:-180}
CPUS=2
QUEUES=2
MEM=512M
DISK_BYTES=$((64 << 20))
# Guest layout: an ext4 filesystem on the first 32 MiB, pattern C (2 MiB) at
# 33 MiB with a zeroed range inside it whose ends are sector but (for
# 512-byte sectors) not 4 KiB aligned, pattern A (4 MiB) at 36 MiB, pattern B
# from a sector but not 4 KiB aligned offset up to the last byte.
FS_BYTES=$((32 << 20))
PAT_C_OFF=$((33 << 20))
PAT_C_LEN=$((2 << 20))
ZERO_OFF=$((PAT_C_OFF + 3 * SECTOR))
ZERO_LEN=$(((1 << 20) + SECTOR))
PAT_A_OFF=$((36 << 20))
PAT_A_LEN=$((4 << 20))
PAT_B_LEN=$(((2 << 20) + 3 * SECTOR))
PAT_B_OFF=$((DISK_BYTES - PAT_B_LEN))
REF_SERIAL=dmcrypt-ref
EXPECTED_RESULTS="modules disk-present disk-size block-size queues raw-write raw-readback-a
  raw-readback-b both-queues-used write-zeroes write-zeroes-readback mkfs fs-write fsck
  fs-readback raw-intact-a raw-intact-b dmcrypt-plain-open dmcrypt-plain-pattern-a
  dmcrypt-plain-pattern-b dmcrypt-plain-zeroes dmcrypt-plain-files kernel-log
  reboot-disk-present reboot-pattern-a reboot-pattern-b reboot-zeroes reboot-files
  reboot-queues reboot-kernel-log"
[ "$FORMAT" = plain ] || EXPECTED_RESULTS+=" dmcrypt-luks-open dmcrypt-luks-pattern-a
  dmcrypt-luks-pattern-b dmcrypt-luks-zeroes dmcrypt-luks-files"
# qemu-storage-daemon offers discard; cryptblk only when told to.
DISCARD=1
[ "$BACKEND" != cryptblk ] || [[ " $SERVE_ARGS " == *" --allow-discards "* ]] || DISCARD=0
[ "$DISCARD" = 0 ] || EXPECTED_RESULTS+=" fs-trim"
RESIZE_BYTES=0
if [ "$RESIZE" = 1 ]; then
  [ "$BACKEND" = cryptblk ] || die "E2E_RESIZE=1 needs BACKEND=cryptblk"
  RESIZE_BYTES=$((DISK_BYTES + (16 << 20)))
  EXPECTED_RESULTS+=" resize-seen resize-usable"
fi

RUN=$WORK_DIR/e2e-$BACKEND-$FORMAT
[ "$FORMAT" != luks2 ] || [ "$LUKS2_MAKER" = cryptsetup ] || RUN+=-$LUKS2_MAKER
[ "$NBD" = 0 ] || RUN+=-$NBD_SERVER
[ "$RBD" = 0 ] || RUN+=-rbd
SOCK=$RUN/vhost.sock
IMG=$RUN/img.$FORMAT
PASSFILE=$RUN/passphrase
KEYFILE=$RUN/volume.key
SERIAL=$RUN/serial.log
BACKEND_LOG=$RUN/backend.log
NBD_SOCK=$RUN/nbd.sock
NBD_STATS=$RUN/nbdkit.stats
CEPH_DIR=$RUN/ceph
RBD_IMAGE=rbd/e2e
RUNID=$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')
MARKER=CRYPTBLK-E2E-$RUNID

cleanup_on_exit "$KEYFILE" "$PASSFILE" "$RUN/initramfs/e2e/passphrase" "$RUN/initramfs/e2e/volume.key"

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
  [ "$NBD" = 0 ] || need_tools "$NBD_SERVER"
  [ "$RBD" = 0 ] || need_tools ceph-mon ceph-osd rbd
}

# The image, its volume key and payload offset in 512-byte sectors (what a
# dm-crypt table or `cryptblk serve --offset` needs).
make_image() {
  case $FORMAT in
    plain)
      (umask 077 && head -c 64 /dev/urandom >"$KEYFILE")
      truncate -s "$DISK_BYTES" "$IMG"
      PAYLOAD=0
      ;;
    luks1) make_luks1_image ;;
    luks2) make_luks2_image ;;
  esac
  [ "$FORMAT" = plain ] || dump_volume_key
  [ "$(stat -c %s "$IMG")" = $((DISK_BYTES + PAYLOAD * 512)) ] ||
    die "image size $(stat -c %s "$IMG") != payload offset + $DISK_BYTES"
}

new_passphrase() {
  printf '%s' "e2e-passphrase-$RUNID" >"$PASSFILE"
  chmod 600 "$PASSFILE"
}

# field NAME: the value of the first "NAME: value" line in $dump (luksDump
# output; LUKS2 indents its fields), blanks removed.
field() {
  awk -F: -v k="$1" '{ n = $1; sub(/^[ \t]+/, "", n) }
    n == k { gsub(/[ \t]/, "", $2); print $2; exit }' <<<"$dump"
}

# A LUKS1 image made by qemu-img, checked against what the test assumes.
make_luks1_image() {
  new_passphrase
  qemu-img create -q -f luks -o iter-time=10,key-secret=sec0 \
    --object secret,id=sec0,file="$PASSFILE" "$IMG" "$DISK_BYTES" ||
    die "qemu-img create -f luks failed"
  local dump
  dump=$(cryptsetup luksDump "$IMG") || die "cryptsetup luksDump $IMG failed"
  [ "$(field Version)" = 1 ] || die "expected a LUKS1 image, luksDump says version $(field Version)"
  [ "$(field 'Cipher name')-$(field 'Cipher mode')" = aes-xts-plain64 ] ||
    die "expected aes-xts-plain64, luksDump says $(field 'Cipher name')-$(field 'Cipher mode')"
  [ "$(field 'MK bits')" = 512 ] || die "expected a 512-bit volume key, luksDump says $(field 'MK bits')"
  PAYLOAD=$(field 'Payload offset')
  [[ "$PAYLOAD" =~ ^[0-9]+$ ]] || die "no payload offset in luksDump output"
}

# A LUKS2 image made by cryptsetup (which formats plain files without
# device-mapper), SECTOR-byte sectors, cheap PBKDF2 so that the TCG guest
# unlocks it quickly.
make_luks2_image() {
  new_passphrase
  local header=$((16 << 20)) dump offset
  if [ "$LUKS2_MAKER" = cryptblk ]; then
    "$CRYPTBLK" format --type luks2 --image "$IMG" --size "$DISK_BYTES" --key-size 512 \
      --sector-size "$SECTOR" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
      --key-file "$PASSFILE" || die "cryptblk format --type luks2 failed"
  else
    truncate -s $((DISK_BYTES + header)) "$IMG"
    cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
      --sector-size "$SECTOR" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
      --key-file "$PASSFILE" "$IMG" || die "cryptsetup luksFormat --type luks2 failed"
  fi
  dump=$(cryptsetup luksDump "$IMG") || die "cryptsetup luksDump $IMG failed"
  [ "$(field Version)" = 2 ] || die "expected a LUKS2 image, luksDump says version $(field Version)"
  [ "$(field cipher)" = aes-xts-plain64 ] || die "expected aes-xts-plain64, luksDump says $(field cipher)"
  [ "$(field sector)" = "${SECTOR}[bytes]" ] || die "expected $SECTOR-byte sectors, luksDump says $(field sector)"
  offset=$(field offset)
  offset=${offset%\[bytes\]}
  [ "$offset" = "$header" ] || die "expected the LUKS2 data segment at $header bytes, luksDump says $offset"
  PAYLOAD=$((offset / 512))
}

# The volume key, as `cryptsetup luksDump --dump-volume-key` gives it.
dump_volume_key() {
  (umask 077 && cryptsetup luksDump --dump-volume-key --volume-key-file "$KEYFILE" \
    --batch-mode --key-file "$PASSFILE" "$IMG" >/dev/null) ||
    die "cryptsetup could not dump the volume key"
  [ "$(stat -c %s "$KEYFILE")" = 64 ] || die "volume key file is not 64 bytes"
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
PAT_C_OFF=$PAT_C_OFF
PAT_C_LEN=$PAT_C_LEN
ZERO_OFF=$ZERO_OFF
ZERO_LEN=$ZERO_LEN
SECTOR=$SECTOR
DISCARD=$DISCARD
REF_SERIAL=$REF_SERIAL
FORMAT=$FORMAT
PAYLOAD_SECTORS=$PAYLOAD
PLAIN_IV="$([ "$FORMAT" = plain ] && echo "$PLAIN_IV")"
RESIZE_BYTES=$RESIZE_BYTES
EOF
  install -m 600 "$KEYFILE" "$e2e/volume.key"
  [ "$FORMAT" = plain ] || install -m 600 "$PASSFILE" "$e2e/passphrase"
  gen_pattern A "$PAT_A_OFF" "$PAT_A_LEN" >"$RUN/pat-a"
  gen_pattern B "$PAT_B_OFF" "$PAT_B_LEN" >"$RUN/pat-b"
  gen_pattern C "$PAT_C_OFF" "$PAT_C_LEN" >"$RUN/pat-c"
  # Pattern C as it must read after the guest zeroes part of it.
  {
    head -c $((ZERO_OFF - PAT_C_OFF)) "$RUN/pat-c"
    head -c "$ZERO_LEN" /dev/zero
    tail -c +$((ZERO_OFF - PAT_C_OFF + ZERO_LEN + 1)) "$RUN/pat-c"
  } >"$RUN/pat-c-zeroed"
  [ "$(stat -c %s "$RUN/pat-c-zeroed")" = "$PAT_C_LEN" ] || die "pat-c-zeroed has the wrong size"
  cp "$RUN/pat-a" "$RUN/pat-b" "$RUN/pat-c" "$RUN/pat-c-zeroed" "$e2e/"
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

# The NBD server below cryptblk (E2E_NBD=1): nbdkit's file plugin on the
# image file (it advertises multi-conn, so each queue gets a connection),
# with the stats filter, which writes its counts when nbdkit exits.
# With E2E_NBD=qemu-nbd: qemu-nbd on the file over TCP, one client at a time
# (it outlives each: --persistent). Sets NBD_URI.
start_nbd_server() {
  rm -f "$NBD_SOCK" "$NBD_STATS"
  local ready
  if [ "$NBD_SERVER" = qemu-nbd ]; then
    local port
    port=$(free_port)
    qemu-nbd --persistent --shared=1 --cache=writeback --format=raw --bind 127.0.0.1 \
      --port "$port" "$IMG" >"$RUN/nbd-server.log" 2>&1 &
    NBD_URI="nbd://127.0.0.1:$port/"
    ready=(tcp_listening "$port")
  elif [ "$NBD_SERVER" = qemu-storage-daemon ]; then
    qemu-storage-daemon --blockdev "driver=file,node-name=disk,filename=$IMG" \
      --nbd-server "addr.type=unix,addr.path=$NBD_SOCK" \
      --export type=nbd,id=e0,node-name=disk,writable=on >"$RUN/nbd-server.log" 2>&1 &
    NBD_URI="nbd+unix:///disk?socket=$NBD_SOCK"
    ready=(listening "$NBD_SOCK")
  else
    nbdkit --foreground --exit-with-parent --unix "$NBD_SOCK" --filter=stats \
      file file="$IMG" statsfile="$NBD_STATS" >"$RUN/nbd-server.log" 2>&1 &
    NBD_URI="nbd+unix:///?socket=$NBD_SOCK"
    ready=(listening "$NBD_SOCK")
  fi
  server_pid=$!
  local _
  for _ in $(seq 100); do
    "${ready[@]}" && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$RUN/nbd-server.log" >&2
  die "$NBD_SERVER did not listen ($NBD_URI)"
}

# After cryptblk has exited (and flushed): SIGTERM, a clean exit, and the
# stats file written.
stop_nbd_server() {
  local rc=0
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" || rc=$?
  server_pid=
  [ "$rc" = 0 ] || {
    tail -20 "$RUN/nbd-server.log" >&2
    die "$NBD_SERVER exited with status $rc"
  }
}

# The cluster below cryptblk (E2E_RBD=1): integration/ceph.sh in $CEPH_DIR,
# whose watcher stops it once this script has exited; the image imported with
# the default features (exclusive-lock among them); the reference disk is the
# RBD image through QEMU's rbd driver, uncached (cache.direct=on turns
# librbd's cache off), so it reads what reached the cluster.
start_rbd_cluster() {
  local conf
  conf=$(bash "$INTEGRATION_DIR/ceph.sh" start "$CEPH_DIR" $$) || die "integration/ceph.sh start failed"
  CEPH_CONF_FILE=$conf
  rbd -c "$conf" import --no-progress "$IMG" "$RBD_IMAGE" || die "rbd import failed"
  cp "$IMG" "$RUN/img.before"
  REF_DRIVE="if=none,id=ref,format=raw,readonly=on,cache.direct=on,file.driver=rbd,file.pool=${RBD_IMAGE%/*},file.image=${RBD_IMAGE#*/},file.conf=$conf"
}

# After cryptblk has exited: the image as the cluster holds it replaces the
# file, for the host's checks.
export_rbd_image() {
  rm -f "$IMG"
  rbd -c "$CEPH_CONF_FILE" export --no-progress "$RBD_IMAGE" "$IMG" || die "rbd export failed"
}

# The guest's writes reached the cluster: the export differs from what was imported.
rbd_image_changed() { ! cmp -s "$RUN/img.before" "$IMG"; }
# cryptblk took the image's exclusive lock.
rbd_lock_taken() { grep -q 'exclusive lock taken' "$BACKEND_LOG"; }

start_backend() {
  rm -f "$SOCK"
  case $BACKEND in
    cryptblk)
      local image=$IMG open=(--type luks --key-file "$PASSFILE")
      if [ "$NBD" = 1 ]; then
        start_nbd_server
        image=$NBD_URI
      fi
      if [ "$RBD" = 1 ]; then
        image="rbd:$RBD_IMAGE"
        open+=(--ceph-conf "$CEPH_CONF_FILE")
      fi
      if [ "$UNLOCK" = key ]; then
        open=(--type plain --key-file "$KEYFILE" --key-size 512 --offset "$PAYLOAD")
        [ "$RBD" = 0 ] || open+=(--ceph-conf "$CEPH_CONF_FILE")
        [ "$SECTOR" = 512 ] || open+=(--sector-size "$SECTOR")
        # shellcheck disable=SC2206 # PLAIN_IV is a list of options
        [ "$FORMAT" != plain ] || open+=($PLAIN_IV)
      fi
      # shellcheck disable=SC2086 # SERVE_ARGS is a list of options
      [ "$RESIZE" = 0 ] || open+=(--control "$RUN/ctl.sock")
      RUST_LOG=${RUST_LOG:-info} "$CRYPTBLK" serve --socket "$SOCK" --image "$image" "${open[@]}" \
        --queues "$QUEUES" $SERVE_ARGS >"$BACKEND_LOG" 2>&1 &
      ;;
    qsd)
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
  wait_for_socket
}

run_guest() {
  local rc=0
  guest_qemu_args "$RUN/initramfs.cpio"
  log "booting the guest (timeout ${TIMEOUT}s)"
  # No -no-reboot: the guest reboots once (see guest/test.sh).
  timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" >"$RUN/qemu.log" 2>&1 &
  qemu_pid=$!
  # A panicking guest reboots (panic=-1) and would loop until the timeout.
  local resized=0
  while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ "$RESIZE" = 1 ] && [ $resized = 0 ] && grep -q '^E2E-RESIZE-NOW' "$SERIAL" 2>/dev/null; then
      resized=1
      log "the guest waits for a bigger disk: resize to $RESIZE_BYTES bytes"
      "$CRYPTBLK" ctl --control "$RUN/ctl.sock" resize --arguments "{\"size\": $RESIZE_BYTES}" \
        >"$RUN/resize.json" 2>&1 || true
    fi
    if grep -q 'Kernel panic' "$SERIAL" 2>/dev/null; then
      kill "$qemu_pid"
      wait "$qemu_pid" || true
      qemu_pid=
      guest_failed "the guest kernel panicked"
    fi
    sleep 0.5
  done
  wait "$qemu_pid" || rc=$?
  qemu_pid=
  case $rc in
    0) ;;
    124 | 137) guest_failed "QEMU killed after the ${TIMEOUT}s timeout" ;;
    *) guest_failed "QEMU exited with status $rc: $(tr '\n' ' ' <"$RUN/qemu.log")" ;;
  esac
}

plaintext_in_decrypted() { [ "$(grep -aFc "$MARKER" "$RUN/out.raw" || true)" -gt 0 ]; }
decrypted_region() { cmp -s -n "$2" -i "$1:0" "$RUN/out.raw" "$3"; }
decrypted_fsck() { e2fsck -f -n "$RUN/out.raw" >"$RUN/host-fsck.log" 2>&1; }
decrypted_files() {
  rm -rf "$RUN/fs-dump"
  mkdir -p "$RUN/fs-dump"
  debugfs -R "rdump /e2e $RUN/fs-dump" "$RUN/out.raw" >"$RUN/debugfs.log" 2>&1 &&
    diff -r "$RUN/fs-src" "$RUN/fs-dump/e2e" >"$RUN/fs-diff.log" 2>&1
}

# The control socket's answer: grown, and QEMU was told.
resize_answered() {
  tr -d ' \n' <"$RUN/resize.json" | grep -q "\"capacity\":$RESIZE_BYTES,\"guest-notified\":true"
}

# nbdkit's stats filter counted OP (read, write, flush, trim) commands: the
# guest's I/O of that kind went over NBD.
nbd_served() {
  awk -v op="$1:" '$1 == op && $2 + 0 > 0 { found = 1 } END { exit !found }' "$NBD_STATS"
}

# qemu-nbd (one client at a time) made cryptblk share one connection among
# its queues: its log says so.
nbd_one_shared_connection() { grep -q 'all queues share one connection' "$BACKEND_LOG"; }
# qemu-storage-daemon's writable export offers multi-conn: each queue got a
# connection of its own (cryptblk says nothing of sharing one), and the
# image was opened over NBD.
nbd_connection_per_queue() {
  ! grep -q 'all queues share one connection' "$BACKEND_LOG" && grep -q "serving .* bytes" "$BACKEND_LOG"
}

host_checks() {
  host_check image-has-no-plaintext no_plaintext_in_image
  if [ "$NBD_SERVER" = qemu-nbd ]; then
    host_check nbd-one-shared-connection nbd_one_shared_connection
  elif [ "$NBD_SERVER" = qemu-storage-daemon ]; then
    host_check nbd-connection-per-queue nbd_connection_per_queue
  elif [ "$NBD" = 1 ]; then
    host_check nbd-served-reads nbd_served read
    host_check nbd-served-writes nbd_served write
    host_check nbd-served-flushes nbd_served flush
    [ "$DISCARD" = 0 ] || host_check nbd-served-trims nbd_served trim
  fi
  if [ "$RBD" = 1 ]; then
    host_check rbd-image-changed rbd_image_changed
    host_check rbd-lock-taken rbd_lock_taken
  fi
  [ "$RESIZE" = 0 ] || host_check resize-answered resize_answered
  # qemu-img reads only LUKS; for plain images the guest's dm-crypt is the oracle.
  [ "$FORMAT" = luks1 ] || return 0
  qemu-img convert --object secret,id=sec0,file="$PASSFILE" \
    --image-opts driver=luks,key-secret=sec0,file.filename="$IMG" -O raw "$RUN/out.raw" ||
    die "qemu-img could not decrypt $IMG"
  host_check qemu-img-sees-plaintext plaintext_in_decrypted
  host_check qemu-img-pattern-a decrypted_region "$PAT_A_OFF" "$PAT_A_LEN" "$RUN/pat-a"
  host_check qemu-img-pattern-b decrypted_region "$PAT_B_OFF" "$PAT_B_LEN" "$RUN/pat-b"
  host_check qemu-img-zeroes decrypted_region "$PAT_C_OFF" "$PAT_C_LEN" "$RUN/pat-c-zeroed"
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
  log "$FORMAT image $IMG, payload offset $PAYLOAD sectors of 512 bytes; initramfs $(($(stat -c %s "$RUN/initramfs.cpio") >> 20)) MiB"
  [ "$RBD" = 0 ] || start_rbd_cluster
  start_backend
  t_boot=$(now)
  run_guest
  t_guest=$(now)
  stop_backend
  [ "$NBD" = 0 ] || stop_nbd_server
  [ "$RBD" = 0 ] || export_rbd_image
  check_guest_results
  host_checks
  t_end=$(now)

  local how="$FORMAT image, $SECTOR-byte sectors"
  [ "$FORMAT" != luks2 ] || how+=", made by $LUKS2_MAKER"
  [ -z "$PLAIN_IV" ] || [ "$FORMAT" != plain ] || how+=", $PLAIN_IV"
  [ "$BACKEND" != cryptblk ] || [ "$FORMAT" = plain ] || how+=", unlocked by $UNLOCK"
  case $NBD_SERVER in
    nbdkit) how+=", over NBD (nbdkit file plugin, unix socket)" ;;
    qemu-nbd) how+=", over NBD (qemu-nbd, TCP on 127.0.0.1, one connection shared by the queues)" ;;
    qemu-storage-daemon) how+=", over NBD (qemu-storage-daemon's NBD export, unix socket)" ;;
  esac
  [ "$RBD" = 0 ] || how+=", on Ceph RBD (single-node cluster, librbd)"
  echo "==== e2e-qemu summary (backend $BACKEND${SERVE_ARGS:+ ($SERVE_ARGS)}, $how, guest kernel $GUEST_KVER) ===="
  # shellcheck disable=SC2086 # counting words
  echo "guest checks passed: $GUEST_PASSES of $(set -- $EXPECTED_RESULTS && echo $#); host checks failed: ${HOST_FAILS:-none}"
  echo "times: guest kernel $(elapsed "$t_kernel0" "$t_kernel") s, guest run $(elapsed "$t_boot" "$t_guest") s" \
    "(guest uptime: init reached at ${BOOT_S:-?} s, first boot's checks done at ${REBOOT_S:-?} s;" \
    "after the reboot: second boot's checks done at ${END_S:-?} s), total $(elapsed "$t_start" "$t_end") s"
  echo "backend exit status: $BACKEND_EXIT; logs in $RUN"
  if [ -n "$GUEST_FAILS" ] || [ -n "$HOST_FAILS" ]; then
    [ -z "$GUEST_FAILS" ] || printf '%s\n' "$GUEST_FAILS" | sed '/^$/d; s/^/  guest: /'
    die "end-to-end test failed"
  fi
  # Keep the logs; the images and the guest archive are only worth keeping for a failure.
  rm -rf "$IMG" "$RUN/out.raw" "$RUN/initramfs" "$RUN/initramfs.cpio" "$RUN/fs-dump" "$RUN/img.before"
  echo "PASS"
}

# Without E2E_FORMAT, cryptblk gets eight runs that cover its code paths (the
# last four on NBD and RBD); each is this script again, with E2E_FORMAT set. A run with a backend
# that does not encrypt must fail on the ciphertext checks (and only there):
# otherwise the checks themselves are broken.
all_runs() {
  local status=0 t0 control=$WORK_DIR/e2e-negative-control.log
  t0=$(now)
  check_tools
  resolve_cryptblk
  export CRYPTBLK
  E2E_FORMAT=luks1 E2E_UNLOCK=key E2E_SERVE_ARGS='--crypto inline' E2E_RESIZE=1 \
    bash "${BASH_SOURCE[0]}" || status=1
  E2E_FORMAT=luks2 E2E_UNLOCK=passphrase E2E_SERVE_ARGS='--crypto inline --io pread' bash "${BASH_SOURCE[0]}" || status=1
  E2E_FORMAT=luks2 E2E_LUKS2_MAKER=cryptblk E2E_UNLOCK=passphrase E2E_SERVE_ARGS='--crypto inline --direct' \
    bash "${BASH_SOURCE[0]}" || status=1
  E2E_FORMAT=plain E2E_SECTOR=4096 E2E_PLAIN_IV='--iv-large-sectors --skip 8' \
    E2E_SERVE_ARGS='--crypto workers --split-threshold 16K --direct --allow-discards' \
    bash "${BASH_SOURCE[0]}" || status=1
  # The LUKS header read and the payload served through libnbd (issue #15).
  E2E_FORMAT=luks1 E2E_UNLOCK=passphrase E2E_NBD=1 E2E_SERVE_ARGS='--crypto inline --allow-discards' \
    bash "${BASH_SOURCE[0]}" || status=1
  # The same over TCP to qemu-nbd, which takes one client: the queues share
  # one connection; LUKS2 and the worker pool this time.
  E2E_FORMAT=luks2 E2E_UNLOCK=passphrase E2E_NBD=qemu-nbd E2E_SERVE_ARGS='--crypto workers --allow-discards' \
    bash "${BASH_SOURCE[0]}" || status=1
  # qemu-storage-daemon as the NBD server (the way to Ceph, iSCSI, qcow2 chains through
  # QEMU's block layer), on a plain image with the volume key.
  E2E_FORMAT=plain E2E_NBD=qsd E2E_SERVE_ARGS='--crypto inline' bash "${BASH_SOURCE[0]}" || status=1
  # The LUKS header and the payload in a Ceph cluster, through librbd (issue #16).
  E2E_FORMAT=luks1 E2E_UNLOCK=passphrase E2E_RBD=1 E2E_SERVE_ARGS='--crypto inline --allow-discards' \
    bash "${BASH_SOURCE[0]}" || status=1
  log "negative control: BACKEND=plaintext must fail (log: $control)"
  if BACKEND=plaintext E2E_FORMAT=luks1 bash "${BASH_SOURCE[0]}" >"$control" 2>&1; then
    log "FAIL: the checks passed a backend that stores plaintext"
    status=1
  elif grep -q 'host: FAIL image-has-no-plaintext' "$control" &&
    [ "$(sed -n 's/^  guest: E2E-RESULT FAIL \([a-z0-9-]*\).*/\1/p' "$control" | LC_ALL=C sort | xargs)" = \
      "$(printf '%s\n' dmcrypt-{luks,plain}-{files,pattern-a,pattern-b,zeroes} | LC_ALL=C sort | xargs)" ]; then
    log "negative control failed as it must (plaintext found, dm-crypt reads garbage, all else passed)"
    rm -rf "$WORK_DIR"/e2e-plaintext-luks1/{img.luks1,out.raw,initramfs,initramfs.cpio,fs-dump}
  else
    tail -20 "$control" >&2
    log "FAIL: the negative control failed for another reason than plaintext"
    status=1
  fi
  echo "==== e2e-qemu: $([ $status = 0 ] && echo PASS || echo FAILED), all runs in $(elapsed "$t0" "$(now)") s"
  return $status
}

if [ -z "${E2E_FORMAT:-}" ] && [ "$BACKEND" = cryptblk ]; then
  all_runs
else
  main "$@"
fi
