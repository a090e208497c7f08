"""BatchNorm in merges: fold it into its producer before aligning, re-estimate it after averaging.

A dense transform ``T`` mixes channels; applied to a BatchNorm's per-channel vectors it does
not keep the function, because normalisation acts channel by channel after the mixing.
:func:`fold_batchnorm` therefore writes each BatchNorm into the conv/linear layer that feeds
it (``W' = diag(gamma / sigma) W``, bias ``beta - gamma mu / sigma``) and leaves the BatchNorm
as a pass-through plus bias; aligned and averaged in that form, the pre-activation of an
aligned model is exactly ``T`` times the original one. After averaging,
:func:`refit_batchnorm` gives every BatchNorm the exact statistics of its inputs on the
calibration data while keeping the merged function (``gamma = sigma``, ``beta = mu + beta'``).
:func:`recompute_batchnorm` is the plain re-estimate of running statistics used without folding.
A merge then sets each refitted BatchNorm's output to the aligned models' average mean and
spread (:func:`fedcca.merging.repair.restore_norms`): keeping the averaged function exactly would keep
its collapsed variance, which an unfolded merge's BatchNorm re-estimate undoes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedcca.devices import resolve_device
from fedcca.spec.alignment import AlignmentPoint, AlignmentSpec
from fedcca.statistics import as_batches, running_on

_NORMALISED = ("weight", "running_mean", "running_var")  # what folding fixes; the bias stays aligned


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
    norms = _tracked_norms(model)
    if norms:
        for name, (mean, variance) in _input_moments(model, norms, calibration, device, batch_size,
                                                     train_mode=True).items():
            norms[name].running_mean.copy_(mean.to(norms[name].running_mean))
            norms[name].running_var.copy_(variance.to(norms[name].running_var))
    return model


def fold_batchnorm(model: nn.Module, spec: AlignmentSpec) -> dict[str, torch.Tensor]:
    """The model's state dict with every BatchNorm of ``spec.norms`` folded into its producer.

    With ``s = gamma / sqrt(running_var + eps)``: the producer's weight (and bias) are multiplied
    by ``s`` per output channel, the BatchNorm's bias becomes ``beta - s * running_mean`` and its
    weight, running mean and running variance ``1``, ``0`` and ``1 - eps`` (so it adds its bias
    and nothing else). The function in eval mode is unchanged.

    Args:
        model: The model (not modified).
        spec: Its alignment spec; ``spec.norms`` names the (producer, BatchNorm) pairs.
    """
    modules = dict(model.named_modules())
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    for producer, norm in spec.norms:
        bn = modules[norm]
        scale = bn.weight.detach().double().cpu() / (bn.running_var.detach().double().cpu() + bn.eps).sqrt()
        weight = state[f"{producer}.weight"]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        state[f"{producer}.weight"] = (weight.double() * scale.reshape(shape)).to(weight.dtype)
        if f"{producer}.bias" in state:
            bias = state[f"{producer}.bias"]
            state[f"{producer}.bias"] = (bias.double() * scale).to(bias.dtype)
        shift = bn.bias.detach().double().cpu() - scale * bn.running_mean.detach().double().cpu()
        state[f"{norm}.bias"] = shift.to(state[f"{norm}.bias"].dtype)
        state[f"{norm}.weight"] = torch.ones_like(state[f"{norm}.weight"])
        state[f"{norm}.running_mean"] = torch.zeros_like(state[f"{norm}.running_mean"])
        state[f"{norm}.running_var"] = torch.full_like(state[f"{norm}.running_var"], 1.0 - bn.eps)
    return state


def folded_spec(spec: AlignmentSpec) -> AlignmentSpec:
    """``spec`` for folded models: the folded BatchNorms' weight and running statistics are not aligned.

    They are constants of a folded model (1, 0, 1 - eps); its bias is a per-channel bias like
    the producer's and stays aligned.
    """
    fixed = {f"{norm}.{name}" for _, norm in spec.norms for name in _NORMALISED}
    points = tuple(dataclasses.replace(point, axes=tuple(ax for ax in point.axes if ax.key not in fixed))
                   for point in spec.points)
    return AlignmentSpec(points, spec.fixed, spec.norms)


def refit_batchnorm(model: nn.Module, spec: AlignmentSpec, calibration: torch.Tensor | Iterable,
                    device: torch.device | str | None = None, batch_size: int = 256) -> nn.Module:
    """Give a folded model's BatchNorms real statistics without changing its function (in place).

    Each folded BatchNorm of ``spec.norms`` (a pass-through plus bias ``beta'``) gets the exact
    mean ``mu`` and variance ``var`` of its inputs over the calibration data (measured in eval
    mode, where the model computes the merged function), and ``gamma = sqrt(var + eps)``,
    ``beta = mu + beta'``: it then normalises with real statistics and still outputs ``x + beta'``.

    Args:
        model: A model whose ``spec.norms`` BatchNorms are folded (e.g. an average of folded models).
        spec: Its alignment spec.
        calibration: Inputs.
        device: Where the pass runs.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    modules = dict(model.named_modules())
    norms = {norm: modules[norm] for _, norm in spec.norms}
    if not norms:
        return model
    moments = _input_moments(model, norms, calibration, device, batch_size, train_mode=False)
    with torch.no_grad():
        for name, (mean, variance) in moments.items():
            bn = norms[name]
            bn.weight.copy_((variance + bn.eps).sqrt().to(bn.weight))
            bn.bias.add_(mean.to(bn.bias))
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(variance.to(bn.running_var))
    return model


def unfolded_points(spec: AlignmentSpec) -> tuple[AlignmentPoint, ...]:
    """The points of ``spec`` that hold a BatchNorm not listed in ``spec.norms`` (they cannot be folded)."""
    listed = {norm for _, norm in spec.norms}
    return tuple(point for point in spec.points
                 if any(ax.key.endswith(".running_var") and ax.key[:-len(".running_var")] not in listed
                        for ax in point.axes))


def _tracked_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats}


