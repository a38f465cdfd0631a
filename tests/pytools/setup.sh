#!/bin/sh
# Install the Python reference tools the tests check rbuild's evidence with (securesystemslib:
# a standard DSSE implementation; spdx-tools, cyclonedx-python-lib and ntia-conformance-checker, the
# SBOM validators) in a virtualenv and print the path of its `python`, for
# RBUILD_PYTHON. Usage: tests/pytools/setup.sh [VENV_DIR]
set -eu
venv="${1:-${RBUILD_PYTOOLS_VENV:-$HOME/.cache/rbuild-pytools}}"
if [ ! -f "$venv/.installed-2" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'securesystemslib[crypto]==1.6.0' 'spdx-tools==0.8.5' \
        'cyclonedx-python-lib[json-validation]==11.12.0' 'ntia-conformance-checker==6.0.0'
    touch "$venv/.installed-2"
fi
echo "$venv/bin/python"
