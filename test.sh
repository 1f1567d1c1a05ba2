#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the tools the tests use as
# oracles and peers (cryptsetup, QEMU, qemu-storage-daemon), checks formatting
# and lints, runs every Rust test (unit, socket, interop), then the end-to-end
# scripts under integration/. Nothing is skipped: a missing tool fails the run.
set -euo pipefail
cd "$(dirname "$0")"

bash integration/install-deps.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
passed=0
failed=0

check() { # name command...: a check that counts as one test
  local name=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
  else
    echo "FAILED: $name"
    failed=$((failed + 1))
    status=1
  fi
}

check "cargo fmt --check" cargo fmt --all -- --check
check "cargo clippy" cargo clippy --locked --all-targets -- -D warnings
# The fuzz targets are a crate of their own: build them and run each over its
# seeds for seconds, so that none can rot unnoticed when the library changes.
check "fuzz targets build and run on their seeds" env -u FUZZ_SMOKE_RUNS bash integration/fuzz-smoke.sh

# A build that fails must not let the end-to-end scripts run a stale binary.
if ! cargo test --locked --features cryptblk-core/external-tools --no-run; then
  echo "FAILED: the tests do not build"
  echo "cryptblk: $passed passed, $((failed + 1)) failed"
  exit 1
fi

# The end-to-end scripts use the debug binary that `cargo test` builds:
# they test behaviour, and a guest under TCG is far slower than the daemon.
cargo test --locked --features cryptblk-core/external-tools --no-fail-fast 2>&1 | tee "$log" || status=1

passed=$((passed + $(awk '/^test result:/ {sum += $4} END {print sum + 0}' "$log")))
failed=$((failed + $(awk '/^test result:/ {sum += $6} END {print sum + 0}' "$log")))
# A test binary that crashed (a signal, an abort) prints no "test result"
# line: count each one as a failure rather than let it vanish.
crashed=$(grep -c "process didn't exit successfully" "$log" || true)
reported=$(grep -c '^test result: FAILED' "$log" || true)
if [ "$crashed" -gt "$reported" ]; then
  echo "FAILED: $((crashed - reported)) test binaries crashed without a result"
  failed=$((failed + crashed - reported))
fi

# Exactly these scripts, each with an environment cleared of the knobs that
# would change what it tests.
E2E_SCRIPTS=(integration/e2e-qemu.sh integration/e2e-reconnect.sh integration/e2e-migrate.sh)
KNOBS=(BACKEND E2E_FORMAT E2E_SERVE_ARGS E2E_PROFILE E2E_DEBUG E2E_APPEND E2E_UNLOCK E2E_SECTOR
  E2E_LUKS2_MAKER E2E_PLAIN_IV E2E_RESIZE E2E_NBD E2E_RBD E2E_TIMEOUT WORK_DIR
  RECONNECT_RUN RECONNECT_KILLS RECONNECT_PROGRESS RECONNECT_TIMEOUT
  MIGRATE_RUN MIGRATE_PROGRESS MIGRATE_TIMEOUT)
unset_knobs=()
for k in "${KNOBS[@]}"; do unset_knobs+=(-u "$k"); done
for script in "${E2E_SCRIPTS[@]}"; do
  echo "=== $script"
  if env "${unset_knobs[@]}" CRYPTBLK="$PWD/target/debug/cryptblk" bash "$script"; then
    passed=$((passed + 1))
  else
    echo "FAILED: $script"
    failed=$((failed + 1))
    status=1
  fi
done

echo "cryptblk: $passed passed, $failed failed"
exit $status
