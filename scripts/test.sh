#!/usr/bin/env bash
# README test command: install with the dev extras, lint, build the docs, run the default (fast) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh dev
.venv/bin/ruff check src tests benchmarks
# the documentation site (mkdocs.yml, docs/): strict, so a broken link or anchor fails here
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "${TMPDIR:-/tmp}/certnet-site"
.venv/bin/python -m pytest -q "$@"
