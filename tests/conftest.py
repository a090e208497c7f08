"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.tiny_dataset import write_tiny_fashion_mnist


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: on 2 shared, busy cores, tiny ops are ~15x faster so. Session-wide,
    so that module fixtures compute with the same thread count (summation order) as the tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset in Fashion-MNIST's file format (120 train, 40 test images), written once."""
    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("tiny-fashion-mnist"))
