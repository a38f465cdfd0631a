#!/usr/bin/env bash
# The test command (README.md's, and .ci/run's): `cargo test --workspace "$@"`, then one line per
# test, or part of a test, that was skipped and why (tests/skip.rs records them; under CI=true a
# skip is a failure instead). Exits with cargo's status.
set -uo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
mkdir -p "$target"
export RBUILD_SKIPPED_TESTS="$target/skipped-tests.log"
rm -f "$RBUILD_SKIPPED_TESTS"

cargo test --workspace "$@"
status=$?

if [ -s "$RBUILD_SKIPPED_TESTS" ]; then
    echo
    echo "skipped, so not checked by this run ($(awk '!seen[$0]++' "$RBUILD_SKIPPED_TESTS" | wc -l)):"
    awk '!seen[$0]++ { print "SKIPPED " $0 }' "$RBUILD_SKIPPED_TESTS"
fi
exit "$status"
