#!/usr/bin/env bash
# Runs every fuzz target for a bounded time; for CI and for a quick local check.
#
#   fuzz/run.sh SECONDS_PER_TARGET
#
# Each target starts from a temporary copy of fuzz/corpus/<target>, so what a run finds is
# not written into the tree. A crash, leak or timeout fails the script (cargo fuzz exits
# non-zero) and leaves the reproducer in fuzz/artifacts/<target>/.
set -euo pipefail

if [[ $# -ne 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 SECONDS_PER_TARGET" >&2
    exit 2
fi
secs=$1 # not SECONDS: that one is bash's own clock

# cargo fuzz runs in the project root, where it finds fuzz/
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# sanitizer flags need nightly features; RUSTC_BOOTSTRAP enables them on a stable toolchain
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

tmp=$(mktemp -d)
created_lock=
cleanup() {
    rm -rf "$tmp"
    if [[ -n $created_lock ]]; then
        rm -f fuzz/Cargo.lock
    fi
}
trap cleanup EXIT

# Without a committed fuzz/Cargo.lock, start from the project's lock so the fuzz build uses
# the same dependency versions as the crate; it is removed again on exit.
if [[ ! -f fuzz/Cargo.lock && -f Cargo.lock ]]; then
    cp Cargo.lock fuzz/Cargo.lock
    created_lock=1
fi

targets=()
for f in fuzz/fuzz_targets/*.rs; do
    targets+=("$(basename "$f" .rs)")
done

# Build everything first, so the time limits below are spent fuzzing, not compiling.
cargo fuzz build

declare -A execs
for t in "${targets[@]}"; do
    corpus="$tmp/corpus-$t"
    mkdir -p "$corpus"
    if [[ -d fuzz/corpus/$t ]]; then
        cp -R "fuzz/corpus/$t/." "$corpus/"
    fi
    log="$tmp/$t.log"
    echo "=== $t: ${secs}s"
    # libFuzzer logs to stderr; keep it in the CI log and in $log for the stats.
    cargo fuzz run "$t" "$corpus" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tee "$log"
    execs[$t]=$(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
done

echo
echo "=== executions per target (${secs}s each)"
for t in "${targets[@]}"; do
    printf '%-12s %s\n' "$t" "${execs[$t]}"
done
