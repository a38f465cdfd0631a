#!/usr/bin/env bash
# Race eight one-line `run` layers on debian-SUITE: `rbuild realise` of a layered recipe against
# `podman build` of the equivalent Containerfile from the same base image, alternately, as the
# same user. podman runs in its best configuration here: rootless, native overlay storage, runc,
# no network. Each round's layers write new content, so neither tool reuses a layer of an
# earlier round. Prints every round, then the medians and what each round added to rbuild's
# store and to podman's storage.
#
#   benches/layers-vs-podman.sh [ROUNDS] [SUITE]   (default: 3 bullseye; run it as the
#                                                   unprivileged user who builds; needs podman,
#                                                   runc, uidmap and GNU time)
#
# The base is realised first (from RBUILD_MIRROR, else the host's apt configuration) and loaded
# into podman's storage; neither is timed.
set -euo pipefail
rounds=${1:-3}
suite=${2:-bullseye}
layers=8
. "$(dirname "$0")/rbuild.sh"
command -v podman >/dev/null || { echo "podman is not installed (apt install podman runc)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "GNU time is not installed (apt install time)" >&2; exit 1; }

# Lowercase: podman names an image it pulls from a layout after the layout's path.
work="${TMPDIR:-/tmp}/rbuild-layers-$$-$RANDOM"
mkdir "$work"
pod() {
    podman --root "$work/podman-root" --runroot "$work/podman-run" --storage-driver overlay \
        --runtime runc --cgroup-manager cgroupfs --events-backend none "$@"
}
cleanup() {
    pod unshare rm -rf "$work/podman-root" 2>/dev/null || true
    rm -rf "$work" 2>/dev/null || unshare --map-auto --map-root-user rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT
median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
mib() { du -sm "$1" 2>/dev/null | cut -f1; }
pod_mib() { pod unshare du -sm "$work/podman-root" 2>/dev/null | cut -f1; }

store="$work/store"
"$rbuild" realise "debian-$suite" --store "$store" -o "$work/base" >/dev/null 2>"$work/base.log" ||
    { cat "$work/base.log" >&2; exit 1; }
pod pull -q "oci:$work/base" >/dev/null
pod tag "$(pod images -q | head -n1)" localhost/rbuild-base
mkdir -p "$work/recipe" "$work/context"

for i in $(seq 1 "$rounds"); do
    {
        echo "base = \"debian-$suite\""
        for n in $(seq 1 $layers); do printf '\n[[layers]]\nrun = ["echo layer%s-round%s > /etc/layer%s"]\n' "$n" "$i" "$n"; done
    } > "$work/recipe/layers.toml"
    {
        echo "FROM localhost/rbuild-base"
        for n in $(seq 1 $layers); do echo "RUN echo layer$n-round$i > /etc/layer$n"; done
    } > "$work/context/Containerfile"
    before=$(mib "$store")
    /usr/bin/time -a -o "$work/rb.times" -f '%e' \
        "$rbuild" realise "$work/recipe/layers.toml" --store "$store" --offline >/dev/null 2>"$work/rb.log" ||
        { cat "$work/rb.log" >&2; exit 1; }
    echo $(( $(mib "$store") - before )) >> "$work/rb.growth"
    before=$(pod_mib)
    /usr/bin/time -a -o "$work/pod.times" -f '%e' \
        podman --root "$work/podman-root" --runroot "$work/podman-run" --storage-driver overlay \
        --runtime runc --cgroup-manager cgroupfs --events-backend none \
        build -q --network none -t "layers-$i" "$work/context" >/dev/null 2>"$work/pod.log" ||
        { cat "$work/pod.log" >&2; exit 1; }
    echo $(( $(pod_mib) - before )) >> "$work/pod.growth"
    printf 'round %d: rbuild %s s (+%s MiB store), podman build %s s (+%s MiB storage)\n' "$i" \
        "$(tail -n1 "$work/rb.times")" "$(tail -n1 "$work/rb.growth")" \
        "$(tail -n1 "$work/pod.times")" "$(tail -n1 "$work/pod.growth")"
done
rb=$(median < "$work/rb.times")
pd=$(median < "$work/pod.times")
printf '%s, %d one-line run layers, median of %d: rbuild %.2f s (+%s MiB), podman build %.2f s (+%s MiB), ratio %.2f\n' \
    "$suite" "$layers" "$rounds" "$rb" "$(median < "$work/rb.growth")" "$pd" "$(median < "$work/pod.growth")" \
    "$(echo "$rb / $pd" | bc -l)"
