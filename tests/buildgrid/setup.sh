#!/bin/sh
# Install BuildGrid (the REAPI server the tests run as a remote cache) in a virtualenv and print
# the path of its `bgd`, for RBUILD_BGD. Usage: tests/buildgrid/setup.sh [VENV_DIR]
set -eu
venv="${1:-${RBUILD_BUILDGRID_VENV:-$HOME/.cache/rbuild-buildgrid}}"
if [ ! -x "$venv/bin/bgd" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'buildgrid==0.4.4'
fi
echo "$venv/bin/bgd"
