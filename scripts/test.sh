#!/usr/bin/env bash
# Set up everything the tests need from nothing, then lint, type-check and run the suite.
#   - Debian packages: nginx, redis-server (the tests start private instances themselves),
#     chromium (the HTML trace plot, run headless)
#   - ./.venv with userfault and its test extras (pip builds the C extension)
# Needs root for apt-get and for the kernel-mode userfaultfd tests. Set FIRECRACKER_BIN to a
# Firecracker >= 1.14 binary to also run the end-to-end microVM tests (skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
echo "== ruff"
.venv/bin/ruff check src tests benchmarks examples
echo "== mypy (strict)"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q "$@"
