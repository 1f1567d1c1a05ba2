#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the tools the tests use as
# oracles and peers (cryptsetup, QEMU, qemu-storage-daemon), runs every Rust
# test (unit, socket, interop), then the end-to-end scripts under
# integration/. Nothing is skipped: a missing tool fails the run.
set -euo pipefail
cd "$(dirname "$0")"

bash integration/install-deps.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# The end-to-end scripts use the debug binary that `cargo test` builds:
# they test behaviour, and a guest under TCG is far slower than the daemon.
cargo test --locked --no-fail-fast 2>&1 | tee "$log" || status=1

passed=$(awk '/^test result:/ {sum += $4} END {print sum + 0}' "$log")
failed=$(awk '/^test result:/ {sum += $6} END {print sum + 0}' "$log")

for script in integration/e2e-*.sh; do
  [ -e "$script" ] || continue
  echo "=== $script"
  if CRYPTBLK="$PWD/target/debug/cryptblk" bash "$script"; then
    passed=$((passed + 1))
  else
    echo "FAILED: $script"
    failed=$((failed + 1))
    status=1
  fi
done

echo "cryptblk: $passed passed, $failed failed"
exit $status
