#!/usr/bin/env bash
# Installs everything fedcca needs into ./.venv (idempotent): the pinned torch and
# Flower, the project itself, and the Fashion-MNIST package where apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PINS=(torch==2.13.0 "flwr[simulation]==1.41.0" flwr-datasets==0.6.1)
STAMP="$VENV/.fedcca-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned torch and Flower, then fedcca (editable, with dev extras)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The pins first: a bare `torch` requirement would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$STAMP"
else
  echo "[setup] $VENV is up to date"
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$FMNIST" ]; then
  echo "[setup] Fashion-MNIST found in /usr/share/datasets/fashion-mnist"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "[setup] WARNING: Fashion-MNIST is missing and apt is not usable as root here." >&2
  echo "[setup]   Install the Debian package 'dataset-fashion-mnist', or put the four IDX .gz files" >&2
  echo "[setup]   in a folder and pass --run-config \"data-dir='/that/folder'\" (or set FEDCCA_DATA_DIR)." >&2
fi

# nftables: the firewall the deployment docs use; tests/test_deploy_hosts.py runs the recipe
# across network namespaces with it (and is skipped without it). Best effort, root with apt only.
if ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package nftables (for the multi-host deployment test)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null 2>&1 \
    || echo "[setup] nftables could not be installed: the multi-host deployment test will be skipped" >&2
fi
