#!/usr/bin/env bash
# README test command: install with the dev extras, lint, run the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh dev
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
