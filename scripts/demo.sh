#!/usr/bin/env bash
# Set up userfault in ./.venv (from nothing) and run the man-page demo: a region whose pages
# are filled on first touch by the native fault engine, one letter per fault.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/userfault demo "$@"
