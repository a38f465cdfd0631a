#!/usr/bin/env bash
# Race a cold `rbuild realise debian-bullseye` (empty store) against
# `mmdebstrap --mode=unshare --variant=debootstrap bullseye` for the same system, alternately, as
# the same user, on the same mirror, and print the times and the ratio rbuild/mmdebstrap.
#
#   benches/vs-mmdebstrap.sh [ROUNDS]          (default 2; needs mmdebstrap and uidmap)
#
# The mirror is RBUILD_MIRROR, else the host's apt configuration (as rbuild itself chooses).
set -euo pipefail
rounds=${1:-2}
. "$(dirname "$0")/rbuild.sh"
mirror=${RBUILD_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(sed -n 's|^URIs: *||p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $1}')
    [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
fi
[ -n "$mirror" ] || { echo "no mirror: set RBUILD_MIRROR" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed (apt install mmdebstrap)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/rbuild-bench.XXXXXX")
trap 'rm -rf "$work" 2>/dev/null || true' EXIT
now() { date +%s.%N; }
rb_total=0; mm_total=0
for i in $(seq 1 "$rounds"); do
    store="$work/store-$i"
    t0=$(now)
    RBUILD_LOG=rbuild_store=debug RBUILD_MIRROR="$mirror" "$rbuild" realise debian-bullseye --store "$store" -o "$work/result-$i" >/dev/null 2>"$work/rbuild-$i.log"
    t1=$(now)
    mmdebstrap --quiet --mode=unshare --variant=debootstrap bullseye "$work/mm-$i.tar" "$mirror" >/dev/null
    t2=$(now)
    rb=$(echo "$t1 - $t0" | bc); mm=$(echo "$t2 - $t1" | bc)
    # Durability: every registration waits for syncfs before its row is committed. The waits,
    # summed over all outputs (they overlap with other builds, so this bounds their cost).
    sync=$(grep -o 'synced to disk.*secs=[0-9.e-]*' "$work/rbuild-$i.log" | sed 's/.*secs=//' | awk '{s+=$1} END {printf "%.2f", s}')
    syncs=$(grep -c 'synced to disk' "$work/rbuild-$i.log" || true)
    printf 'round %d: rbuild %.1f s (syncfs waits %s s over %s outputs, %.1f%%), mmdebstrap %.1f s\n' \
        "$i" "$rb" "$sync" "$syncs" "$(echo "100 * $sync / $rb" | bc -l)" "$mm"
    rb_total=$(echo "$rb_total + $rb" | bc); mm_total=$(echo "$mm_total + $mm" | bc)
    # Between rounds, drop the stores so every rbuild run is cold.
    "$rbuild" gc --store "$store" >/dev/null 2>&1 || true
    rm -rf "$store" "$work/mm-$i.tar" 2>/dev/null || unshare --map-auto --map-root-user rm -rf "$store" 2>/dev/null || true
done
ratio=$(echo "scale=3; $rb_total / $mm_total" | bc)
printf 'total: rbuild %.1f s, mmdebstrap %.1f s, ratio rbuild/mmdebstrap = %s (below 1.0: rbuild is faster)\n' "$rb_total" "$mm_total" "$ratio"
