"""A model zoo for the one-shot merging benchmarks: train a model once, reuse its checkpoint.

Each model is identified by every setting that changes its weights (:class:`ZooSpec` plus the
model's index). Checkpoints live under ``outputs/zoo/`` (git-ignored) as
``<name>-<hash>.pt`` holding the state dict, the settings and the training record, so a
rerun with the same settings loads instead of training.

Data layout for one experiment seed ``s``: a class-balanced calibration set is held out of
the training split first (never trained on), then ``train_subset`` examples of the rest are
drawn. ``split="same"``: every model trains on that whole subset (models differ only by
initialisation and data order). Other splits partition the subset into ``num_models``
disjoint shards with :func:`fedcca.data.partition`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcca.data import Dataset, DeviceLoader, calibration_split, normalize, partition
from fedcca.models import build_model
from fedcca.plotting import atomic_write
from fedcca.training import TrainingConfig, train

logger = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parents[1] / "outputs" / "zoo"
SPLITS: tuple[str, ...] = ("same", "iid", "80-20", "dirichlet", "class-disjoint")


@dataclass(frozen=True)
class ZooSpec:
    """Every setting that determines a group of models (one experiment seed).

    Args:
        dataset: Dataset name (see :func:`fedcca.data.load_dataset`).
        model: Architecture name (see :func:`fedcca.models.build_model`).
        width: Width multiplier.
        epochs: Training epochs per model.
        split: ``"same"`` or a partition scheme of :func:`fedcca.data.partition`.
        num_models: Number of shards (ignored for ``"same"``: model k is the same for every K).
        train_subset: Examples drawn from the training split (after the calibration hold-out);
            0 = all of them.
        calibration_size: Size of the held-out calibration set.
        seed: Experiment seed (data draw, partition and, with the index, initialisation).
        lr: Peak learning rate.
        batch_size: Training batch size.
        alpha: Dirichlet concentration (``split="dirichlet"`` only).
    """

    dataset: str = "fashion-mnist"
    model: str = "cnn"
    width: float = 1
    epochs: int = 2
    split: str = "same"
    num_models: int = 2
    train_subset: int = 10000
    calibration_size: int = 1000
    seed: int = 0
    lr: float = 0.05
    batch_size: int = 128
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {SPLITS}")

    def key(self, index: int) -> str:
        """A file-name-safe identifier of model ``index`` of this group."""
        fields = dataclasses.asdict(self)
        if self.split == "same":
            fields["num_models"] = 0  # model k does not depend on K: K=2 reuses K=8's first two
        blob = json.dumps({**fields, "index": index}, sort_keys=True)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.model}{self.width}-{self.split}-s{self.seed}-m{index}-{digest}"


@dataclass
class ZooData:
    """The index sets of one experiment seed (indices into the training split).

    Args:
        calibration: Held-out calibration examples.
        shards: Training examples of each model.
    """

    calibration: np.ndarray
    shards: list[np.ndarray]


def zoo_data(dataset: Dataset, spec: ZooSpec) -> ZooData:
    """Calibration set and per-model training indices for ``spec`` (deterministic in its seed).

    Args:
        dataset: The loaded dataset.
        spec: The group's settings.
    """
    calibration, remaining = calibration_split(dataset.train_labels, spec.calibration_size, seed=spec.seed)
    rng = np.random.default_rng(10_000 + spec.seed)
    if spec.train_subset:
        if spec.train_subset > len(remaining):
            raise ValueError(f"train_subset={spec.train_subset} but only {len(remaining)} training examples remain")
        remaining = np.sort(rng.choice(remaining, spec.train_subset, replace=False))
    if spec.split == "same":
        shards = [remaining] * spec.num_models
    else:
        shards = partition(dataset.train_labels, spec.num_models, spec.split, alpha=spec.alpha,
                           seed=spec.seed, indices=remaining)
    return ZooData(calibration, shards)


def init_seed(spec: ZooSpec, index: int) -> int:
    """Seed of model ``index``'s initialisation and data order: distinct per (seed, index)."""
    return 1_000 * spec.seed + index


def calibration_inputs(dataset: Dataset, data: ZooData) -> torch.Tensor:
    """The calibration images, normalised as the models saw their training data."""
    return normalize(dataset.train_images[torch.as_tensor(data.calibration)], dataset)


def load_or_train(dataset: Dataset, spec: ZooSpec, index: int, data: ZooData | None = None,
                  directory: Path = ZOO_DIR) -> tuple[nn.Module, dict]:
    """Model ``index`` of the group ``spec``: loaded from its checkpoint, or trained and saved.

    Training runs on the CPU with the current torch thread count.

    Args:
        dataset: The loaded dataset.
        spec: The group's settings.
        index: Which model of the group (0-based, < ``spec.num_models``).
        data: Precomputed :func:`zoo_data` of ``spec`` (computed when None).
        directory: Checkpoint folder.

    Returns:
        ``(model in eval mode, record)``; the record holds the settings and training metrics.
    """
    if not 0 <= index < spec.num_models:
        raise ValueError(f"model index {index} out of range for num_models={spec.num_models}")
    path = directory / f"{spec.key(index)}.pt"
    model = build_model(spec.model, dataset.num_classes, dataset.in_channels, spec.width)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["record"]
    data = zoo_data(dataset, spec) if data is None else data
    seed = init_seed(spec, index)
    torch.manual_seed(seed)
    model = build_model(spec.model, dataset.num_classes, dataset.in_channels, spec.width)
    loader = DeviceLoader.from_dataset(dataset, data.shards[index], spec.batch_size, device="cpu", seed=seed)
    start = time.perf_counter()
    metrics = train(model, loader, TrainingConfig(epochs=spec.epochs, lr=spec.lr), device="cpu")
    record = {"spec": dataclasses.asdict(spec), "index": index, "init_seed": seed,
              "train_examples": len(data.shards[index]), "train": metrics,
              "seconds": time.perf_counter() - start}
    logger.info("trained %s in %.1f s (loss %.3f)", path.name, record["seconds"], metrics["loss"])
    directory.mkdir(parents=True, exist_ok=True)
    # atomic: a killed run never leaves a truncated checkpoint
    atomic_write(path, lambda tmp: torch.save({"state_dict": model.state_dict(), "record": record}, tmp))
    return model.eval(), record
