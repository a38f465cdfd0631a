#!/bin/sh
# Install the Python reference tools the tests check rbuild's evidence with (securesystemslib:
# a standard DSSE implementation) in a virtualenv and print the path of its `python`, for
# RBUILD_PYTHON. Usage: tests/pytools/setup.sh [VENV_DIR]
set -eu
venv="${1:-${RBUILD_PYTOOLS_VENV:-$HOME/.cache/rbuild-pytools}}"
if [ ! -f "$venv/.installed-1" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'securesystemslib[crypto]==1.6.0'
    touch "$venv/.installed-1"
fi
echo "$venv/bin/python"
