"""What every process of a federation derives from the run config alone: data, model, seeds.

The ServerApp and each ClientApp compute the same public calibration and held-out sets and
the same client shards from :class:`~fedcca.app.task.TaskConfig` (``seed`` fixes every draw), so
nothing but weights and statistics ever travels. The dataset and its split are loaded once per
process and cached.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcca.app.task import RunConfigError, TaskConfig
from fedcca.data import (
    Dataset,
    DeviceLoader,
    calibration_split,
    federated_split,
    load_dataset,
    normalize,
)
from fedcca.models import build_model, is_model_path

MIN_SHARD_SIZE = 10  # smallest client shard federated_split may produce


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
        task: Supplies ``model`` (a built-in name or ``"module:Class"``) and ``width``.
        dataset: Supplies the number of classes, input channels and image size.

    Raises:
        RunConfigError: An import path that cannot be imported or does not name an ``nn.Module`` class.
    """
    if not is_model_path(task.model):
        return build_model(task.model, num_classes=dataset.num_classes, in_channels=dataset.in_channels,
                           width=task.width, image_size=int(dataset.train_images.shape[-1]))
    return build_user_model(task.model, dataset.num_classes, dataset.in_channels)


def build_user_model(path: str, num_classes: int, in_channels: int, label: str | None = None) -> nn.Module:
    """``Class(num_classes=..., in_channels=...)`` (the keywords it accepts) for ``"module:Class"``.

    The run config's ``model`` and the ``fedcca merge --model`` option both build user models here.

    Args:
        path: ``"package.module:Class"`` (or any callable returning an ``nn.Module``).
        num_classes: Offered as ``num_classes=`` if the factory accepts it.
        in_channels: Offered as ``in_channels=`` if the factory accepts it.
        label: How errors name the setting (default ``run config 'model' = '<path>'``).

    Raises:
        RunConfigError: The path cannot be imported, does not name a callable, or builds no ``nn.Module``.
    """
    label = f"run config 'model' = {path!r}" if label is None else label
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise RunConfigError(f"{label}: cannot import {attribute!r} from {module_name!r}: {err}") from err
    if not callable(factory):
        raise RunConfigError(f"{label} is a {type(factory).__name__}, not a torch nn.Module class")
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    try:
        accepted = inspect.signature(factory).parameters
        kwargs = {key: value for key, value in offered.items() if key in accepted}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise RunConfigError(f"{label}: cannot build it with {kwargs}: {err}") from err
    if not isinstance(model, nn.Module):
        raise RunConfigError(f"{label} built a {type(model).__name__}, not a torch nn.Module")
    return model


@functools.lru_cache(maxsize=4)
def _shards(name: str, data_dir: str, num_partitions: int, scheme: str, alpha: float, labels_per_client: int,
            public_size: int, seed: int) -> tuple[np.ndarray, ...]:
    split = federated_split(load_data(name, data_dir), num_partitions, scheme, alpha=alpha,
                            labels_per_client=labels_per_client, calibration_size=public_size, seed=seed,
                            min_size=MIN_SHARD_SIZE)
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
                    task.labels_per_client, _public_size(task), task.seed)[partition_id]
    limit = task.max_examples_per_client
    if limit == 0 or len(shard) <= limit:
        return shard
    rng = np.random.default_rng(derive_seed(task.seed, partition_id))
    return np.sort(rng.choice(shard, size=limit, replace=False))


def _public_size(task: TaskConfig) -> int:
    return task.calibration_size + task.holdout_size


@functools.lru_cache(maxsize=2)
def _public_indices(name: str, data_dir: str, calibration_size: int, holdout_size: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) indices: both class-balanced, held out before partitioning."""
    labels = load_data(name, data_dir).train_labels
    # The first step of federated_split, so server and clients hold the same examples.
    public, _ = calibration_split(labels, calibration_size + holdout_size, seed)
    held, fit = calibration_split(labels[torch.as_tensor(public)], holdout_size, seed + 1)
    return public[fit], public[held]


def check_feasible(task: TaskConfig, dataset: Dataset) -> None:
    """Before any round: the split the run config asks for exists in ``dataset`` (else the error names the key).

    Checked on the server at start-up, so that a split every client would fail on is refused
    once, with the key to change, instead of every round being skipped.

    Raises:
        RunConfigError: ``labels-per-client`` above the number of classes, or ``calibration-size``
            and ``holdout-size`` that the training split (class-balanced) cannot supply.
    """
    if task.partitioning == "label-quantity" and task.labels_per_client > dataset.num_classes:
        raise RunConfigError(f"run config 'labels-per-client' = {task.labels_per_client}, but {task.dataset} has "
                             f"{dataset.num_classes} classes")
    try:
        _public_indices(task.dataset, task.data_dir, task.calibration_size, task.holdout_size, task.seed)
    except ValueError as err:
        raise RunConfigError(f"run config 'calibration-size' = {task.calibration_size} and 'holdout-size' = "
                             f"{task.holdout_size} do not fit {task.dataset}'s {len(dataset.train_labels)} training "
                             f"images ({err})") from None


def calibration_inputs(task: TaskConfig) -> torch.Tensor:
    """The public calibration images, normalised (float32 ``[calibration-size, C, H, W]``, CPU).

    Args:
        task: The run config.
    """
    dataset = load_data(task.dataset, task.data_dir)
    indices, _ = _public_indices(task.dataset, task.data_dir, task.calibration_size, task.holdout_size, task.seed)
    return normalize(dataset.train_images[torch.as_tensor(indices)], dataset)


def holdout_set(task: TaskConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The public labelled held-out images (normalised) and labels, or None when ``holdout-size`` is 0.

    Args:
        task: The run config.
    """
    if task.holdout_size == 0:
        return None
    dataset = load_data(task.dataset, task.data_dir)
    _, indices = _public_indices(task.dataset, task.data_dir, task.calibration_size, task.holdout_size, task.seed)
    index = torch.as_tensor(indices)
    return normalize(dataset.train_images[index], dataset), dataset.train_labels[index]


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
