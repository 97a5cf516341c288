#!/usr/bin/env bash
# Opt-in mutation testing of the soundness-critical modules (docs/testing.md); never part of
# the default test suite or CI. Usage: scripts/mutation.sh [--head] [module ...]
# (modules: rounding spectral masked_spectral checkpoint attacks bounds smooth scale_pad
# piecewise crown ibp relu_affine graph_step patches lipschitz_bounds certifiers; default all;
# bounds = the slices smooth .. lipschitz_bounds and the two __init__ files, in one run).
# Writes tests/mutation/results.json and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT_VERSION=3.8.1
if [ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mutmut"))' \
        2>/dev/null)" != "$MUTMUT_VERSION" ]; then
    .venv/bin/python -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python scripts/mutation.py "$@"
