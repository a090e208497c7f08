"""What the ClientApp and the ServerApp share: the run config, the model and the data.

Every process of a federation (the ServerApp and each ClientApp) derives the same
calibration set and client shards from the run config alone (``seed`` fixes every draw),
so nothing but model weights and statistics ever travels. The dataset and its split are
loaded once per process and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcca.data import (
    SCHEMES,
    Dataset,
    DeviceLoader,
    calibration_split,
    federated_split,
    load_dataset,
    normalize,
)
from fedcca.models import build_model
from fedcca.repair import REPAIRS
from fedcca.transforms import RIDGE_MODES

STRATEGIES: tuple[str, ...] = ("cca", "permute", "weight-matching", "fedavg")
REFERENCES: tuple[str, ...] = ("global", "largest", "first")
STATISTICS_SOURCES: tuple[str, ...] = ("client", "server")
MIN_SHARD_SIZE = 10  # smallest client shard federated_split may produce
CONFIG_TABLE = "[tool.flwr.app.config] of pyproject.toml"


class RunConfigError(ValueError):
    """A run-config key is missing, has the wrong type or an unsupported value."""


@dataclass(frozen=True)
class TaskConfig:
    """The run config of a fedcca app, typed and validated.

    Field ``x_y`` is the run-config key ``x-y`` (``[tool.flwr.app.config]`` in
    pyproject.toml, overridable with ``flwr run . --run-config "x-y=..."``).

    Args:
        strategy: "cca", "permute", "weight-matching" (CCAMerge with that method) or "fedavg".
        num_server_rounds: Rounds of federated training.
        fraction_train: Share of the connected nodes sampled for training each round.
        min_nodes: Nodes to wait for, and the fewest valid replies a round needs.
        round_timeout: Seconds to wait for the replies of one round.
        local_epochs: Local epochs per round.
        lr: Peak learning rate of the client's one-cycle SGD schedule.
        batch_size: Client training batch size.
        max_examples_per_client: Train on a fixed random subset of at most this many examples
            of the client's shard (0: the whole shard).
        model: A ``fedcca.models`` model name.
        width: Width multiplier of the model.
        dataset: A ``fedcca.data`` dataset name.
        data_dir: Folder of the dataset files ("" = ``$FEDCCA_DATA_DIR`` or the default).
        partitioning: "iid", "dirichlet", "class-disjoint" (or "80-20" for two clients).
        alpha: Dirichlet concentration.
        calibration_size: Public calibration examples, held out of the training split.
        max_test_examples: Evaluate the global model on the first this-many test examples
            (0: the whole test split).
        reference: CCAMerge reference: "global", "largest" or "first".
        stats: Where alignment statistics are computed: "client" or "server".
        ridge: CCA ridge; negative means the library default of ``ridge_mode``.
        ridge_mode: How the CCA ridge regularises: "trace" (default), "relative" or
            "absolute" (the paper's).
        repair: Pre-activation statistics correction after averaging: "none", "mean", "affine".
        zero_dead: Zero client features that are exactly 0 on the calibration data before aligning.
        balance: Balance each merged feature's incoming and outgoing weight norms.
        merge_guard: Keep a round's aligned merge only if its loss on the labelled calibration
            set is no higher than the plain average's (else use the plain average, logged).
        seed: Seeds the split, the initial model and every round's randomness.
        out_dir: Folder for history.json, checkpoints and the plot; ``{key}`` placeholders
            are filled from the run config, e.g. ``outputs/{strategy}-seed{seed}``.
        resume: Continue from the last completed round found in ``out_dir``.
    """

    strategy: str
    num_server_rounds: int
    fraction_train: float
    min_nodes: int
    round_timeout: float
    local_epochs: int
    lr: float
    batch_size: int
    max_examples_per_client: int
    model: str
    width: int
    dataset: str
    data_dir: str
    partitioning: str
    alpha: float
    calibration_size: int
    max_test_examples: int
    reference: str
    stats: str
    ridge: float
    ridge_mode: str
    repair: str
    zero_dead: bool
    balance: bool
    merge_guard: bool
    seed: int
    out_dir: str
    resume: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> TaskConfig:
        """Read and validate every key of ``run_config``.

        Args:
            run_config: ``context.run_config`` (keys with dashes).

        Raises:
            RunConfigError: Naming the key that is missing, mistyped or out of range.
        """
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in run_config:
                raise RunConfigError(f"run config lacks '{key}' (define it in {CONFIG_TABLE})")
            values[field.name] = _coerce(key, run_config[key], field.type)
        config = cls(**values)
        config._validate()
        return config

    @property
    def merge_method(self) -> str | None:
        """The CCAMerge method, or None for plain FedAvg."""
        return None if self.strategy == "fedavg" else self.strategy

    @property
    def ridge_or_default(self) -> float | None:
        """``ridge``, or None (the library default) when it is negative."""
        return None if self.ridge < 0 else self.ridge

    def output_dir(self, run_config: Mapping[str, Any]) -> Path:
        """``out_dir`` with ``{key}`` placeholders filled from ``run_config``, made absolute."""
        try:
            name = self.out_dir.format(**run_config)
        except (KeyError, IndexError, ValueError) as err:
            raise RunConfigError(f"out-dir {self.out_dir!r}: cannot fill placeholder {err}") from err
        return Path(name).expanduser().resolve()

    def _validate(self) -> None:
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("partitioning", self.partitioning, SCHEMES)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("stats", self.stats, STATISTICS_SOURCES)
        _check_choice("ridge-mode", self.ridge_mode, RIDGE_MODES)
        _check_choice("repair", self.repair, REPAIRS)
        positive = {"num-server-rounds": self.num_server_rounds, "min-nodes": self.min_nodes,
                    "round-timeout": self.round_timeout, "local-epochs": self.local_epochs,
                    "lr": self.lr, "batch-size": self.batch_size, "width": self.width,
                    "alpha": self.alpha, "calibration-size": self.calibration_size}
        for key, value in positive.items():
            if not value > 0:
                raise RunConfigError(f"run config '{key}' must be positive, got {value!r}")
        for key, value in {"max-examples-per-client": self.max_examples_per_client,
                           "max-test-examples": self.max_test_examples}.items():
            if value < 0:
                raise RunConfigError(f"run config '{key}' must be >= 0 (0 = all), got {value}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise RunConfigError(f"run config 'fraction-train' must be in (0, 1], got {self.fraction_train}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check ``value`` against the field type (given as a string: postponed annotations)."""
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool}[str(kind)]
    # bool is an int subclass: never accept True for a number, nor 1 for a flag.
    if isinstance(value, bool) != (kind == "bool") or not isinstance(value, expected):
        raise RunConfigError(f"run config '{key}' must be a {kind}, got {value!r} "
                             f"(strings need quotes: --run-config \"{key}='...'\")")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise RunConfigError(f"run config '{key}' must be finite, got {value}")
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RunConfigError(f"run config '{key}' must be one of {choices}, got {value!r}")


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers, e.g. ``(seed, server_round, partition_id)``.

    Args:
        *parts: Non-negative integers; different tuples give independent streams.
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (sampling, init, dropout).

    Args:
        seed: The seed, e.g. from :func:`derive_seed`.
    """
    import random  # pylint: disable=import-outside-toplevel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` of this node.

    Args:
        node_config: ``context.node_config`` (set by the simulation engine, or by
            ``flower-supernode --node-config "partition-id=0 num-partitions=4"``).
    """
    try:
        partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise RunConfigError(f"node config lacks {err}: start the SuperNode with "
                             f"--node-config \"partition-id=I num-partitions=N\"") from err
    if not 0 <= partition_id < num_partitions:
        raise RunConfigError(f"node config partition-id={partition_id} is not in [0, {num_partitions})")
    return partition_id, num_partitions


