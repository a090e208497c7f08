"""Splitting a labelled training set into client shards and a public calibration set.

Every function is deterministic given ``seed`` (numpy ``default_rng``), so each process of a
federation computes the same split without communicating it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from fedcca.data.datasets import Dataset

logger = logging.getLogger(__name__)

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "label-quantity", "class-disjoint", "80-20")
DIRICHLET_MAX_RETRIES = 10  # as flwr-datasets' DirichletPartitioner

Labels = np.ndarray | torch.Tensor | Sequence[int]


@dataclass(frozen=True)
class FederatedSplit:
    """Indices of a federated split of a training set.

    Attributes:
        calibration: Indices of the public calibration set (sorted). They index the training
            split of ``calibration_source``: the partitioned dataset itself (held out before
            partitioning) or the separate ``calibration_dataset`` given to :func:`federated_split`.
        shards: One index array per client into the partitioned training split.
        calibration_source: Name of the dataset that ``calibration`` indexes.
    """

    calibration: np.ndarray
    shards: list[np.ndarray]
    calibration_source: str


def partition(
    labels: Labels,
    num_partitions: int,
    scheme: str = "dirichlet",
    *,
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
    min_size: int = 10,
    indices: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Split example indices into ``num_partitions`` disjoint shards.

    Schemes:
        ``"iid"``: a random permutation cut into near-equal parts.
        ``"dirichlet"``: for each class, proportions drawn from Dirichlet(alpha) over the
        clients, the convention (and, for the same seed, the exact output) of flwr-datasets'
        ``DirichletPartitioner(alpha=alpha, min_partition_size=min_size, seed=seed)``; resampled
        while a shard is smaller than ``min_size``, an error after 10 retries.
        ``"label-quantity"``: NIID-Bench's quantity-based label skew ``#C=k``: client ``i`` holds
        exactly ``k = labels_per_client`` labels, label ``i mod C`` and ``k - 1`` others drawn at
        random; the examples of a label are split evenly among the clients holding it. The
        exact output, for the same seed, of flwr-datasets' ``PathologicalPartitioner(
        num_classes_per_partition=k, class_assignment_mode="first-deterministic", seed=seed)``.
        A label no client draws would leave its examples out: that is an error.
        ``"class-disjoint"``: the classes are shuffled and dealt into near-equal groups; each
        client holds every example of its classes and no other.
        ``"80-20"``: two clients (Git Re-Basin / REPAIR); client 0 gets 80% of every class in the
        first half of the sorted classes and 20% of every other class, client 1 the rest.
    The order of indices inside a shard carries no meaning.

    Args:
        labels: Class label of every example of the dataset.
        num_partitions: Number of shards.
        scheme: One of :data:`SCHEMES`.
        alpha: Dirichlet concentration (only ``"dirichlet"``); small values give skewed shards.
        labels_per_client: ``k`` of ``"label-quantity"``.
        seed: Seed of the random generator.
        min_size: Smallest allowed shard; every scheme raises ``ValueError`` if one is smaller.
        indices: Only these examples are partitioned (e.g. what remains after
            :func:`calibration_split`); default all. Returned shards hold these dataset indices.
    """
    labels_np = _as_labels(labels)
    pool = np.arange(len(labels_np)) if indices is None else np.asarray(indices, dtype=np.int64)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(pool) < num_partitions * max(min_size, 1):
        raise ValueError(
            f"cannot make {num_partitions} shards of at least {max(min_size, 1)} examples from {len(pool)}"
        )
    rng = np.random.default_rng(seed)
    pool_labels = labels_np[pool]
    if scheme == "iid":
        shards = np.array_split(rng.permutation(len(pool)), num_partitions)
    elif scheme == "dirichlet":
        shards = _dirichlet(pool_labels, num_partitions, alpha, min_size, rng)
    elif scheme == "label-quantity":
        shards = _label_quantity(pool_labels, num_partitions, labels_per_client, rng)
    elif scheme == "class-disjoint":
        shards = _class_disjoint(pool_labels, num_partitions, rng)
    elif scheme == "80-20":
        shards = _eighty_twenty(pool_labels, num_partitions, rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {SCHEMES}")
    result = [pool[s] for s in shards]
    sizes = [len(s) for s in result]
    if min(sizes) < min_size:
        raise ValueError(f"scheme {scheme!r} gives a shard of {min(sizes)} < min_size={min_size} examples: {sizes}")
    return result


def _dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Not flwr_datasets.partitioner.DirichletPartitioner itself: the core library may not import
    # flwr (CONTRACT), importing it costs ~3 s and it needs a `datasets.Dataset`; it took 0.7 s
    # on 60k labels here against ~10 ms for this version, which draws from the generator in
    # the same order (per try: one Dirichlet per sorted class; then one shuffle per shard) and
    # so returns identical shards (tests/test_data_partition.py checks it).
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    alphas = np.full(num_partitions, float(alpha))
    for attempt in range(DIRICHLET_MAX_RETRIES + 1):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            cuts = (np.cumsum(rng.dirichlet(alphas)) * len(members)).astype(int)[:-1]
            for shard, piece in zip(pieces, np.split(members, cuts)):
                shard.append(piece)
        shards = [np.concatenate(p) for p in pieces]
        smallest = min(len(s) for s in shards)
        if smallest >= min_size:
            for shard in shards:
                rng.shuffle(shard)
            return shards
        logger.info("dirichlet(alpha=%g) try %d: smallest shard %d < min_size %d, resampling",
                    alpha, attempt, smallest, min_size)
    raise ValueError(
        f"dirichlet(alpha={alpha}) could not give every one of {num_partitions} shards at least "
        f"min_size={min_size} examples in {DIRICHLET_MAX_RETRIES + 1} draws; raise alpha, lower "
        f"min_size or use fewer partitions"
    )


def _label_quantity(labels: np.ndarray, num_partitions: int, per_client: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    # flwr-datasets' PathologicalPartitioner ("first-deterministic"), in numpy for the same
    # reasons as _dirichlet, drawing from the generator in the same order: the extra labels
    # client by client, then one shuffle per shard.
    classes = np.unique(labels)
    if not 1 <= per_client <= len(classes):
        raise ValueError(f"labels_per_client must be in 1..{len(classes)}, got {per_client}")
    held: list[list[int]] = []
    for client in range(num_partitions):
        mine = [int(classes[client % len(classes)])]
        while len(mine) < per_client:
            label = int(rng.choice(classes, size=1)[0])
            if label not in mine:
                mine.append(label)
        held.append(mine)
    holders = {int(k): [c for c, mine in enumerate(held) if k in mine] for k in classes}
    unused = [k for k, clients in holders.items() if not clients]
    if unused:
        raise ValueError(f"label-quantity with {num_partitions} partitions and {per_client} label(s) each "
                         f"leaves label(s) {unused} to no client; use more partitions or labels per client")
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for k, clients in holders.items():
        for client, piece in zip(clients, np.array_split(np.flatnonzero(labels == k), len(clients))):
            pieces[client].append(piece)
    shards = [np.concatenate(p) for p in pieces]
    for shard in shards:
        rng.shuffle(shard)
    return shards


def _class_disjoint(labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    if num_partitions > len(classes):
        raise ValueError(
            f"class-disjoint needs num_partitions <= number of classes, got {num_partitions} > {len(classes)}"
        )
    groups = np.array_split(rng.permutation(classes), num_partitions)
    return [np.flatnonzero(np.isin(labels, group)) for group in groups]


def _eighty_twenty(labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    if num_partitions != 2:
        raise ValueError(f"the 80-20 scheme is defined for exactly 2 partitions, got {num_partitions}")
    classes = np.unique(labels)
    first_half = set(classes[: len(classes) // 2].tolist())
    shards: list[list[np.ndarray]] = [[], []]
    for k in classes:
        members = rng.permutation(np.flatnonzero(labels == k))
        cut = int(round(0.8 * len(members)))
        major, minor = (0, 1) if k in first_half else (1, 0)
        shards[major].append(members[:cut])
        shards[minor].append(members[cut:])
    return [np.sort(np.concatenate(s)) for s in shards]


def calibration_split(labels: Labels, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a class-balanced calibration set.

    Every class present gets ``size // C`` examples, and ``size % C`` randomly chosen classes one
    more, drawn at random within the class.

    Args:
        labels: Class label of every example.
        size: Number of calibration examples (0 gives an empty set).
        seed: Seed of the random generator; the same seed gives the same split in any process.

    Returns:
        ``(calibration, remaining)``: sorted, disjoint index arrays covering all examples.
    """
    labels_np = _as_labels(labels)
    if not 0 <= size <= len(labels_np):
        raise ValueError(f"calibration size must be in 0..{len(labels_np)}, got {size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels_np)
    quota = np.full(len(classes), size // len(classes))
    quota[rng.choice(len(classes), size % len(classes), replace=False)] += 1
    chosen = []
    for k, need in zip(classes, quota):
        members = np.flatnonzero(labels_np == k)
        if need > len(members):
            raise ValueError(f"class {k} has {len(members)} examples, a balanced calibration set of {size} needs {need}")
        chosen.append(rng.choice(members, need, replace=False))
    calibration = np.sort(np.concatenate(chosen)).astype(np.int64)
    remaining = np.setdiff1d(np.arange(len(labels_np)), calibration, assume_unique=True)
    return calibration, remaining


def federated_split(
    dataset: Dataset,
    num_partitions: int,
    scheme: str = "dirichlet",
    *,
    calibration_size: int = 1000,
    seed: int = 0,
    calibration_dataset: Dataset | None = None,
    **options: Any,
) -> FederatedSplit:
    """Hold out a calibration set, then partition the rest of the training split.

    The calibration set is removed BEFORE partitioning, so it is never inside a shard.

    Args:
        dataset: The dataset whose training split is partitioned.
        num_partitions: Number of client shards.
        scheme: Partition scheme, see :func:`partition`.
        calibration_size: Size of the class-balanced calibration set.
        seed: Seed for both the calibration draw and the partition.
        calibration_dataset: Draw the calibration set from this dataset's training split
            instead (then all of ``dataset`` is partitioned).
        **options: :func:`partition`'s options (``alpha``, ``labels_per_client``, ``min_size``).
    """
    source = dataset if calibration_dataset is None else calibration_dataset
    calibration, remaining = calibration_split(source.train_labels, calibration_size, seed)
    if calibration_dataset is not None:
        remaining = np.arange(len(dataset.train_labels))
    shards = partition(dataset.train_labels, num_partitions, scheme, seed=seed, indices=remaining, **options)
    return FederatedSplit(calibration, shards, source.name)


def class_counts(labels: Labels, shards: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """Count the examples of each class in each shard.

    Args:
        labels: Class label of every example.
        shards: Index arrays, e.g. from :func:`partition`.
        num_classes: Number of columns; default ``max(label) + 1``.

    Returns:
        int64 array ``[len(shards), num_classes]``.
    """
    labels_np = _as_labels(labels)
    width = int(labels_np.max()) + 1 if num_classes is None else num_classes
    return np.stack([np.bincount(labels_np[np.asarray(s, dtype=np.int64)], minlength=width) for s in shards])


def _as_labels(labels: Labels) -> np.ndarray:
    array = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise ValueError(f"labels must be a 1-D array of non-negative integers, got {array.dtype} {array.shape}")
    return array.astype(np.int64, copy=False)
