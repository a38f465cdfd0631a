#!/usr/bin/env bash
# Cold `rbuild realise debian-trixie` for amd64 alone, then for amd64+arm64 (the arm64 half's
# maintainer scripts under qemu-user from trixie's own archive), each into an empty store, as the
# user running this, on the same mirror; prints both times and the arm64 half's share.
#
#   benches/arch.sh          (the mirror: RBUILD_MIRROR, else the host's apt configuration)
set -euo pipefail
. "$(dirname "$0")/rbuild.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/rbuild-bench-arch.XXXXXX")
trap 'rm -rf "$work" 2>/dev/null || unshare --map-auto --map-root-user rm -rf "$work" 2>/dev/null || true' EXIT
now() { date +%s.%N; }
"$rbuild" lock debian-trixie --arch amd64,arm64 --output "$work/trixie.lock" >/dev/null
t0=$(now)
"$rbuild" realise debian-trixie --lock "$work/trixie.lock" --store "$work/one" >/dev/null
t1=$(now)
"$rbuild" realise debian-trixie --arch amd64,arm64 --lock "$work/trixie.lock" --store "$work/two" >/dev/null
t2=$(now)
one=$(echo "$t1 - $t0" | bc); two=$(echo "$t2 - $t1" | bc)
printf 'trixie amd64: %.1f s; amd64+arm64: %.1f s (the arm64 half adds %.1f s)\n' "$one" "$two" "$(echo "$two - $one" | bc)"
