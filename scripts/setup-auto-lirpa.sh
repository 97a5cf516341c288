#!/usr/bin/env bash
# Create .venv-auto-lirpa: certnet plus auto_LiRPA, the speed anchor of benchmarks/bounds_speed.py.
# The package index here holds auto_LiRPA up to 0.3, which pins torch < 1.13 and numpy < 2; it is
# installed without its pins (numpy < 2 for it) and benchmarks/auto_lirpa_compat.py bridges the
# three torch.onnx internals it imports that torch 2.x moved. Not a certnet dependency.
# Usage: scripts/setup-auto-lirpa.sh   then   .venv-auto-lirpa/bin/python benchmarks/bounds_speed.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-auto-lirpa
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}" "numpy<2"
"${pip[@]}" -e ".[onnx]" "numpy<2"   # onnx: benchmarks/vnncomp_bounds.py reads ONNX
"${pip[@]}" --no-deps "auto_LiRPA==${AUTO_LIRPA_VERSION:-0.3}" appdirs
