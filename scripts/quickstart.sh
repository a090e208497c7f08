#!/usr/bin/env bash
# Installs fedcca (scripts/setup.sh), then runs the default local simulation to completion:
#   bash scripts/quickstart.sh                                  # CCA Merge, defaults of pyproject.toml
#   bash scripts/quickstart.sh --run-config "strategy='fedavg'" # any extra `flwr run` arguments
#   bash scripts/quickstart.sh --compare                        # FedAvg, then CCAMerge, same seed and split
# Results: outputs/<strategy>-seed<seed>/{history.json,accuracy.png,checkpoints/}; with --compare
# outputs/compare/{fedavg,cca}/ and outputs/compare/compare.{png,md} (both curves, a table).
#
# Simulation resources (environment variables):
#   FEDCCA_NUM_CLIENTS  simulated SuperNodes (default 5)
#   FEDCCA_CLIENT_CPUS  CPU cores per ClientApp, an integer (default 2: one client at a time on 2 cores)
#   FEDCCA_CLIENT_GPUS  GPU share per ClientApp (default 0.0; e.g. 0.25 puts 4 clients on one GPU)
#   FEDCCA_PORT         port of the private SuperLink (default 39191)
#
# Nothing tracked is modified: Flower's state lives in ./.flwr (git-ignored; FLWR_HOME), the
# app's pyproject.toml has no [tool.flwr.federations] table for `flwr run` to migrate, and
# the SuperLink is started here (state in memory) and stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/setup.sh

COMPARE=0
if [[ "${1:-}" == "--compare" ]]; then
  COMPARE=1
  shift
fi
NUM_CLIENTS=${FEDCCA_NUM_CLIENTS:-5}
CLIENT_CPUS=${FEDCCA_CLIENT_CPUS:-2}
CLIENT_GPUS=${FEDCCA_CLIENT_GPUS:-0.0}
PORT=${FEDCCA_PORT:-39191}
CONNECTION=fedcca-local

export PATH="$ROOT/.venv/bin:$PATH"
export FLWR_HOME="$ROOT/.flwr"
# Everything the app needs is in .venv already: no `uv sync` per run (it would fetch torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/fedcca-ray-$UID}
mkdir -p "$FLWR_HOME" "$RAY_TMPDIR"

# A connection to our own SuperLink (explicit address: Flower never spawns a detached one).
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$PORT"
insecure = true
EOF

if .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
  echo "[quickstart] port $PORT already serves a SuperLink (not ours): stop it or set FEDCCA_PORT" >&2
  exit 1
fi

echo "[quickstart] starting SuperLink on 127.0.0.1:$PORT (log: .flwr/superlink.log)"
flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port "$PORT" \
  --disable-runtime-dependency-installation \
  > "$FLWR_HOME/superlink.log" 2>&1 &
SUPERLINK_PID=$!
stop_superlink() {
  # SIGTERM stops the SuperLink and the SuperExec / simulation processes it started.
  kill "$SUPERLINK_PID" 2>/dev/null || true
  wait "$SUPERLINK_PID" 2>/dev/null || true
}
trap stop_superlink EXIT

for _ in $(seq 150); do
  if .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$SUPERLINK_PID" 2>/dev/null || { echo "[quickstart] SuperLink exited; see .flwr/superlink.log" >&2; exit 1; }
  sleep 0.2
done

# One `flwr run` on our SuperLink, streaming its log; fails unless the run completed.
run_flwr() {
  echo "[quickstart] flwr run . $CONNECTION ($NUM_CLIENTS clients, $CLIENT_CPUS CPUs and $CLIENT_GPUS GPUs each) $*"
  local start run_id status
  start=$(date +%s)
  flwr run . "$CONNECTION" --stream \
    --federation-config "num-supernodes=$NUM_CLIENTS client-resources-num-cpus=$CLIENT_CPUS client-resources-num-gpus=$CLIENT_GPUS" \
    "$@" | tee "$FLWR_HOME/last-run.log"
  echo "[quickstart] finished in $(( $(date +%s) - start )) s"
  # `flwr run --stream` exits 0 even when the ServerApp failed: ask the SuperLink for the status.
  run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' "$FLWR_HOME/last-run.log" | head -n 1)
  [[ -n "$run_id" ]] || { echo "[quickstart] no run was started" >&2; return 1; }
  status=$(flwr ls "$CONNECTION" --run-id "$run_id" --format json | .venv/bin/python -c \
    "import json, sys; run = json.load(sys.stdin)['runs'][0]; print(run['status'], run.get('status-details', ''))")
  echo "[quickstart] run $run_id: $status"
  [[ "$status" == finished:completed* ]]
}

if [[ $COMPARE == 1 ]]; then
  # Same run config (seed, split, initial model, client randomness); only the aggregation differs.
  rm -rf outputs/compare/fedavg outputs/compare/cca  # this script's own comparison folders: a new comparison replaces them
  run_flwr "$@" --run-config "strategy='fedavg' out-dir='outputs/compare/fedavg'"
  run_flwr "$@" --run-config "strategy='cca' out-dir='outputs/compare/cca'"
  .venv/bin/python -m simulations.compare outputs/compare/fedavg outputs/compare/cca --out outputs/compare
  echo "[quickstart] comparison: outputs/compare/compare.png and outputs/compare/compare.md"
else
  run_flwr "$@"
fi
