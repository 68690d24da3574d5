#!/usr/bin/env bash
# openapi-spec-validator, then schemathesis against a real `keygate serve` (embedded SoftHSM2 token, SQLite) and its own
# /openapi.json: every operation, a bounded number of generated requests each (positive
# and negative data), authenticated as the admin. It fails on any server error and on any
# answer the document does not describe (status, media type, body schema, headers).
#
#   softhsm-tests/schemathesis.sh [MAX_EXAMPLES]   (default 30; the binary: $CARGO_TARGET_DIR or target, /debug/keygate)
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-30}
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'schemathesis==4.32.5' 'openapi-spec-validator==0.7.2'
fi
bin=${KEYGATE_BIN:-${CARGO_TARGET_DIR:-target}/debug/keygate}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# warnings, and why a request was answered 503 (a busy device is logged at debug)
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$dir/data" KEYGATE_LISTEN="127.0.0.1:$port" \
  KEYGATE_LOG="warn,keygate::api::error=debug" \
  "$bin" serve >"$dir/out" 2>"$dir/log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 300); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$(sed -n 's/^KEYGATE_ADMIN_TOKEN=//p' "$dir/out")
[ -n "$token" ] || { echo "no admin token from the embedded start" >&2; cat "$dir/log" >&2; exit 1; }
# the document itself is valid OpenAPI
curl -fsS "http://127.0.0.1:$port/openapi.json" >"$dir/openapi.json"
"$venv/bin/openapi-spec-validator" "$dir/openapi.json"
if ! "$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --max-examples "$examples" --header "Authorization: Bearer $token" \
  --request-timeout 10 --generation-deterministic --no-color; then
  # the server's side of a failure: what it logged (refusals of bad input left out)
  echo "== the server's log under schemathesis (last warnings and errors)" >&2
  grep -E ' (WARN|ERROR|DEBUG) ' "$dir/log" | grep -v 'refused' | tail -n 40 >&2 || true
  exit 1
fi
# the server is still alive and its log has no server-side error
curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null
if grep -E ' ERROR ' "$dir/log"; then
  echo "the server logged errors under schemathesis" >&2
  exit 1
fi
