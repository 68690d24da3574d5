#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, lint, check that the
# verifier builds without the HSM code, then unit and integration tests against real
# SoftHSM2 tokens (a fresh token per test, in a token folder private to this run) and
# swtpm simulators (one per test, on free ports, stopped at the end; checked below).
set -euo pipefail
cd "$(dirname "$0")/.."

softhsm-tests/install-deps.sh

echo "== format and lints" >&2
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

echo "== the verifier builds alone (no HSM, server or store code)" >&2
cargo build --lib --no-default-features
if cargo tree --no-default-features -e normal | grep -qE '^.*(cryptoki|axum|sqlx) v'; then
  echo "the verifier-only build pulls in server crates" >&2
  exit 1
fi

echo "== tests on SoftHSM2" >&2
run_dir=$(mktemp -d)
trap 'rm -rf "$run_dir"' EXIT
mkdir -p "$run_dir/tokens"
cat > "$run_dir/softhsm2.conf" <<CONF
directories.tokendir = $run_dir/tokens
objectstore.backend = file
log.level = ERROR
CONF
export SOFTHSM2_CONF="$run_dir/softhsm2.conf"
cargo test --all-targets
# every swtpm a test started must be gone, failed tests included
if pgrep -f 'swtpm socket.*keygate-test-swtpm' >/dev/null; then
  echo "swtpm processes outlived the tests:" >&2
  pgrep -af 'swtpm socket.*keygate-test-swtpm' >&2
  exit 1
fi

echo "== keygate bench runs (a smoke run; figures come from release builds)" >&2
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$run_dir/bench" cargo run --quiet -- bench --seconds 1 --clients 4 >/dev/null
