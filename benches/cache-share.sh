#!/usr/bin/env bash
# How long sharing a recipe (debian-bullseye unless named) through each kind of binary cache
# takes: build once into a
# store, push the closure to a directory, to a BuildGrid (REAPI) and to an OCI registry (Debian's
# docker-registry, plain HTTP) on loopback, push again (nothing new), then substitute into empty
# stores with a dead mirror. Prints one line per step: its time, and rbuild's peak RSS (GNU
# time's: the largest of rbuild and the processes it waits for).
#
#   benches/cache-share.sh [RECIPE…]  (needs BuildGrid: RBUILD_BGD or tests/buildgrid/setup.sh;
#                                      docker-registry and GNU time)
#
# The mirror is RBUILD_MIRROR, else the host's apt configuration (as rbuild itself chooses).
set -euo pipefail
. "$(dirname "$0")/rbuild.sh"
[ -x /usr/bin/time ] || { echo "GNU time is not installed (apt install time)" >&2; exit 1; }
bgd=${RBUILD_BGD:-$("$here/tests/buildgrid/setup.sh")}
work=$(mktemp -d "${TMPDIR:-/tmp}/rbuild-cache-bench.XXXXXX")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed "s/127.0.0.1:50051/127.0.0.1:$port/" "$here/tests/buildgrid/buildgrid.yml" >"$work/bg.yml"
(cd "$work" && exec "$bgd" server start "$work/bg.yml" >"$work/bgd.log" 2>&1) &
bg_pid=$!
reg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/registry" "$reg_port" >"$work/registry.yml"
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
trap 'kill $bg_pid $reg_pid 2>/dev/null || true; rm -rf "$work" 2>/dev/null || true' EXIT
for p in $port $reg_port; do
    for _ in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break
        sleep 0.1
    done
done

now() { date +%s.%N; }
step() { # LABEL COMMAND...
    local label=$1; shift
    local t0 t1
    t0=$(now)
    local out
    out=$(/usr/bin/time -o "$work/rss" -f '%M' "$@" 2>&1 | tail -n 1)
    t1=$(now)
    printf '%-44s %6.2f s %5d MiB   %s\n' "$label" "$(echo "$t1 - $t0" | bc)" \
        "$(($(tail -n 1 "$work/rss") / 1024))" "$out"
}
"$rbuild" key generate bench "$work/k.sec" "$work/k.pub" 2>/dev/null
for recipe in "${@:-debian-bullseye}"; do
    echo "== $recipe"
    mkdir -p "$work/$recipe"
    step "build (cold)" "$rbuild" realise "$recipe" --store "$work/$recipe/a" --json
    printf '%-44s %s\n' "store after the cold build" "$(du -sh "$work/$recipe/a" | cut -f1)"
    for cache in "file://$work/$recipe/shared" "grpc://127.0.0.1:$port" "docker://127.0.0.1:$reg_port/rbuild/$recipe"; do
        kind=${cache%%:*}
        step "push closure to $kind" "$rbuild" cache push "$recipe" --store "$work/$recipe/a" --to "$cache" --secret-key "$work/k.sec"
        step "push again to $kind" "$rbuild" cache push "$recipe" --store "$work/$recipe/a" --to "$cache" --secret-key "$work/k.sec"
        step "substitute from $kind (empty store)" "$rbuild" realise "$recipe" --store "$work/$recipe/b-$kind" --json \
            --mirror http://127.0.0.1:9/dead --substituter "$cache" --trusted-key "$work/k.pub"
        # The image's closure holds the tree, not the ^rootfs tar (the layer is made from the
        # tree): the tar is made from the substituted tree, unless it was pushed too.
        step "substitute ^rootfs from $kind (empty store)" "$rbuild" realise "$recipe^rootfs" --store "$work/$recipe/c-$kind" --json \
            --mirror http://127.0.0.1:9/dead --substituter "$cache" --trusted-key "$work/k.pub"
        step "push ^rootfs to $kind" "$rbuild" cache push "$recipe^rootfs" --store "$work/$recipe/c-$kind" --to "$cache" --secret-key "$work/k.sec"
        step "substitute ^rootfs again (empty store)" "$rbuild" realise "$recipe^rootfs" --store "$work/$recipe/d-$kind" --json \
            --mirror http://127.0.0.1:9/dead --substituter "$cache" --trusted-key "$work/k.pub"
    done
done
