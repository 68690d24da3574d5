#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what is missing, lint, check that the
# verifier builds without the HSM code, then unit and integration tests against real
# SoftHSM2 tokens (a fresh token per test, in a token folder private to this run), swtpm
# simulators (one per test, on free ports, stopped at the end; checked below) and
# PostgreSQL (the server KEYGATE_TEST_PG_URL names, else a private throwaway cluster; a
# database per test).
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
# and every private PostgreSQL cluster (its watchdog stops it within a second of the end)
sleep 2
if pgrep -f 'postgres.*keygate-test-pg' >/dev/null; then
  echo "PostgreSQL clusters outlived the tests:" >&2
  pgrep -af 'postgres.*keygate-test-pg' >&2
  exit 1
fi

echo "== the README walk-through, as written" >&2
softhsm-tests/readme.sh

echo "== keygate bench runs on SQLite and PostgreSQL (a smoke run; figures come from release builds)" >&2
pg_url=${KEYGATE_TEST_PG_URL:-}
pg_dir=
if [ -z "$pg_url" ]; then
  read -r pg_dir pg_url < <(softhsm-tests/private-pg.sh start)
fi
trap 'softhsm-tests/private-pg.sh stop "$pg_dir" || true; rm -rf "$run_dir"' EXIT
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$run_dir/bench" cargo run --quiet -- bench --seconds 1 --runs 1 --clients 4 \
  --pg-url "$pg_url" >/dev/null
if [ -n "$pg_dir" ]; then
  softhsm-tests/private-pg.sh stop "$pg_dir"
  pg_dir=
fi

echo "== keygate bench --enroll-tcti runs (a smoke run against a throwaway swtpm)" >&2
# A port pair (server P, control P+1) with no listener on either, and an swtpm that is still
# alive once P answers; another pair on a clash (the cause of one red CI run: P+1 was taken).
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
swtpm_pid=
for _ in 1 2 3 4 5 6 7 8 9 10; do
  port=$((20000 + RANDOM % 12000))
  if listening "$port" || listening "$((port + 1))"; then continue; fi
  rm -rf "$run_dir/swtpm-bench" && mkdir -p "$run_dir/swtpm-bench"
  swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
    --tpmstate "dir=$run_dir/swtpm-bench" --flags not-need-init,startup-clear 2>/dev/null &
  swtpm_pid=$!
  for _ in $(seq 100); do
    if ! kill -0 "$swtpm_pid" 2>/dev/null; then break; fi
    if listening "$port"; then break 2; fi
    sleep 0.05
  done
  kill "$swtpm_pid" 2>/dev/null || true
  wait "$swtpm_pid" 2>/dev/null || true
  swtpm_pid=
done
if [ -z "$swtpm_pid" ]; then
  echo "could not start swtpm on a free port pair" >&2
  exit 1
fi
trap 'kill $swtpm_pid 2>/dev/null || true; softhsm-tests/private-pg.sh stop "$pg_dir" || true; rm -rf "$run_dir"' EXIT
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$run_dir/bench-enroll" cargo run --quiet -- bench --seconds 1 --runs 1 \
  --enroll-tcti "swtpm:host=127.0.0.1,port=$port" >/dev/null
kill "$swtpm_pid" 2>/dev/null || true

echo "== keygate bench --burst runs (a smoke run)" >&2
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$run_dir/bench-burst" cargo run --quiet -- bench --seconds 1 \
  --burst 200 >/dev/null

echo "== schemathesis against /openapi.json: every operation, no server error, nothing off the document" >&2
softhsm-tests/schemathesis.sh "${KEYGATE_SCHEMATHESIS_EXAMPLES:-25}"

echo "== fuzzing: each target for a bounded time (fuzz/README.md)" >&2
fuzz/run.sh "${KEYGATE_FUZZ_SECONDS:-30}"
