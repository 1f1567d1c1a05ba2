#!/usr/bin/env bash
# Part of test.sh: builds every fuzz target as a plain binary (stable Rust,
# no sanitizer, no coverage) and runs each over its seed corpus plus a few
# thousand random mutations, so that no target can rot unnoticed: one that
# no longer builds, or that crashes on its own seeds, fails the test run.
# Real fuzzing (coverage-guided, sanitized, minutes per target) is
# integration/fuzz.sh.
set -euo pipefail
LOG_TAG=fuzz-smoke
# shellcheck source=integration/lib.sh
. "$(dirname "$0")/lib.sh"

RUNS=${FUZZ_SMOKE_RUNS:-5000}
SECONDS_EACH=10
cd "$REPO_DIR"
cargo build --locked --manifest-path fuzz/Cargo.toml --bins
mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^cryptblk-fuzz$')
[ "${#targets[@]}" -ge 4 ] || die "found only ${#targets[@]} fuzz targets in fuzz/Cargo.toml"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for t in "${targets[@]}"; do
  seed_corpus "$t" "$work/$t"
  seeds=$(find "$work/$t" -type f | wc -l)
  [ "$seeds" -gt 0 ] || die "no seeds for $t"
  if out=$(cd "$work" && timeout 300 "$REPO_DIR/fuzz/target/debug/$t" -runs="$RUNS" -max_total_time="$SECONDS_EACH" \
    -rss_limit_mb=2048 -timeout=10 "$work/$t" 2>&1); then
    log "$t: $seeds seeds, up to $RUNS runs or ${SECONDS_EACH}s, no crash"
  else
    printf '%s\n' "$out" | tail -30 >&2
    log "FAIL: $t crashed or timed out (reproduce: fuzz/target/debug/$t <input>)"
    failed=1
  fi
done
exit "$failed"
