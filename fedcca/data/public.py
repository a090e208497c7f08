"""The public data CCAMerge needs, built from what a Flower app already has.

:func:`public_split` draws, from a public labelled set, the unlabelled **calibration** inputs
(activation statistics, BatchNorm, REPAIR) and a disjoint labelled **hold-out** set (the choice
among candidate merges, distillation's early stop). It accepts a pair of tensors, a torch
``Dataset`` (map-style), a ``DataLoader`` or any iterable of ``(inputs, labels)`` batches, and
records as flwr-datasets / Hugging Face partitions give them (dicts) through ``transform``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch


class PublicData(NamedTuple):
    """Calibration inputs and a disjoint labelled hold-out set: ``CCAMerge(model_fn, *public_split(...))``
    reads them as ``calibration`` and ``holdout``."""

    calibration: torch.Tensor
    holdout: tuple[torch.Tensor, torch.Tensor]


def public_split(data: Any, calibration_size: int, holdout_size: int, *, seed: int = 0,
                 transform: Callable[[Any], tuple[Any, Any]] | None = None) -> PublicData:
    """Split public labelled data into calibration inputs and a disjoint labelled hold-out set.

    Examples are drawn at random (``seed``) without replacement; the two parts never share one.

    Args:
        data: ``(inputs, labels)`` tensors; a map-style ``Dataset`` whose items are
            ``(input, label)`` (or anything ``transform`` turns into that, e.g. a flwr-datasets
            partition's dicts); a ``DataLoader`` or another iterable of ``(inputs, labels)``
            batches (read until enough examples arrived, in its order).
        calibration_size: Inputs for statistics (a few hundred are enough).
        holdout_size: Labelled examples to choose merges on (0: no hold-out; ``holdout`` is then
            empty and CCAMerge should be given ``holdout=None``).
        seed: Seeds the draw from tensors and map-style datasets.
        transform: ``item -> (input, label)`` for items of another shape (a dict record).

    Raises:
        ValueError: Too few examples, sizes below 1 / 0, items that are not ``(input, label)``,
            or non-finite inputs — each naming what was found.
    """
    if isinstance(calibration_size, bool) or not isinstance(calibration_size, int) or calibration_size < 1:
        raise ValueError(f"public_split: calibration_size must be a positive int, got {calibration_size!r}")
    if isinstance(holdout_size, bool) or not isinstance(holdout_size, int) or holdout_size < 0:
        raise ValueError(f"public_split: holdout_size must be an int >= 0, got {holdout_size!r}")
    needed = calibration_size + holdout_size
    inputs, labels = _examples(data, needed, seed, transform)
    if len(inputs) < needed:
        raise ValueError(f"public_split: {len(inputs)} examples for {calibration_size} calibration + "
                         f"{holdout_size} hold-out ones")
    if not inputs.is_floating_point() or not torch.isfinite(inputs).all():
        raise ValueError("public_split: inputs must be finite floats (normalised as in training), got "
                         f"{inputs.dtype}" + ("" if not inputs.is_floating_point() else " with non-finite values"))
    return PublicData(inputs[:calibration_size], (inputs[calibration_size:needed], labels[calibration_size:needed]))


def _examples(data: Any, needed: int, seed: int,
              transform: Callable[[Any], tuple[Any, Any]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``needed`` (or all available) examples as stacked ``(inputs, labels)``."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"public_split: {len(x)} inputs but {len(y)} labels")
        order = torch.randperm(len(x), generator=generator)[:needed]
        return x[order], y[order]
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, torch.utils.data.DataLoader):
        order = torch.randperm(len(data), generator=generator)[:needed].tolist()
        pairs = [_pair(data[index], transform, index) for index in order]
        return _stack(pairs)
    if isinstance(data, Iterable):
        xs, ys, count = [], [], 0
        for index, batch in enumerate(data):
            x, y = _pair(batch, transform, index)
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            if y.dim() == 0:  # an iterable of single examples
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            xs.append(x)
            ys.append(y)
            count += len(x)
            if count >= needed:
                break
        if not xs:
            raise ValueError("public_split: the iterable yielded no examples")
        return torch.cat(xs)[:needed], torch.cat(ys)[:needed]
    raise ValueError(f"public_split: cannot read examples from a {type(data).__name__}; give (inputs, labels) "
                     "tensors, a Dataset or a DataLoader")


def _pair(item: Any, transform: Callable[[Any], tuple[Any, Any]] | None, index: int) -> tuple[Any, Any]:
    if transform is not None:
        item = transform(item)
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValueError(f"public_split: item {index} is a {type(item).__name__}, not (input, label); "
                         "pass transform= to turn it into one (e.g. a flwr-datasets dict record)")
    return item[0], item[1]


def _stack(pairs: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not pairs:
        raise ValueError("public_split: the dataset is empty")
    return (torch.stack([torch.as_tensor(x) for x, _ in pairs]),
            torch.as_tensor([int(torch.as_tensor(y)) for _, y in pairs]))
