"""A batch iterator whose data lives on the training device as one uint8 tensor.

Each batch is one gather, one vectorised augmentation and one fused normalisation on the
device; there is no per-sample Python and no worker process (the airbench / hlb-CIFAR10 idea).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedcca.data.datasets import standardize
from fedcca.devices import resolve_device

if TYPE_CHECKING:
    from fedcca.data.datasets import Dataset

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "flip-crop")
CROP_PADDING = 4


class DeviceLoader:
    """Iterate over ``(x, y)`` batches of a device-resident uint8 image tensor.

    Every ``iter()`` is one epoch: each example appears exactly once (or, with ``drop_last``,
    at most once). All randomness (order, flips, crop offsets) is drawn for the whole epoch
    from a CPU ``torch.Generator`` seeded with ``seed``, so the sequence of epochs is
    reproducible and identical on every device.

    Args:
        images: uint8 ``[N, C, H, W]`` (tensor or numpy array).
        labels: integer ``[N]``.
        batch_size: Examples per batch.
        shuffle: Visit the examples in a new random order each epoch.
        augment: ``"none"``, ``"flip"`` (random horizontal flip) or ``"flip-crop"`` (flip, then
            a random 32x32-style crop of the image zero-padded by 4 pixels, as for CIFAR).
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel standard deviation in [0, 1] units.
        device: Where the data lives and batches are produced; ``None``: CUDA if available.
        seed: Seed of the loader's generator.
        drop_last: Skip the final incomplete batch.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: str = "none",
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        images, labels = torch.as_tensor(images), torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point():
            raise ValueError(f"labels must be integer [N={len(images)}], got {labels.dtype} {tuple(labels.shape)}")
        if len(images) == 0:
            raise ValueError("DeviceLoader needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {augment!r}; choose one of {AUGMENTATIONS}")
        self.device = resolve_device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        standardize(self.images[:1], self.mean, self.std)  # validate mean/std lengths now

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        indices: np.ndarray | Sequence[int] | None = None,
        batch_size: int = 128,
        *,
        train: bool = True,
        **kwargs: object,
    ) -> DeviceLoader:
        """Build a loader over ``dataset``'s training (``train=True``) or test split.

        Args:
            dataset: Supplies images, labels, mean and std.
            indices: Subset of the split (e.g. a shard from ``federated_split``); default all.
            batch_size: Examples per batch.
            train: Which split; ``train=False`` also defaults to ``shuffle=False``.
            **kwargs: Further :class:`DeviceLoader` keyword arguments.
        """
        images, labels = (
            (dataset.train_images, dataset.train_labels) if train else (dataset.test_images, dataset.test_labels)
        )
        if indices is not None:
            index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
            images, labels = images[index], labels[index]
        kwargs.setdefault("shuffle", train)
        return cls(images, labels, batch_size, mean=dataset.mean, std=dataset.std, **kwargs)  # type: ignore[arg-type]

    @property
    def num_examples(self) -> int:
        """Number of examples held (per epoch, before ``drop_last``)."""
        return len(self.labels)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, gen = self.num_examples, self.generator
        # Draw the whole epoch's randomness at once, on the CPU, and move it in one transfer.
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=gen) < 0.5 if self.augment != "none" else None
        shifts = (
            torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=gen) if self.augment == "flip-crop" else None
        )
        order = order.to(self.device)
        flips = flips.to(self.device) if flips is not None else None
        shifts = shifts.to(self.device) if shifts is not None else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            x = self.images[batch]
            if shifts is not None:
                x = crop_batch(x, shifts[start : start + len(batch)], CROP_PADDING)
            if flips is not None:
                x = flip_batch(x, flips[start : start + len(batch)])
            yield standardize(x, self.mean, self.std), self.labels[batch]


def flip_batch(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images whose ``mask`` entry is True.

    Args:
        images: ``[B, C, H, W]``.
        mask: bool ``[B]``.
    """
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(3), images)


def crop_batch(images: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and cut an ``H x W`` window at its own offset.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` per image, done for the whole
    batch with one gather.

    Args:
        images: ``[B, C, H, W]``.
        shifts: integer ``[B, 2]``: (row, column) offset of each window in ``0..2*padding``.
        padding: Zero border added on every side.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = shifts[:, :1] + torch.arange(h, device=images.device)  # [B, H]
    cols = shifts[:, 1:] + torch.arange(w, device=images.device)  # [B, W]
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    # Advanced indices split by the channel slice go first: result is [B, H, W, C].
    return padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2).contiguous()
