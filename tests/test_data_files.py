"""Readers: IDX (Fashion-MNIST) and CIFAR pickles from tiny fixtures in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcca.data import (
    FASHION_MNIST_DIR,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
    normalize,
    read_cifar,
    read_idx,
)

FASHION_FILES = {
    "train-images-idx3-ubyte.gz": 3,
    "train-labels-idx1-ubyte.gz": 1,
    "t10k-images-idx3-ubyte.gz": 3,
    "t10k-labels-idx1-ubyte.gz": 1,
}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX encoding written from the format description (independent of the reader)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-5, 70000, 3], dtype=np.int32), 0x0C),
        (np.array([[1.5, -2.25]], dtype=np.float32), 0x0D),
    ],
)
def test_idx_round_trip(tmp_path: Path, array: np.ndarray, code: int, compress: bool) -> None:
    raw = idx_bytes(array, code)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.shape == array.shape and out.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"ab", "needs 3 data bytes, file holds 2"),
        (b"\x00\x00\x08\x01\x00\x00", "header truncated"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 1, 2) + b"ab", "declares 2 dimensions, expected 1"),
    ],
)
def test_idx_corrupt_file_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "labels.idx"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError, match=message) as err:
        read_idx(path, ndim=1)
    assert str(path) in str(err.value)


def test_idx_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetFormatError, match="broken.gz"):
        read_idx(path)


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_from_folder_and_parent(tmp_path: Path) -> None:
    arrays = write_fashion(tmp_path / "fashion-mnist")
    for data_dir in (tmp_path / "fashion-mnist", tmp_path):
        ds = load_dataset("fashion-mnist", data_dir)
        assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (12, 1, 28, 28)
        assert ds.train_labels.dtype == torch.int64 and ds.in_channels == 1 and ds.num_classes == 10
        np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
        np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])


def test_fashion_mnist_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fashion(tmp_path, n_train=7)
    monkeypatch.setenv("FEDCCA_DATA_DIR", str(tmp_path))
    ds = load_dataset()
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte.gz"])


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion-mnist", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message
    assert "missing: t10k-labels-idx1-ubyte.gz" in message
    assert all(name in message for name in FASHION_FILES)


def test_missing_folder_from_env_var_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCCA_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py.*data_dir came from FEDCCA_DATA_DIR="):
        load_dataset("cifar10")


def test_fashion_mnist_mismatched_counts(tmp_path: Path) -> None:
    write_fashion(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DatasetFormatError, match="do not match 3 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_unknown_dataset_and_cifar_without_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCCA_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DatasetNotFoundError, match="FEDCCA_DATA_DIR"):
        load_dataset("cifar10")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCCA_DATA_DIR", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    # The published mean/std constants match the data they are applied to.
    x = normalize(ds.train_images[::10], ds)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


# ---------------------------------------------------------------- CIFAR


def write_cifar(root: Path, name: str, per_batch: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the python-pickle layout; return all training (images [N,3,32,32], labels)."""
    rng = np.random.default_rng(seed)
    folder, files, key, classes = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10)
        if name == "cifar10"
        else ("cifar-100-python", ["train", "test"], b"fine_labels", 100)
    )
    (root / folder).mkdir(parents=True)
    images, labels = [], []
    for file_name in files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, classes, per_batch).tolist()
        content = {b"batch_label": b"x", b"data": data, key: batch_labels, b"filenames": [b"a.png"] * per_batch}
        if name == "cifar100":
            content[b"coarse_labels"] = [0] * per_batch
        (root / folder / file_name).write_bytes(pickle.dumps(content, protocol=2))
        if "test" not in file_name:
            images.append(data)
            labels += batch_labels
    return np.concatenate(images), np.array(labels)


@pytest.mark.parametrize(("name", "n_train", "folder"), [("cifar10", 20, "cifar-10-batches-py"), ("cifar100", 4, "cifar-100-python")])
def test_cifar_reads_standard_layout(tmp_path: Path, name: str, n_train: int, folder: str) -> None:
    data, labels = write_cifar(tmp_path, name)
    for data_dir in (tmp_path, tmp_path / folder):
        ds = load_dataset(name, data_dir)
        assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
        assert ds.in_channels == 3 and ds.num_classes == (10 if name == "cifar10" else 100)
        np.testing.assert_array_equal(ds.train_labels.numpy(), labels)
    # Row layout: 1024 red values (row-major 32x32), then green, then blue.
    img = ds.train_images[1].numpy()
    assert img[0, 0, 0] == data[1, 0] and img[0, 0, 1] == data[1, 1] and img[0, 1, 0] == data[1, 32]
    assert img[1, 0, 0] == data[1, 1024] and img[2, 31, 31] == data[1, 3071]


def test_cifar_wrong_folder_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        read_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_cifar_missing_batch_file(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        read_cifar("cifar10", tmp_path)


def test_cifar_rejects_code_in_pickle_and_bad_content(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "test"
    path.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that would run a shell command
    with pytest.raises(DatasetFormatError, match="os.system is not allowed"):
        read_cifar("cifar100", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match=r"\[N, 3072\]"):
        read_cifar("cifar100", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DatasetFormatError, match="fine_labels"):
        read_cifar("cifar100", tmp_path)


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_cifar_pickled_by_numpy_1(tmp_path: Path) -> None:
    """The real archives name numpy.core.multiarray (numpy 1.x); numpy 2 renamed it."""
    write_cifar(tmp_path, "cifar100")
    path = tmp_path / "cifar-100-python" / "test"
    content = path.read_bytes()
    assert b"numpy._core.multiarray" in content
    path.write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load_dataset("cifar100", tmp_path).test_images.shape == (4, 3, 32, 32)
