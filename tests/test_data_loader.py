"""DeviceLoader: coverage, determinism, normalisation and vectorised augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedcca.data import Dataset, DeviceLoader, crop_batch, flip_batch, normalize

MEAN, STD = (0.2, 0.4, 0.6), (0.1, 0.2, 0.3)


def images(n: int = 23, c: int = 3, h: int = 8, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def loader(x: torch.Tensor, **kwargs: object) -> DeviceLoader:
    """Labels are example ids, so every output row can be traced back to its source image."""
    return DeviceLoader(x, torch.arange(len(x)), kwargs.pop("batch_size", 5), mean=MEAN, std=STD, device="cpu", **kwargs)


def dataset_of(x: torch.Tensor) -> Dataset:
    labels = torch.arange(len(x))
    return Dataset("toy", x, labels, x[:3], labels[:3], len(x), MEAN, STD)


def collect(batches: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("augment", ["none", "flip", "flip-crop"])
def test_every_example_once_per_epoch(augment: str) -> None:
    data = loader(images(), augment=augment, seed=1)
    assert len(data) == 5 and data.num_examples == 23
    for _ in range(2):
        sizes = [len(y) for _, y in data]
        x, y = collect(data)
        assert sizes == [5, 5, 5, 5, 3] and x.shape == (23, 3, 8, 6) and x.dtype == torch.float32
        assert sorted(y.tolist()) == list(range(23))


def test_drop_last() -> None:
    data = loader(images(), drop_last=True)
    y = collect(data)[1]
    assert len(data) == 4 and len(y) == 20 and len(set(y.tolist())) == 20


def test_shuffle_deterministic_and_changes_per_epoch() -> None:
    a, b = loader(images(), augment="flip-crop", seed=3), loader(images(), augment="flip-crop", seed=3)
    first_a, first_b = collect(a), collect(b)
    assert torch.equal(first_a[0], first_b[0]) and torch.equal(first_a[1], first_b[1])
    second_a = collect(a)
    assert not torch.equal(first_a[1], second_a[1])  # a new order each epoch
    assert torch.equal(second_a[0], collect(b)[0])  # ... reproducible epoch by epoch
    assert not torch.equal(first_a[1], collect(loader(images(), seed=4))[1])


def test_no_shuffle_no_augment_is_normalize() -> None:
    x = images()
    out, y = collect(loader(x, shuffle=False))
    assert y.tolist() == list(range(23))
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(x, dataset_of(x)), expected)


def test_flip_is_mirror_or_identity_about_half_the_time() -> None:
    x = images(n=400, h=4, w=5)
    out, y = collect(loader(x, augment="flip", batch_size=64))
    plain = normalize(x, dataset_of(x))[y]
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250


def test_crop_batch_matches_per_image_reference() -> None:
    x = images(n=30, h=7, w=9)
    shifts = torch.randint(0, 9, (30, 2), generator=torch.Generator().manual_seed(0))
    out = crop_batch(x, shifts, padding=4)
    for i in range(len(x)):
        dy, dx = shifts[i].tolist()
        reference = F.pad(x[i], (4, 4, 4, 4))[:, dy : dy + 7, dx : dx + 9]
        assert torch.equal(out[i], reference)
    assert torch.equal(crop_batch(x, torch.full((30, 2), 4), padding=4), x)  # centre window


def test_flip_batch() -> None:
    x = images(n=4)
    out = flip_batch(x, torch.tensor([True, False, True, False]))
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1]) and torch.equal(out[2], x[2].flip(2))


def test_flip_crop_output_is_a_shifted_window() -> None:
    x = images(n=50, c=1, h=6, w=6)
    out, y = collect(DeviceLoader(x, torch.arange(50), 16, augment="flip-crop", mean=(0.0,), std=(1.0,), device="cpu"))
    padded = F.pad(x.float() / 255, (4, 4, 4, 4))
    for row, i in zip(out, y.tolist()):
        windows = [padded[i, :, a : a + 6, b : b + 6] for a in range(9) for b in range(9)]
        assert any(torch.allclose(row, w, atol=1e-6) or torch.allclose(row, w.flip(2), atol=1e-6) for w in windows)


def test_from_dataset_subset_and_test_split() -> None:
    x = images(n=12)
    ds = dataset_of(x)
    train = DeviceLoader.from_dataset(ds, np.array([3, 7, 9]), batch_size=2, device="cpu")
    assert train.shuffle and sorted(collect(train)[1].tolist()) == [3, 7, 9]
    test = DeviceLoader.from_dataset(ds, batch_size=2, train=False, device="cpu")
    assert not test.shuffle and collect(test)[1].tolist() == [0, 1, 2]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(torch.zeros(2, 1, 2, 2), torch.zeros(2), 1, mean=(0.0,), std=(1.0,), device="cpu")
    with pytest.raises(ValueError, match="unknown augment 'crop'"):
        loader(images(), augment="crop")
    with pytest.raises(ValueError, match="3 channels but mean/std of length 1/1"):
        DeviceLoader(images(), torch.zeros(23, dtype=torch.int64), 4, mean=(0.5,), std=(0.5,), device="cpu")
