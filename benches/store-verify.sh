#!/usr/bin/env bash
# How long `rbuild store verify` takes on a realised debian-bullseye store: build it once into a
# fresh store (or use STORE=DIR, already realised), then verify it with the page cache warm and,
# as root, cold (caches dropped first). Prints one line per run: the time and rbuild's summary.
#
#   benches/store-verify.sh [ROUNDS]        (default 2)
#
# The mirror is RBUILD_MIRROR, else the host's apt configuration (as rbuild itself chooses).
set -euo pipefail
rounds=${1:-2}
. "$(dirname "$0")/rbuild.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/rbuild-verify-bench.XXXXXX")
trap 'rm -rf "$work" 2>/dev/null || true' EXIT
store=${STORE:-}
if [ -z "$store" ]; then
    store=$work/store
    "$rbuild" realise debian-bullseye --store "$store" --json >/dev/null
fi

now() { date +%s.%N; }
run() { # LABEL
    local t0 t1 out
    t0=$(now)
    out=$("$rbuild" store verify --store "$store" 2>&1 | tail -n 1) || true  # damage is reported, not fatal
    t1=$(now)
    printf '%-22s %6.2f s   %s\n' "$1" "$(echo "$t1 - $t0" | bc)" "$out"
}
for i in $(seq 1 "$rounds"); do
    if [ "$(id -u)" = 0 ]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
        run "verify (cold cache)"
    fi
    run "verify (warm cache)"
done
