"""Readers for CIFAR-10 / CIFAR-100 in the official "python version" pickle layout."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedcca.data.errors import DatasetFormatError, DatasetNotFoundError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# name -> (folder inside the archive, training files, test file, label key, archive, classes)
_LAYOUTS: dict[str, tuple[str, tuple[str, ...], str, bytes, str, int]] = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        b"labels",
        "cifar-10-python.tar.gz",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", b"fine_labels", "cifar-100-python.tar.gz", 100),
}

# The only globals a CIFAR pickle needs (numpy arrays, and bytes as written by Python 3
# protocol 2). Anything else could run arbitrary code on load, so it is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch file")
        if module == "numpy.core.multiarray":  # written by numpy 1.x; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def find_cifar_folder(name: str, data_dir: str | Path) -> Path:
    """Return the CIFAR folder for ``name`` given either that folder or its parent.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: The extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``) or its parent.

    Raises:
        DatasetNotFoundError: listing the paths tried and how to obtain the files.
    """
    folder, train_files, test_file, _, archive, _ = _LAYOUTS[name]
    data_dir = Path(data_dir).expanduser()
    candidates = (data_dir / folder, data_dir)
    for candidate in candidates:
        if (candidate / test_file).is_file() or (candidate / train_files[0]).is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"{name}: no '{folder}' folder at {tried}. Download {archive} (python version) from "
        f"{CIFAR_URL} and extract it into {data_dir} (it creates {folder}/ with "
        f"{', '.join(train_files + (test_file,))}), or point data_dir / FEDCCA_DATA_DIR at it."
    )


def read_cifar(name: str, data_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 or CIFAR-100 (fine labels) from the standard python-pickle layout.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: The extracted folder or its parent (see :func:`find_cifar_folder`).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 ``[N, 3, 32, 32]``
        and int64 ``[N]``.

    Raises:
        DatasetNotFoundError: a folder or batch file is missing.
        DatasetFormatError: a file is not a CIFAR batch (wrong keys, sizes or labels).
    """
    folder = find_cifar_folder(name, data_dir)
    _, train_files, test_file, label_key, _, num_classes = _LAYOUTS[name]
    train = [_read_batch(folder / f, label_key, num_classes) for f in train_files]
    test_images, test_labels = _read_batch(folder / test_file, label_key, num_classes)
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path}: CIFAR batch file missing; re-extract the archive from {CIFAR_URL} into {path.parent.parent}"
        )
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DatasetFormatError(f"{path}: not a CIFAR python batch file ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(f"{path}: expected a dict with b'data' and {label_key!r}, found {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetFormatError(
            f"{path}: b'data' must be uint8 [N, 3072] matching {len(labels)} labels, "
            f"got {data.dtype} {data.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(f"{path}: labels outside 0..{num_classes - 1}")
    # Rows are R(1024) G(1024) B(1024), each plane row-major: exactly CHW.
    return data.reshape(-1, 3, 32, 32), labels