def _input_moments(model: nn.Module, norms: Mapping[str, nn.Module], calibration: torch.Tensor | Iterable,
                   device: torch.device | str | None, batch_size: int,
                   train_mode: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact mean and unbiased variance (float64) of every listed BatchNorm's inputs over the calibration data.

    The model runs in eval mode under ``no_grad``; with ``train_mode`` the BatchNorms themselves run
    in train mode with reset statistics (each normalises with its batch statistics, as during
    training). Modes and device are restored.
    """
    sums: dict[str, list[Any]] = {name: [0, 0.0, 0.0] for name in norms}  # count, sum, sum of squares

    def accumulate(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().movedim(1, -1).reshape(-1, inputs[0].shape[1]).double()
        if not torch.isfinite(x).all():
            raise ValueError(f"BatchNorm statistics: non-finite input to '{name}'")
        entry = sums[name]
        entry[0] += x.shape[0]
        entry[1] = entry[1] + x.sum(0)
        entry[2] = entry[2] + x.square().sum(0)

    device = resolve_device(device)
    handles = [module.register_forward_pre_hook(
        lambda _module, inputs, name=name: accumulate(name, inputs)) for name, module in norms.items()]
    try:
        with running_on(model, device, training=False), torch.no_grad():
            if train_mode:
                for module in norms.values():
                    module.reset_running_stats()
                    module.train()
            for batch in as_batches(calibration, batch_size):
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: _moments(name, *sums[name]) for name in norms}


def _moments(name: str, count: int, total: Any, squares: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if count < 2:
        raise ValueError(f"BatchNorm statistics: '{name}' saw {count} input sample(s); "
                         f"the calibration data is empty or too small")
    mean = total / count
    return mean, (squares - count * mean.square()).clamp_min(0) / (count - 1)
