"""Image classification datasets held in memory as uint8 tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcca.data.cifar import read_cifar
from fedcca.data.errors import DatasetFormatError, DatasetNotFoundError
from fedcca.data.idx import read_idx

DATA_DIR_ENV = "FEDCCA_DATA_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100")

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Fixed, published per-channel statistics of each training set (pixels scaled to [0, 1]).
# Constants rather than statistics of the loaded data so that every client normalises
# identically, whatever subset it holds.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int]] = {
    "fashion-mnist": ((0.2860,), (0.3530,), 10),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100),
}


@dataclass
class Dataset:
    """A labelled image dataset with its train and test splits in memory.

    Attributes:
        name: One of :data:`DATASET_NAMES`.
        train_images: uint8 ``[N, C, H, W]``.
        train_labels: int64 ``[N]``.
        test_images: uint8 ``[M, C, H, W]``.
        test_labels: int64 ``[M]``.
        num_classes: Number of classes.
        mean: Per-channel mean of the pixels scaled to [0, 1].
        std: Per-channel standard deviation of the pixels scaled to [0, 1].
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        """Number of image channels (1 for Fashion-MNIST, 3 for CIFAR)."""
        return int(self.train_images.shape[1])


def load_dataset(name: str = "fashion-mnist", data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset from local files; nothing is ever downloaded.

    Args:
        name: ``"fashion-mnist"`` (IDX files, ``*.gz`` or uncompressed), ``"cifar10"`` or
            ``"cifar100"`` (python-pickle layout, fine labels for CIFAR-100).
        data_dir: Folder holding the files, or its parent (then the standard sub-folder
            ``fashion-mnist``, ``cifar-10-batches-py`` or ``cifar-100-python`` is used).
            Default: the environment variable ``FEDCCA_DATA_DIR``; if unset, Fashion-MNIST
            comes from the Debian package ``dataset-fashion-mnist`` at
            ``/usr/share/datasets/fashion-mnist`` and CIFAR raises.

    Raises:
        ValueError: unknown name.
        DatasetNotFoundError: the files are missing; the message says how to obtain them.
        DatasetFormatError: a file is corrupt; the message names it.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    from_env = data_dir is None and bool(os.environ.get(DATA_DIR_ENV))
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    try:
        arrays = _read_arrays(name, data_dir)
    except DatasetNotFoundError as err:
        if not from_env:
            raise
        # Say where the folder came from: an exported variable is easy to forget.
        raise DatasetNotFoundError(f"{err} (data_dir came from {DATA_DIR_ENV}={data_dir})") from None
    mean, std, num_classes = _STATS[name]
    train_images, train_labels, test_images, test_labels = (torch.from_numpy(a) for a in arrays)
    return Dataset(name, train_images, train_labels, test_images, test_labels, num_classes, mean, std)


def _read_arrays(name: str, data_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if name == "fashion-mnist":
        return _read_fashion_mnist(Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR)
    if data_dir is None:
        raise DatasetNotFoundError(
            f"{name} has no system package: pass data_dir or set {DATA_DIR_ENV} to the folder where "
            f"the python version of the archive from https://www.cs.toronto.edu/~kriz/cifar.html is extracted"
        )
    return read_cifar(name, data_dir)


def _read_fashion_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = _fashion_folder(data_dir)
    arrays = {}
    for key, file_name in _FASHION_FILES.items():
        path = folder / file_name
        if not path.is_file():  # the same file uncompressed is accepted too
            path = path.with_suffix("")
        arrays[key] = read_idx(path, ndim=3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DatasetFormatError(
                f"{folder}: {split} images {images.dtype} {images.shape} do not match "
                f"{len(labels)} labels of 28x28 uint8 images"
            )
        if labels.size and labels.max() > 9:
            raise DatasetFormatError(f"{folder / _FASHION_FILES[split + '_labels']}: labels outside 0..9")
    return (
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
    )


def _fashion_folder(data_dir: Path) -> Path:
    candidates = (data_dir, data_dir / "fashion-mnist")
    for folder in candidates:
        if all((folder / f).is_file() or (folder / f).with_suffix("").is_file() for f in _FASHION_FILES.values()):
            return folder
    missing = [f for f in _FASHION_FILES.values() if not (data_dir / f).is_file()]
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found in {' or '.join(str(c) for c in candidates)} (missing: {', '.join(missing)}). "
        f"Install the Debian package with `apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DIR}), or place the four files {', '.join(_FASHION_FILES.values())} in one folder "
        f"and pass it as data_dir or via {DATA_DIR_ENV}."
    )


def normalize(images: torch.Tensor, dataset: Dataset) -> torch.Tensor:
    """Scale uint8 images ``[N, C, H, W]`` to float32 and standardise each channel.

    Args:
        images: uint8 images (any device).
        dataset: Supplies the per-channel ``mean`` and ``std``.
    """
    return standardize(images, dataset.mean, dataset.std)


def standardize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel, as float32; the core of :func:`normalize`.

    Args:
        images: uint8 ``[N, C, H, W]``.
        mean: Per-channel mean in [0, 1] units (length C).
        std: Per-channel standard deviation in [0, 1] units (length C).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise ValueError(f"{images.shape[1]} channels but mean/std of length {len(mean)}/{len(std)}")
    # Fold /255 into the affine map: one multiply-add per pixel.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=images.device).view(1, -1, 1, 1)
    return torch.addcmul(shift, images.float(), scale)
