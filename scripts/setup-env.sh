#!/usr/bin/env bash
# Create the project-local environment .venv and install certnet into it.
# Usage: scripts/setup-env.sh [extra]   (extra = dev for the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extra=${1:+[$1]}
# torch is pinned to the CPU build available offline here; any torch>=2.2 works.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
