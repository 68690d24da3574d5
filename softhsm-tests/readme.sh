#!/usr/bin/env bash
# Runs the README's walk-through as written: command 1's service (here on the debug build,
# a free port and a data folder of its own), then the shell blocks of "Five minutes with
# curl", "The same from the command line" and "Enrolling a machine with its TPM", with
# these substitutions only: the admin token the service printed, free ports for 8080, 8081
# and 2321/2322, and the debug binary for target/release/keygate (no release build). Fails
# when a command fails, and when the walk-through left a file in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/keygate"
[ -x "$bin" ] || { echo "readme.sh: build first ($bin)" >&2; exit 1; }
work=$(mktemp -d)
serve_pid=
# the walk-through's own background processes (its second service, swtpm) end with it;
# on a failure they are stopped here
cleanup() {
  local status=$?
  set +e
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null
  [ -n "${p3:-}" ] && pkill -f "port=$p3" 2>/dev/null
  # anything still running in the walk-through's scratch folders
  for d in /proc/[0-9]*; do
    case "$(readlink "$d/cwd" 2>/dev/null)" in "$work"/*) kill "${d#/proc/}" 2>/dev/null ;; esac
  done
  [ -n "${KEYGATE_README_KEEP:-}" ] || rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
before=$(git status --porcelain --untracked-files=all)

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null ||
      { echo "$p"; return; }
  done
}
p1=$(free_port); p2=$(free_port); p3=$(free_port)

# command 1, on the embedded defaults
env -u KEYGATE_CONFIG KEYGATE_DATA_DIR="$work/data" KEYGATE_LISTEN="127.0.0.1:$p1" \
  "$bin" serve > "$work/serve.out" 2> "$work/serve.log" &
serve_pid=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$p1/readyz" >/dev/null && break
  sleep 0.2
done
admin=$(sed -n 's/^KEYGATE_ADMIN_TOKEN=//p' "$work/serve.out")
[ -n "$admin" ] || { echo "readme.sh: no admin token from the service" >&2; cat "$work/serve.log" >&2; exit 1; }

# the walk-through's shell blocks, in order
awk '
  /^## / { section = $0 }
  /^```sh$/ && (section ~ /Five minutes|The same from the command line|Enrolling a machine/) { on = 1; next }
  /^```$/ { on = 0 }
  on { print }
' README.md > "$work/walk.sh"
[ "$(grep -c . "$work/walk.sh")" -gt 40 ] || { echo "readme.sh: the blocks were not found" >&2; exit 1; }
sed -i \
  -e "s|^export KEYGATE_TOKEN=kg_\.\.\..*|export KEYGATE_TOKEN=$admin|" \
  -e "s|^cargo build --release -q .*|:|" \
  -e "s|\"\$KEYGATE_SRC/target/release/keygate\"|\"$bin\"|g" \
  -e "s|\"\$KEYGATE_SRC\"/target/release/keygate|\"$bin\"|g" \
  -e "s/8080/$p1/g; s/8081/$p2/g; s/2321/$p3/g; s/2322/$((p3 + 1))/g" \
  "$work/walk.sh"
env -u KEYGATE_CONFIG -u KEYGATE_ADDR -u KEYGATE_TOKEN -u KEYGATE_DATA_DIR TMPDIR="$work" \
  bash -euo pipefail "$work/walk.sh" > "$work/walk.out" 2>&1 || {
  echo "readme.sh: the walk-through failed; its last lines:" >&2
  tail -n 30 "$work/walk.out" >&2
  exit 1
}
after=$(git status --porcelain --untracked-files=all)
if [ "$before" != "$after" ]; then
  echo "readme.sh: the walk-through changed the checkout:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "readme.sh: the README walk-through ran as written ($(grep -c . "$work/walk.sh") lines)" >&2
