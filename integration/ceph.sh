#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and measurements: one monitor on
# 127.0.0.1 (a free port chosen here), one OSD on the in-memory `memstore` object
# store, pool `rbd` of size 1, no manager (RBD I/O does not need one), no systemd:
# every file (config, keyrings, mon store, logs, pid files, admin sockets) lives in
# one directory, and stopping the cluster removes it.
#
# Authentication is cephx, as on real clusters: the client.admin key is in
# DIR/keyring, so the `--ceph-id`/`--ceph-keyring` path of the daemon is the one
# the tests exercise (with auth none a wrong or missing keyring would go unseen).
#
# As a command:
#   bash integration/ceph.sh run CMD [ARGS...]   # start in a temporary directory, run CMD
#       with CEPH_CONF exported, stop the cluster when CMD ends (or fails, or the script
#       is interrupted); exits with CMD's status
#   bash integration/ceph.sh start DIR [PID]     # start in DIR (created, must be empty);
#       prints DIR/ceph.conf on stdout. With PID: a watcher stops the cluster and removes
#       DIR once process PID is gone (the Rust tests' way to never leak a cluster)
#   bash integration/ceph.sh stop DIR            # stop it and remove DIR
# Sourced (by scripts): ceph_start DIR, ceph_stop DIR, ceph_pool (the pool's name).
#
#   bash integration/ceph.sh osd-kill DIR        # SIGKILL the OSD (nothing flushed)
#   bash integration/ceph.sh osd-start DIR       # start it again; waits until it is up
# Environment: CEPH_OBJECTSTORE (memstore, the default: in RAM, so an OSD killed loses
# everything; bluestore: a sparse file DIR/osd.0/block, kept across osd-kill/osd-start,
# for the tests that restart the OSD); CEPH_MEMSTORE_BYTES (the OSD's RAM store, default
# 1 GiB); CEPH_START_TIMEOUT (seconds, default 60). Needs ceph-mon, ceph-osd and ceph-common
# (integration/install-deps.sh): a missing tool fails, it never skips.
#
# Stop every librbd/librados client before the cluster: a client whose cluster vanished
# waits for it on exit.
# shellcheck shell=bash

# The pool every test image lives in.
# shellcheck disable=SC2034 # used by the scripts that source this file
ceph_pool=rbd

_ceph_log() { printf '[ceph] %s\n' "$*" >&2; }

_ceph_die() {
  printf '[ceph] FAIL: %s\n' "$*" >&2
  return 1
}

# A TCP port of 127.0.0.1 free right now (the monitor binds it a moment later; a
# port taken meanwhile makes ceph_start try another).
_ceph_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# _ceph_wait SECONDS CMD...: runs CMD until it succeeds, for at most SECONDS.
_ceph_wait() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

# _ceph_running PID: the process runs (a daemon that exited stays a zombie until
# init, which may be slow here, reaps it: that counts as gone).
_ceph_running() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

_ceph_conf() { # DIR PORT FSID
  cat >"$1/ceph.conf" <<EOF
[global]
fsid = $3
mon host = [v2:127.0.0.1:$2]
mon initial members = a
public network = 127.0.0.1/32
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $1/keyring
run dir = $1
admin socket = $1/\$name.asok
log file = $1/\$name.log
pid file = $1/\$name.pid
chdir = $1
# one OSD: every pool has one copy, placed on that OSD
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# a test machine's /tmp may be nearly full: the monitor must not refuse to start
mon data avail crit = 1
mon data avail warn = 2
client mount timeout = 30

[mon]
mon data = $1/mon.\$id

[osd]
osd data = $1/osd.\$id
osd max object name len = 256
osd max object namespace len = 64
EOF
  case ${CEPH_OBJECTSTORE:-memstore} in
    memstore)
      cat >>"$1/ceph.conf" <<EOF
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-1073741824}
EOF
      ;;
    bluestore)
      # A sparse 4 GiB file; small caches: a test machine, not a storage node.
      cat >>"$1/ceph.conf" <<EOF
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4294967296
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
bluestore fsck on mount = false
EOF
      ;;
    *) _ceph_die "CEPH_OBJECTSTORE=${CEPH_OBJECTSTORE} (memstore or bluestore)" ;;
  esac
}

# ceph_osd_kill DIR: SIGKILL the OSD and wait until it is gone.
ceph_osd_kill() {
  local pid i
  pid=$(cat "$1/osd.0.pid")
  kill -9 "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    _ceph_running "$pid" || { rm -f "$1/osd.0.pid"; return 0; }
    sleep 0.1
  done
  _ceph_die "the OSD (pid $pid) survived SIGKILL"
}

# ceph_osd_start DIR: starts the OSD again (its store must have survived: bluestore)
# and waits until the monitor sees it up.
ceph_osd_start() {
  local dir=$1
  export CEPH_CONF=$dir/ceph.conf
  ceph-osd -i 0 2>>"$dir/osd.0.err" ||
    { tail -5 "$dir/osd.0.log" >&2; _ceph_die "ceph-osd did not start again"; return 1; }
  _ceph_wait "${CEPH_START_TIMEOUT:-60}" _ceph_osd_up ||
    { tail -5 "$dir/osd.0.log" >&2; _ceph_die "the OSD never came up again"; return 1; }
}

