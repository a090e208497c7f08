#!/usr/bin/env bash
# Runs the test suite (after making sure the environment is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Tests use tiny models: one BLAS/OpenMP thread each is much faster than contended threads.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
echo "[test] running pytest"
exec .venv/bin/python -m pytest -q "$@"
