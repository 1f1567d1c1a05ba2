#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and
# prints one line per target: executions, corpus size, crashes. Not part of
# test.sh (too slow); README quotes its figures.
#
#   integration/fuzz.sh            # every target, 60 s each
#   SECONDS_PER_TARGET=300 integration/fuzz.sh parse complete
#
# cargo-fuzz needs nightly compiler features; on a stable toolchain
# RUSTC_BOOTSTRAP=1 unlocks them (set here). Crashing inputs land in
# fuzz/artifacts/TARGET/ and make this script exit 1; replay one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
LOG_TAG=fuzz
# shellcheck source=integration/lib.sh
. "$(dirname "$0")/lib.sh"

SECONDS_PER_TARGET=${SECONDS_PER_TARGET:-60}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

cd "$REPO_DIR"
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

summary=()
failed=0
for t in "${targets[@]}"; do
  log "building and running $t for ${SECONDS_PER_TARGET}s"
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  seed_corpus "$t" "fuzz/corpus/$t"
  out=$(mktemp)
  set +e
  cargo fuzz run "$t" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
    -timeout=10 -print_final_stats=1 >"$out" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    failed=1
    tail -40 "$out" >&2
  fi
  summary+=("$(printf '%-12s %12s execs %8s/s  corpus %6s  artifacts %3s  exit %s' \
    "$t" "${execs:-?}" "${speed:-?}" "$corpus" "$crashes" "$rc")")
  rm -f "$out"
done
printf '%s\n' "${summary[@]}"
exit "$failed"
