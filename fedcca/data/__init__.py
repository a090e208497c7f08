"""Datasets, client partitions, the public calibration split and a device-resident loader.

Imports only torch and numpy: usable on the server, in clients and in benchmarks alike.
"""

from fedcca.data.cifar import read_cifar
from fedcca.data.datasets import (
    DATA_DIR_ENV,
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    Dataset,
    load_dataset,
    normalize,
    standardize,
)
from fedcca.data.errors import DatasetFormatError, DatasetNotFoundError
from fedcca.data.idx import read_idx
from fedcca.data.loader import AUGMENTATIONS, DeviceLoader, crop_batch, flip_batch
from fedcca.data.partitioning import (
    SCHEMES,
    FederatedSplit,
    calibration_split,
    class_counts,
    federated_split,
    partition,
)
from fedcca.data.public import PublicData, public_split

__all__ = [
    "AUGMENTATIONS",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "SCHEMES",
    "Dataset",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DeviceLoader",
    "FederatedSplit",
    "PublicData",
    "calibration_split",
    "class_counts",
    "crop_batch",
    "federated_split",
    "flip_batch",
    "load_dataset",
    "normalize",
    "partition",
    "public_split",
    "read_cifar",
    "read_idx",
    "standardize",
]
