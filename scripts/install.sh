#!/usr/bin/env bash
# Create .venv and install influence with what its tests need. Safe to run again: a venv already
# installed from this pyproject.toml and this script is left as it is (delete .venv/.installed
# to install again), so a second `bash scripts/test.sh` goes straight to the lint and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
    fi
    # torch/torchvision pinned, so pip does not reach for a newer multi-GB build.
    .venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" -e ".[test,ray]"
    echo "$stamp" > .venv/.installed
fi
# A headless Chromium for the app's browser tests (Debian packages; needs root, as in CI).
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
