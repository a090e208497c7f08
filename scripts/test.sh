#!/usr/bin/env bash
# Runs the test suite (after making sure the environment is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] running pytest"
exec .venv/bin/python -m pytest -q "$@"
