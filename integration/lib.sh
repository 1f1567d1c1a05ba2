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
