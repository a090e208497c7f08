"""The public data a strategy is built with, checked once: calibration batches that a model runs on, and
labelled hold-out data in any of the forms users hold it."""

from __future__ import annotations

from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn


def checked_holdout(holdout: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out inputs (finite floats) and int64 labels of equal length, or None.

    ``holdout`` is ``(inputs, labels)``, or anything iterable of ``(x, y)`` batches or
    examples: a ``DataLoader``, a map-style ``Dataset``.
    """
    if holdout is None:
        log(WARNING, "[fedcca] CCAMerge without a hold-out set: no merge can be checked or chosen, no collapse "
            "rolled back; the fixed merge was below FedAvg in our measurements (README, Limits). Pass "
            "holdout=(inputs, labels) of public labelled data.")
        return None
    if isinstance(holdout, tuple) and len(holdout) == 2 and isinstance(holdout[0], torch.Tensor):
        inputs, labels = holdout
    else:
        try:
            pairs = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in holdout]
        except (TypeError, ValueError) as err:
            raise ValueError(f"CCAMerge: holdout must be (inputs, labels) or an iterable of (x, y) batches "
                             f"(a DataLoader, a Dataset), got {type(holdout).__name__}: {err}") from None
        batched = bool(pairs) and pairs[0][1].dim() == 1
        inputs = torch.cat([x for x, _ in pairs]) if batched else torch.stack([x for x, _ in pairs]) if pairs \
            else torch.empty(0)
        labels = torch.cat([y for _, y in pairs]) if batched else torch.stack([y for _, y in pairs]) if pairs \
            else torch.empty(0)
    labels = torch.as_tensor(labels).long()
    if not isinstance(inputs, torch.Tensor) or labels.shape != (len(inputs),) or len(inputs) == 0:
        raise ValueError(f"CCAMerge: holdout must be (inputs tensor [N, ...], labels [N]) with N > 0, got "
                         f"{type(inputs).__name__} and labels of shape {tuple(labels.shape)}")
    if not inputs.is_floating_point() or not torch.isfinite(inputs).all():
        raise ValueError("CCAMerge: holdout inputs must be finite floating-point values (normalised as in training)")
    return inputs, labels


def check_runs(model: nn.Module, calibration: list[torch.Tensor]) -> None:
    if not calibration:
        raise ValueError("CCAMerge: the calibration data is empty")
    bad = [i for i, batch in enumerate(calibration)
           if not batch.is_floating_point() or not torch.isfinite(batch).all()]
    if bad:
        raise ValueError(f"CCAMerge: calibration batch {bad[0]} has non-finite or non-float values; "
                         "pass finite inputs normalised as in training")
    try:
        with torch.no_grad():
            model.eval()(calibration[0].detach().cpu())
    except Exception as err:
        raise ValueError(f"CCAMerge: model_fn()'s model cannot run on the calibration data "
                         f"(batch shape {tuple(calibration[0].shape)}): {err}") from err
