"""Partition schemes, calibration split and federated split on synthetic labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcca.data import (
    SCHEMES,
    Dataset,
    calibration_split,
    class_counts,
    federated_split,
    partition,
)

LABELS = np.random.default_rng(123).integers(0, 10, 6000)


def assert_disjoint_cover(shards: list[np.ndarray], expected: np.ndarray) -> None:
    merged = np.concatenate(shards)
    assert len(merged) == len(np.unique(merged)), "an index is in two shards"
    np.testing.assert_array_equal(np.sort(merged), np.sort(expected))


def mean_max_class_share(shards: list[np.ndarray]) -> float:
    counts = class_counts(LABELS, shards, 10)
    return float((counts.max(axis=1) / counts.sum(axis=1)).mean())


def fake_dataset(labels: np.ndarray, name: str = "fake") -> Dataset:
    n = len(labels)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    return Dataset(name, images, torch.as_tensor(labels), images[:1], torch.zeros(1, dtype=torch.int64), 10, (0.5,), (0.5,))


def _parts(scheme: str, default: int) -> int:
    """Partitions a scheme can make of 10 classes: 80-20 needs 2; label-quantity covers every label with 10."""
    return {"80-20": 2, "label-quantity": 10}.get(scheme, default)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shards_disjoint_cover_and_reproducible(scheme: str) -> None:
    parts = _parts(scheme, 5)
    shards = partition(LABELS, parts, scheme, alpha=0.5, seed=7)
    assert len(shards) == parts
    assert_disjoint_cover(shards, np.arange(len(LABELS)))
    again = partition(torch.as_tensor(LABELS), parts, scheme, alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = partition(LABELS, parts, scheme, alpha=0.5, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_indices_restrict_the_pool(scheme: str) -> None:
    pool = np.arange(0, len(LABELS), 3)
    shards = partition(LABELS, _parts(scheme, 2), scheme, indices=pool, seed=1)
    assert_disjoint_cover(shards, pool)


def test_iid_sizes_and_class_mix() -> None:
    shards = partition(LABELS, 4, "iid", seed=0)
    assert sorted(len(s) for s in shards) == [1500] * 4
    assert mean_max_class_share(shards) < 0.13  # ~0.1 for a uniform mix


def test_dirichlet_skew_follows_alpha() -> None:
    skewed = mean_max_class_share(partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0, min_size=0))
    uniform = mean_max_class_share(partition(LABELS, 10, "dirichlet", alpha=1000.0, seed=0))
    assert skewed > 0.5, skewed  # most of a client's data is one class
    assert uniform < 0.13, uniform  # ~0.1: every class about equally present


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_identical_to_flwr_datasets() -> None:
    datasets = pytest.importorskip("datasets")
    flwr_partitioner = pytest.importorskip("flwr_datasets.partitioner")
    # (0.3, 500, 1) needs 4 resamplings: the retry loop consumes the generator identically.
    for alpha, min_size, seed in [(0.5, 10, 42), (0.3, 500, 1)]:
        reference = flwr_partitioner.DirichletPartitioner(
            num_partitions=6, partition_by="label", alpha=alpha, min_partition_size=min_size, seed=seed
        )
        reference.dataset = datasets.Dataset.from_dict({"label": LABELS, "row": np.arange(len(LABELS))})
        ours = partition(LABELS, 6, "dirichlet", alpha=alpha, seed=seed, min_size=min_size)
        for i, shard in enumerate(ours):
            np.testing.assert_array_equal(shard, np.asarray(reference.load_partition(i)["row"]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_label_quantity_gives_each_client_exactly_k_labels_split_evenly(k: int) -> None:
    shards = partition(LABELS, 10, "label-quantity", labels_per_client=k, seed=3)
    assert_disjoint_cover(shards, np.arange(len(LABELS)))  # every example exactly once
    counts = class_counts(LABELS, shards, 10)
    assert ((counts > 0).sum(axis=1) == k).all()
    assert [int(counts[i, i % 10] > 0) for i in range(10)] == [1] * 10  # client i holds label i mod 10
    for label in range(10):  # a label's examples are split evenly among its holders
        held = counts[:, label][counts[:, label] > 0]
        assert held.max() - held.min() <= 1 and held.sum() == (LABELS == label).sum()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_label_quantity_identical_to_flwr_datasets_pathological() -> None:
    datasets = pytest.importorskip("datasets")
    flwr_partitioner = pytest.importorskip("flwr_datasets.partitioner")
    for k, seed in [(1, 0), (2, 42), (3, 7)]:
        reference = flwr_partitioner.PathologicalPartitioner(
            num_partitions=12, partition_by="label", num_classes_per_partition=k,
            class_assignment_mode="first-deterministic", seed=seed)
        reference.dataset = datasets.Dataset.from_dict({"label": LABELS, "row": np.arange(len(LABELS))})
        ours = partition(LABELS, 12, "label-quantity", labels_per_client=k, seed=seed, min_size=1)
        for i, shard in enumerate(ours):
            np.testing.assert_array_equal(shard, np.asarray(reference.load_partition(i)["row"]))


def test_label_quantity_refuses_to_leave_labels_out() -> None:
    with pytest.raises(ValueError, match=r"leaves label\(s\) \[.*\] to no client"):
        partition(LABELS, 3, "label-quantity", labels_per_client=2, seed=0)
    with pytest.raises(ValueError, match="labels_per_client must be in 1..10"):
        partition(LABELS, 10, "label-quantity", labels_per_client=11)


def test_dirichlet_min_size_gives_up_with_clear_error() -> None:
    with pytest.raises(ValueError, match=r"min_size=500 examples in 11 draws"):
        partition(LABELS, 10, "dirichlet", alpha=0.05, min_size=500)


def test_dirichlet_resampling_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="fedcca.data.partitioning"):
        shards = partition(LABELS, 6, "dirichlet", alpha=0.3, min_size=500, seed=1)
    assert min(len(s) for s in shards) >= 500
    assert sum("resampling" in r.getMessage() for r in caplog.records) == 4


def test_class_disjoint_shares_no_class() -> None:
    shards = partition(LABELS, 4, "class-disjoint", seed=3)
    present = class_counts(LABELS, shards, 10) > 0
    assert present.sum(axis=0).max() == 1 and present.sum() == 10  # every class, in exactly one shard
    assert sorted(present.sum(axis=1)) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="num_partitions <= number of classes, got 11 > 10"):
        partition(LABELS, 11, "class-disjoint")


def test_eighty_twenty_proportions() -> None:
    counts = class_counts(LABELS, partition(LABELS, 2, "80-20", seed=0), 10)
    totals = counts.sum(axis=0)
    share0 = counts[0] / totals
    np.testing.assert_allclose(share0[:5], 0.8, atol=1e-3)
    np.testing.assert_allclose(share0[5:], 0.2, atol=1e-3)
    with pytest.raises(ValueError, match="exactly 2 partitions"):
        partition(LABELS, 3, "80-20")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme 'pathological'"):
        partition(LABELS, 2, "pathological")
    with pytest.raises(ValueError, match="at least 10 examples from 15"):
        partition(LABELS[:15], 2, "iid")
    with pytest.raises(ValueError, match="non-negative integers"):
        partition(np.array([0.5, 1.0]), 1, "iid", min_size=0)


def test_class_counts_matches_loop() -> None:
    shards = partition(LABELS, 3, "dirichlet", seed=2)
    expected = np.array([[int((LABELS[s] == k).sum()) for k in range(10)] for s in shards])
    np.testing.assert_array_equal(class_counts(LABELS, shards), expected)


def test_calibration_split_balanced_disjoint_deterministic() -> None:
    calibration, remaining = calibration_split(LABELS, 105, seed=4)
    assert len(calibration) == 105 and len(np.intersect1d(calibration, remaining)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([calibration, remaining])), np.arange(len(LABELS)))
    per_class = np.bincount(LABELS[calibration], minlength=10)
    assert per_class.max() - per_class.min() <= 1 and sorted(per_class)[-5:] == [11] * 5
    again, _ = calibration_split(torch.as_tensor(LABELS), 105, seed=4)
    np.testing.assert_array_equal(calibration, again)
    assert not np.array_equal(calibration, calibration_split(LABELS, 105, seed=5)[0])
    with pytest.raises(ValueError, match="class 1 has 1 examples"):
        calibration_split(np.array([0, 0, 0, 1]), 4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_federated_split_keeps_calibration_out_of_shards(scheme: str) -> None:
    dataset = fake_dataset(LABELS)
    parts = _parts(scheme, 4)
    split = federated_split(dataset, parts, scheme, alpha=0.5, calibration_size=200, seed=9, min_size=10)
    assert split.calibration_source == "fake"
    assert np.bincount(LABELS[split.calibration], minlength=10).tolist() == [20] * 10
    assert_disjoint_cover(split.shards + [split.calibration], np.arange(len(LABELS)))
    # Same seed in another "process": identical split.
    again = federated_split(fake_dataset(LABELS.copy()), parts, scheme, alpha=0.5, calibration_size=200, seed=9)
    np.testing.assert_array_equal(split.calibration, again.calibration)
    assert all(np.array_equal(a, b) for a, b in zip(split.shards, again.shards))


def test_federated_split_with_separate_calibration_dataset() -> None:
    public = fake_dataset(np.repeat(np.arange(10), 30), name="public")
    split = federated_split(fake_dataset(LABELS), 3, "iid", calibration_size=50, calibration_dataset=public)
    assert split.calibration_source == "public" and len(split.calibration) == 50
    assert split.calibration.max() < 300
    assert_disjoint_cover(split.shards, np.arange(len(LABELS)))  # nothing held out of the private data
