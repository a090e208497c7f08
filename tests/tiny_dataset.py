"""A tiny Fashion-MNIST-format dataset, the run config scaled down to it, and benchmark runs on it.

The dataset is written as real IDX files, so the apps read it through the same
``fedcca.data.load_dataset`` path as the real one (``data-dir`` in the run config), in this
process or in a Flower simulation.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.client_app import app as client_app
from fedcca.flower.local_grid import InProcessGrid
from simulations.harness import base_run_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS, CLASSES = 12, 4, 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Noise plus a bright band whose row depends on the class: learnable in a few steps.
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, :] += 180
    return images


def write_tiny_fashion_mnist(folder: Path, seed: int = 0) -> Path:
    """Write 120 train and 40 test 28x28 images (balanced classes) as Fashion-MNIST IDX files.

    Args:
        folder: Created if missing; receives the four ``*-ubyte.gz`` files.
        seed: Seed of the pixel noise.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = rng.permutation(np.repeat(np.arange(CLASSES), per_class))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", _images(labels, rng))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def tiny_run_config(data_dir: Path, out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The default run config scaled down to the tiny dataset (2 clients, tiny CNN).

    Args:
        data_dir: Folder of :func:`write_tiny_fashion_mnist`.
        out_dir: The run's ``out-dir``.
        **overrides: Further keys, ``_`` standing for ``-``.
    """
    config = base_run_config()
    config.update({
        "data-dir": str(data_dir), "out-dir": str(out_dir), "num-server-rounds": 2,
        "partitioning": "iid", "calibration-size": 20, "holdout-size": 10, "batch-size": 25,
        "max-examples-per-client": 0, "max-test-examples": 0, "width": 1, "lr": 0.05,
    })
    config.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return config


def client_grid(run_config: dict[str, Any], num_partitions: int = 2) -> InProcessGrid:
    """A grid of ``num_partitions`` nodes running our ClientApp (node id = partition + 1)."""
    return InProcessGrid.of_app(client_app, run_config, num_partitions)


def run_benchmark(folder: Path, module: str, arguments: Sequence[str], timeout: float) -> tuple[dict, Path]:
    """Run ``python -m module arguments`` on the tiny dataset from the repository root, as a user would.

    A subprocess, as a user runs it (``simulations/__init__.py`` sets ``OPENBLAS_NUM_THREADS``
    before numpy loads); output is captured, failures raise with its tail. The tiny
    dataset is written under ``folder`` and passed as ``--data-dir``; the JSON goes to
    ``folder/out`` (``--out``).

    Args:
        folder: A fresh temporary folder.
        module: e.g. ``"simulations.cost"``.
        arguments: Further command-line arguments.
        timeout: Seconds before the run is killed (a failure).

    Returns:
        ``(the JSON it wrote, its output folder)``.
    """
    data = write_tiny_fashion_mnist(folder / "data")
    out = folder / "out" / f"{module.rsplit('.', 1)[-1]}.json"
    done = subprocess.run([sys.executable, "-m", module, *arguments, "--data-dir", str(data), "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, timeout=timeout,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{module} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text()), out.parent
