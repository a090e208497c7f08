"""fedcca.data.public_split: calibration and a disjoint hold-out from tensors, a Dataset, a DataLoader or dict records."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedcca.data import public_split

X = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)  # row i holds 3i, 3i+1, 3i+2: identifiable
Y = torch.arange(40) % 10


def _ids(inputs: torch.Tensor) -> set[int]:
    return {int(row[0]) // 3 for row in inputs}


@pytest.mark.parametrize("source", ["tensors", "dataset", "loader", "records"])
def test_disjoint_parts_of_the_asked_sizes_with_matching_labels(source: str) -> None:
    data, transform = {
        "tensors": ((X, Y), None),
        "dataset": (TensorDataset(X, Y), None),
        "loader": (DataLoader(TensorDataset(X, Y), batch_size=7, shuffle=False), None),
        "records": ([{"image": x, "label": int(y)} for x, y in zip(X, Y)],
                    lambda record: (record["image"], record["label"])),
    }[source]
    public = public_split(data, 12, 8, seed=3, transform=transform)
    calibration, (held_x, held_y) = public
    assert calibration.shape == (12, 3) and held_x.shape == (8, 3) and held_y.shape == (8,)
    assert not _ids(calibration) & _ids(held_x)
    assert all(int(y) == (int(x[0]) // 3) % 10 for x, y in zip(held_x, held_y))  # each label with its input


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="40 examples for 30 calibration \\+ 20 hold-out"):
        public_split((X, Y), 30, 20)
    with pytest.raises(ValueError, match="not \\(input, label\\); pass transform="):
        public_split([{"image": X[0], "label": 0}], 1, 0)
    with pytest.raises(ValueError, match="non-finite"):
        public_split((torch.full((4, 3), float("nan")), Y[:4]), 2, 1)
    with pytest.raises(ValueError, match="calibration_size must be a positive int"):
        public_split((X, Y), 0, 1)
