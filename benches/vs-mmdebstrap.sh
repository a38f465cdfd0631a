#!/usr/bin/env bash
# Race a cold `rbuild realise debian-SUITE` (empty store) against
# `mmdebstrap --mode=unshare --variant=debootstrap SUITE` for the same system, alternately, as
# the same user, on the same mirror; then time a warm realise (everything in the store).
# Prints every round, then per suite the medians, the ratio of the medians rbuild/mmdebstrap and
# rbuild's peak RSS (the largest of rbuild and the processes it waits for, from GNU time).
#
# Each round starts after the previous round's files are deleted, flushed, and a pause of
# PAUSE seconds (default 65): ext4 skips inodes freed in the last minute when it allocates new
# ones, which made a round that followed a deletion up to twice as slow, for either tool.
#
#   benches/vs-mmdebstrap.sh [ROUNDS] [SUITE…]   (default: 3 bullseye; needs mmdebstrap, uidmap
#                                                 and GNU time)
#
# The mirror is RBUILD_MIRROR, else the host's apt configuration (as rbuild itself chooses).
set -euo pipefail
rounds=${1:-3}
pause=${PAUSE:-65}
shift || true
suites=("${@:-bullseye}")
. "$(dirname "$0")/rbuild.sh"
mirror=${RBUILD_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(sed -n 's|^URIs: *||p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $1}')
    [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
fi
[ -n "$mirror" ] || { echo "no mirror: set RBUILD_MIRROR" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed (apt install mmdebstrap)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time is not installed (apt install time)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/rbuild-bench.XXXXXX")
trap 'rm -rf "$work" 2>/dev/null || unshare --map-auto --map-root-user rm -rf "$work" 2>/dev/null || true' EXIT
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# `timed FILE CMD…`: run CMD, append "SECONDS MAXRSS_KB" to FILE.
timed() { local f=$1; shift; /usr/bin/time -a -o "$f" -f '%e %M' "$@"; }

summary=()
sync
sleep "$pause"
for suite in "${suites[@]}"; do
    rm -f "$work"/{rb,mm,warm}.times
    for i in $(seq 1 "$rounds"); do
        store="$work/store-$suite-$i"
        timed "$work/rb.times" env RBUILD_MIRROR="$mirror" "$rbuild" realise "debian-$suite" --store "$store" >/dev/null 2>"$work/rbuild.log"
        timed "$work/warm.times" "$rbuild" realise "debian-$suite" --store "$store" --offline >/dev/null 2>&1
        timed "$work/mm.times" mmdebstrap --quiet --mode=unshare --variant=debootstrap "$suite" "$work/mm.tar" "$mirror" >/dev/null
        printf '%s round %d: rbuild cold %s s (peak RSS %s KiB), warm %s s; mmdebstrap %s s\n' "$suite" "$i" \
            $(tail -n1 "$work/rb.times") "$(tail -n1 "$work/warm.times" | cut -d' ' -f1)" "$(tail -n1 "$work/mm.times" | cut -d' ' -f1)"
        # Between rounds, drop the store so every cold run is cold, then let the freed inodes age.
        rm -rf "$store" "$work/mm.tar" 2>/dev/null || unshare --map-auto --map-root-user rm -rf "$store" 2>/dev/null || true
        sync
        sleep "$pause"
    done
    rb=$(cut -d' ' -f1 "$work/rb.times" | median)
    mm=$(cut -d' ' -f1 "$work/mm.times" | median)
    warm=$(cut -d' ' -f1 "$work/warm.times" | median)
    rss=$(cut -d' ' -f2 "$work/rb.times" | sort -n | tail -n1)
    summary+=("$(printf '%s: median of %d: rbuild cold %.1f s, mmdebstrap %.1f s, ratio %.2f; warm %.2f s; rbuild peak RSS %d MiB' \
        "$suite" "$rounds" "$rb" "$mm" "$(echo "$rb / $mm" | bc -l)" "$warm" "$((rss / 1024))")")
done
printf '%s\n' "${summary[@]}"