@functools.lru_cache(maxsize=2)
def load_data(name: str, data_dir: str) -> Dataset:
    """The dataset, read once per process.

    Args:
        name: Dataset name.
        data_dir: Folder of its files; "" for the default location.
    """
    return load_dataset(name, data_dir or None)


def make_model(task: TaskConfig, dataset: Dataset) -> nn.Module:
    """A freshly initialised model of the federated architecture for ``dataset``.

    Args:
        task: Supplies ``model`` and ``width``.
        dataset: Supplies the number of classes and input channels.
    """
    return build_model(task.model, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                       width=task.width)


@functools.lru_cache(maxsize=4)
def _shards(name: str, data_dir: str, num_partitions: int, scheme: str, alpha: float,
            calibration_size: int, seed: int) -> tuple[np.ndarray, ...]:
    split = federated_split(load_data(name, data_dir), num_partitions, scheme, alpha=alpha,
                            calibration_size=calibration_size, seed=seed, min_size=MIN_SHARD_SIZE)
    return tuple(split.shards)


def client_indices(task: TaskConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Training indices of one client: its shard, or a fixed random subset of it.

    The subset (``max-examples-per-client``) depends on ``(seed, partition_id)`` only, so a
    client trains on the same examples every round.

    Args:
        task: The run config.
        partition_id: This client's shard.
        num_partitions: Number of shards.
    """
    shard = _shards(task.dataset, task.data_dir, num_partitions, task.partitioning, task.alpha,
                    task.calibration_size, task.seed)[partition_id]
    limit = task.max_examples_per_client
    if limit == 0 or len(shard) <= limit:
        return shard
    rng = np.random.default_rng(derive_seed(task.seed, partition_id))
    return np.sort(rng.choice(shard, size=limit, replace=False))


@functools.lru_cache(maxsize=2)
def _calibration(name: str, data_dir: str, calibration_size: int, seed: int) -> torch.Tensor:
    dataset = load_data(name, data_dir)
    # The first step of federated_split, so server and clients hold the same examples.
    indices, _ = calibration_split(dataset.train_labels, calibration_size, seed)
    return normalize(dataset.train_images[torch.as_tensor(indices)], dataset)


@functools.lru_cache(maxsize=2)
def _calibration_labels(name: str, data_dir: str, calibration_size: int, seed: int) -> torch.Tensor:
    dataset = load_data(name, data_dir)
    indices, _ = calibration_split(dataset.train_labels, calibration_size, seed)
    return dataset.train_labels[torch.as_tensor(indices)]


def calibration_labels(task: TaskConfig) -> torch.Tensor:
    """Labels of :func:`calibration_inputs` (int64 ``[calibration-size]``, CPU).

    Args:
        task: The run config.
    """
    return _calibration_labels(task.dataset, task.data_dir, task.calibration_size, task.seed)


def calibration_inputs(task: TaskConfig) -> torch.Tensor:
    """The public calibration images, normalised (float32 ``[calibration-size, C, H, W]``, CPU).

    Args:
        task: The run config.
    """
    return _calibration(task.dataset, task.data_dir, task.calibration_size, task.seed)


def evaluation_loader(task: TaskConfig, device: torch.device) -> DeviceLoader:
    """Unshuffled, unaugmented loader over the test split (or its first ``max-test-examples``).

    Args:
        task: The run config.
        device: Where the test images are held.
    """
    dataset = load_data(task.dataset, task.data_dir)
    count = len(dataset.test_labels)
    if task.max_test_examples:
        count = min(count, task.max_test_examples)
    return DeviceLoader.from_dataset(dataset, np.arange(count), batch_size=1000, train=False, device=device)
