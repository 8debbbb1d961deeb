#!/usr/bin/env bash
# Install (if needed), lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
# One worker per core, each test file on one worker (its module fixtures built once), the
# longest files first (tests/conftest.py: LONGEST_FIRST); the slowest tests are listed at the
# end, to see where the suite's time goes.
.venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder --durations=15 "$@"
