#!/usr/bin/env bash
# README main job: install, then train a GloRo 2C2F net on MNIST (l2 eps = 0.3), certify the
# 10k test points with the sound bound and print clean accuracy and VRA.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
out=${OUT:-runs/quickstart}
rm -rf "$out"
.venv/bin/certnet train --config gloro-quickstart-mnist-0.3-2c2f --out "$out"
.venv/bin/certnet certify "$out" --json "$out/certify.json" --curve "$out/certified_accuracy.png"