# ceph_need: fails (never skips) when a tool the cluster needs is missing.
ceph_need() {
  local t missing=()
  for t in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd python3; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ ${#missing[@]} -eq 0 ] ||
    _ceph_die "missing: ${missing[*]} (run: sudo bash integration/install-deps.sh)"
}

# ceph_start DIR: starts the cluster in DIR and exports CEPH_CONF (DIR/ceph.conf).
ceph_start() {
  local dir=$1 tries port fsid osd_uuid t0=$SECONDS timeout=${CEPH_START_TIMEOUT:-60}
  ceph_need || return 1
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -z "$(ls -A "$dir")" ] || _ceph_die "$dir is not empty" || return 1
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)

  # The monitor, on a port free a moment ago; another if it was taken meanwhile.
  for tries in 1 2 3 4 5; do
    port=$(_ceph_free_port)
    rm -rf "${dir:?}"/*
    _ceph_conf "$dir" "$port" "$fsid"
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    # The OSD's key goes into the monitor's database with the others at mkfs.
    ceph-authtool "$dir/keyring" --gen-key -n osd.0 \
      --cap mon 'allow profile osd' --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" \
      >/dev/null 2>"$dir/mkfs.err" || { cat "$dir/mkfs.err" >&2; _ceph_die "ceph-mon --mkfs failed"; return 1; }
    ceph-mon -c "$dir/ceph.conf" -i a 2>"$dir/mon.a.err" ||
      { cat "$dir/mon.a.err" >&2; tail -5 "$dir/mon.a.log" >&2; _ceph_die "ceph-mon did not start"; return 1; }
    if _ceph_wait 10 ceph -c "$dir/ceph.conf" --connect-timeout 2 mon stat; then
      break
    fi
    _ceph_log "the monitor did not answer on port $port; another port"
    _ceph_kill "$dir/mon.a.pid"
    [ "$tries" -lt 5 ] || { _ceph_die "the monitor never answered (see $dir/mon.a.log)"; return 1; }
  done
  export CEPH_CONF=$dir/ceph.conf

  # The OSD: registered with the monitor under the uuid its mkfs records.
  ceph osd new "$osd_uuid" 0 >/dev/null ||
    { _ceph_die "ceph osd new failed"; return 1; }
  mkdir -p "$dir/osd.0"
  ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>"$dir/osd-mkfs.err" ||
    { cat "$dir/osd-mkfs.err" >&2; _ceph_die "ceph-osd --mkfs failed"; return 1; }
  ceph-osd -i 0 2>"$dir/osd.0.err" || { cat "$dir/osd.0.err" >&2; tail -5 "$dir/osd.0.log" >&2; _ceph_die "ceph-osd did not start"; return 1; }
  _ceph_wait "$timeout" _ceph_osd_up ||
    { tail -5 "$dir/osd.0.log" >&2; _ceph_die "the OSD never came up"; return 1; }

  # The pool (8 placement groups: there is no manager to scale them) for RBD images.
  ceph osd pool create "$ceph_pool" 8 8 >/dev/null 2>&1 ||
    { _ceph_die "ceph osd pool create failed"; return 1; }
  timeout "$timeout" rbd pool init "$ceph_pool" ||
    { _ceph_die "rbd pool init failed"; return 1; }
  _ceph_log "cluster up in $((SECONDS - t0)) s: CEPH_CONF=$CEPH_CONF (mon on 127.0.0.1:$port)"
}

_ceph_osd_up() {
  ceph --connect-timeout 2 osd dump -f json 2>/dev/null | grep -q '"osd":0,"uuid":"[^"]*","up":1'
}

# _ceph_kill PIDFILE: SIGTERM, then SIGKILL after 10 s.
_ceph_kill() {
  local pid i
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    _ceph_running "$pid" || return 0
    sleep 0.2
  done
  _ceph_log "$(basename "$1" .pid) ignored SIGTERM for 10 s: SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

# ceph_stop DIR: stops the daemons (the OSD first) and removes DIR.
ceph_stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  _ceph_kill "$dir/osd.0.pid"
  _ceph_kill "$dir/mon.a.pid"
  if [ -n "${KEEP:-}" ]; then _ceph_log "kept $dir"; else rm -rf "$dir"; fi
}

# _ceph_watch DIR PID: in the background, stops the cluster once PID has exited.
_ceph_watch() {
  local dir=$1 pid=$2 self
  self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ceph.sh
  setsid bash -c 'while kill -0 "$2" 2>/dev/null && [ -d "$1" ]; do sleep 1; done; bash "$0" stop "$1"' \
    "$self" "$dir" "$pid" </dev/null >/dev/null 2>&1 &
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case ${1:-} in
    start)
      [ $# -ge 2 ] || _ceph_die "usage: $0 start DIR [PID]"
      if ! ceph_start "$2"; then
        ceph_stop "$2"
        exit 1
      fi
      [ -z "${3:-}" ] || _ceph_watch "$(dirname "$CEPH_CONF")" "$3"
      echo "$CEPH_CONF"
      ;;
    stop)
      [ $# -eq 2 ] || _ceph_die "usage: $0 stop DIR"
      ceph_stop "$2"
      ;;
    osd-kill)
      [ $# -eq 2 ] || _ceph_die "usage: $0 osd-kill DIR"
      ceph_osd_kill "$2"
      ;;
    osd-start)
      [ $# -eq 2 ] || _ceph_die "usage: $0 osd-start DIR"
      ceph_osd_start "$2"
      ;;
    run)
      shift
      [ $# -ge 1 ] || _ceph_die "usage: $0 run CMD [ARGS...]"
      ceph_need
      CEPH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cryptblk-ceph.XXXXXX")
      trap 'ceph_stop "$CEPH_DIR"' EXIT
      trap 'exit 130' INT TERM
      ceph_start "$CEPH_DIR"
      status=0
      "$@" || status=$?
      exit $status
      ;;
    *)
      echo "usage: $0 run CMD [ARGS...] | start DIR [PID] | stop DIR | osd-kill DIR | osd-start DIR" >&2
      exit 2
      ;;
  esac
fi
