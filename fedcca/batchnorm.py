"""BatchNorm running statistics recomputed exactly on calibration data (after merging)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fedcca.devices import resolve_device
from fedcca.statistics import as_batches, running_on


def recompute_batchnorm(
    model: nn.Module,
    calibration: torch.Tensor | Iterable,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Set every BatchNorm's running statistics to those of its inputs over the calibration set.

    One forward pass under ``no_grad`` with the BatchNorm layers in train mode (as after
    training: each normalises with its batch statistics) and every other module in eval mode
    (no dropout). Hooks accumulate float64 sums of each BatchNorm's inputs over all batches;
    ``running_mean``/``running_var`` become their exact mean and unbiased variance (not torch's
    momentum average). Modes and device are restored. No-op for a model without BatchNorm.

    Args:
        model: Changed in place and returned.
        calibration: Inputs (see :func:`fedcca.statistics.as_batches`).
        device: Where the pass runs (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.

    Raises:
        ValueError: Empty calibration data or a non-finite BatchNorm input.
    """
    norms = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}
    if not norms:
        return model
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name in norms}  # count, sum, sum of squares

    def accumulate(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().movedim(1, -1).reshape(-1, inputs[0].shape[1]).double()
        if not torch.isfinite(x).all():
            raise ValueError(f"recompute_batchnorm: non-finite input to '{name}'")
        entry = sums[name]
        entry[0] += x.shape[0]
        entry[1] = entry[1] + x.sum(0)
        entry[2] = entry[2] + x.square().sum(0)

    device = resolve_device(device)
    handles = [module.register_forward_pre_hook(
        lambda _module, inputs, name=name: accumulate(name, inputs)) for name, module in norms.items()]
    try:
        with running_on(model, device, training=False), torch.no_grad():
            for module in norms.values():
                module.reset_running_stats()
                module.train()
            for batch in as_batches(calibration, batch_size):
                model(batch.to(device))
            for name, module in norms.items():
                _set_running_stats(module, name, *sums[name])
    finally:
        for handle in handles:
            handle.remove()
    return model


def _set_running_stats(module: nn.Module, name: str, count: int, total: Any, squares: Any) -> None:
    if count < 2:
        raise ValueError(f"recompute_batchnorm: '{name}' saw {count} input sample(s); "
                         f"the calibration data is empty or too small")
    mean = total / count
    variance = (squares - count * mean.square()).clamp_min(0) / (count - 1)
    module.running_mean.copy_(mean.to(module.running_mean))
    module.running_var.copy_(variance.to(module.running_var))
