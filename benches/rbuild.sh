# Sourced by the bench scripts: `here` (the repository) and `rbuild` (RBUILD, else the release
# build, made first if it is missing).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rbuild=${RBUILD:-$here/target/release/rbuild}
if [ ! -x "$rbuild" ]; then
    (cd "$here" && cargo build --release -q -p rbuild)
fi
