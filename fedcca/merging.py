"""Merging models: align each to a reference, then average (CCA Merge and baselines).

:func:`merge` is all-to-one (every model aligned to one reference, then a weighted average of
the state dicts, BatchNorm statistics recomputed on calibration data); :func:`merge_sequential`
folds models pairwise into a running model. ``method`` picks the alignment:

* ``"cca"``: CCA Merge transforms from activation statistics (:func:`~fedcca.transforms.cca_transform`);
* ``"permute"``: correlation-matched, rescaled permutations (:func:`~fedcca.transforms.permute_transform`);
* ``"weight-matching"``: Git Re-Basin weight matching, data free;
* ``"direct"``: no alignment (FedAvg of the weights).

With ``zero_dead`` (the default for "cca" and "permute"), features that are exactly zero on
the calibration data (dead ReLU units) have their weights zeroed before alignment
(:func:`fedcca.alignment.zero_features`, function-preserving on that data), so that their
strongly negative biases are neither mixed into live units by a dense CCA transform nor
averaged into a matched live unit. ``repair="affine"`` (or ``"mean"``) corrects the merged
model's pre-activation statistics afterwards (:func:`fedcca.repair.repair`, REPAIR
generalised to dense transforms); ``balance`` restores the reference's balance of weight
norms between layers (:func:`fedcca.alignment.balance_norms`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedcca.alignment import AlignmentSpec, Transform, apply_transforms, balance_norms, spec_for, zero_features
from fedcca.batchnorm import recompute_batchnorm
from fedcca.repair import REPAIRS, repair as repair_statistics
from fedcca.statistics import PairStatistics, collect_statistics
from fedcca.transforms import DEFAULT_RIDGE_MODE, cca_transform, permute_transform, weight_matching

__all__ = ["METHODS", "MergeError", "align_state_dict", "average_state_dicts", "merge", "merge_sequential",
           "recompute_batchnorm", "zero_dead_features"]

METHODS = ("cca", "permute", "weight-matching", "direct")
_STATISTICS_METHODS = ("cca", "permute")

logger = logging.getLogger(__name__)


class MergeError(ValueError):
    """A merge produced unusable weights (non-finite values), naming the key."""


def merge(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    method: str = "cca",
    reference: int | nn.Module = 0,
    weights: Sequence[float] | None = None,
    *,
    ridge: float | None = None,
    ridge_mode: str = DEFAULT_RIDGE_MODE,
    points: Sequence[str] | None = None,
    statistics: Sequence[Mapping[str, PairStatistics] | None] | None = None,
    recompute_bn: bool = True,
    repair: str = "none",
    zero_dead: bool = True,
    balance: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Align every model to the reference, average them, recompute BatchNorm statistics.

    Args:
        models: Models of one architecture (with ``alignment_spec()`` unless ``method`` is
            "direct"); they are not modified.
        calibration: Inputs for statistics and BatchNorm (see :func:`fedcca.statistics.as_batches`).
        method: One of :data:`METHODS`.
        reference: Index of the reference in ``models`` (it is averaged too), or a separate
            model used only as the alignment target and not averaged.
        weights: Non-negative averaging weights, one per model (default uniform).
        ridge: CCA ridge (None: ``fedcca.transforms.DEFAULT_RIDGES[ridge_mode]``).
        ridge_mode: How the CCA ridge regularises, one of :data:`fedcca.transforms.RIDGE_MODES`.
        points: Selective merging: align only these points (others identity; ``[]`` = none).
        statistics: ``statistics[k]``: precomputed statistics of ``models[k]`` against the
            reference (e.g. sent by a client), or None to compute them here. Used by "cca"
            and "permute"; the reference model itself is never transformed.
        recompute_bn: Recompute BatchNorm running statistics of the result on ``calibration``.
        repair: One of :data:`fedcca.repair.REPAIRS`: correct the merged pre-activation
            statistics towards the (aligned) models' after averaging. It measures the models
            with BatchNorm recomputed on ``calibration``, as ``recompute_bn`` leaves the result.
        zero_dead: For "cca" and "permute": zero the weights of features that are exactly 0
            on the calibration data in every averaged model before aligning (logged).
        balance: For "cca" and "permute" (whose transforms rescale features): rescale every
            merged feature so that the ratio of its incoming to outgoing weight norms is the
            reference's (:func:`fedcca.alignment.balance_norms`). The function is unchanged;
            training from the merge (the next federated round) is not: unbalanced CCA
            merges made the next rounds diverge (README, Results).
        device: Where statistics and BatchNorm run (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.

    Returns:
        A new model (a deep copy of ``models[0]`` holding the merged weights).

    Raises:
        ValueError: Unknown method (listing the options), bad weights/reference/statistics,
            models whose state dicts differ in keys or shapes.
        MergeError: Non-finite merged weights, naming the key.
    """
    _check_method(method)
    if repair not in REPAIRS:
        raise ValueError(f"unknown repair {repair!r}; choose one of {', '.join(REPAIRS)}")
    if not models:
        raise ValueError("merge: no models given")
    weights = _checked_weights(weights, len(models))
    target = _reference_model(models, reference)
    states = [_state_of(model) for model in models]
    template = _state_of(target)
    for index, state in enumerate(states):
        _check_same_layout(template, state, f"models[{index}]")
    transforms: list[dict[str, Transform]] = [{} for _ in models]
    if method != "direct":
        spec = spec_for(target)
        spec.validate(target)
        selected = spec.names() if points is None else list(points)
        given = _checked_statistics(statistics, len(models))
        if method in _STATISTICS_METHODS:
            given = _fill_statistics(target, models, given, calibration, spec, selected, device, batch_size)
            if zero_dead:
                states = zero_dead_features(states, models, target, given, spec, selected)
        for index, model in enumerate(models):
            if model is not target:
                states[index], transforms[index] = _aligned(
                    states[index], template, spec, method, given[index], ridge, ridge_mode, selected,
                    f"models[{index}]")
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(average_state_dicts(states, weights))
    if recompute_bn:
        recompute_batchnorm(merged, calibration, device=device, batch_size=batch_size)
    if repair != "none":
        repair_statistics(merged, models, transforms, calibration, weights, mode=repair,
                          device=device, batch_size=batch_size)
    if balance and method in _STATISTICS_METHODS and selected:
        # Last: a positive rescaling keeps the function, BatchNorm statistics and repair intact.
        aligned = AlignmentSpec(tuple(spec.point(name) for name in selected))
        merged.load_state_dict(balance_norms(merged.state_dict(), aligned, like=template))
    return merged


def merge_sequential(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    method: str = "cca",
    weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Merge pairwise into a running model: ``m = merge([m, models[k]])`` for k = 1..K-1.

    The running model is the reference of each step and carries the summed weight of the
    models already merged, so uniform weights give every model an equal share.

    Args:
        models: Models to merge, in order.
        calibration: Inputs for statistics and BatchNorm.
        method: One of :data:`METHODS`.
        weights: Non-negative weights, one per model (default uniform).
        **kwargs: Passed to :func:`merge` (``ridge``, ``ridge_mode``, ``points``, ``recompute_bn``,
            ``repair``, ``device``, ``batch_size``); ``reference`` and ``statistics`` are not allowed.
    """
    _check_method(method)
    clash = sorted({"reference", "statistics"} & set(kwargs))
    if clash:
        raise TypeError(f"merge_sequential: {clash} cannot be given (the running model is the reference)")
    if not models:
        raise ValueError("merge_sequential: no models given")
    weights = _checked_weights(weights, len(models))
    running, running_weight = merge([models[0]], calibration, method, weights=[1.0], **kwargs), weights[0]
    for model, weight in zip(models[1:], weights[1:]):
        if running_weight + weight == 0:
            continue  # nothing to average yet
        running = merge([running, model], calibration, method, weights=[running_weight, weight], **kwargs)
        running_weight += weight
    return running


def align_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    reference_state: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    method: str,
    *,
    statistics: Mapping[str, PairStatistics] | None = None,
    ridge: float | None = None,
    ridge_mode: str = DEFAULT_RIDGE_MODE,
    points: Sequence[str] | None = None,
    name: str = "model",
) -> dict[str, torch.Tensor]:
    """One model's weights moved into the reference's coordinates (a new dict).

    Args:
        state_dict: The model's weights.
        reference_state: The reference's weights (used by "weight-matching").
        spec: The architecture's alignment spec.
        method: One of :data:`METHODS` ("direct" returns a copy).
        statistics: Per-point statistics of this model against the reference ("cca", "permute").
        ridge: CCA ridge (None: the default of ``ridge_mode``).
        ridge_mode: One of :data:`fedcca.transforms.RIDGE_MODES`.
        points: Points to align (default all; others unchanged).
        name: How error messages call the model.

    Raises:
        ValueError: Missing statistics for a point, unknown method or point.
        MergeError: The aligned weights are not finite.
    """
    _check_method(method)
    selected = spec.names() if points is None else list(points)
    return _aligned(state_dict, reference_state, spec, method, statistics, ridge, ridge_mode, selected, name)[0]


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Weighted average of every floating-point entry; other entries are taken from the first.

    Sums run in float64 and are cast back to each entry's dtype, so integer buffers such as
    ``num_batches_tracked`` are kept from ``state_dicts[0]``.

    Args:
        state_dicts: State dicts with identical keys and shapes.
        weights: Non-negative weights with a positive sum (default uniform).

    Raises:
        ValueError: Empty input, mismatched keys/shapes, bad weights.
        MergeError: A non-finite averaged entry, naming its key.
    """
    if not state_dicts:
        raise ValueError("average_state_dicts: nothing to average")
    weights = _checked_weights(weights, len(state_dicts))
    first = state_dicts[0]
    for index, state in enumerate(state_dicts[1:], start=1):
        _check_same_layout(first, state, f"state_dicts[{index}]")
    total = sum(weights)
    averaged: dict[str, torch.Tensor] = {}
    for key, value in first.items():
        if not value.is_floating_point():
            averaged[key] = value.clone()
            continue
        acc = sum((w / total) * state[key].detach().double().cpu() for w, state in zip(weights, state_dicts))
        averaged[key] = acc.to(value.dtype)
    _check_finite(averaged, "the merged model")
    return averaged


def zero_dead_features(
    states: Sequence[dict[str, torch.Tensor]],
    models: Sequence[nn.Module],
    target: nn.Module,
    statistics: Sequence[Mapping[str, PairStatistics] | None],
    spec: AlignmentSpec,
    points: Sequence[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``states`` with the weights of every feature that is exactly 0 on the calibration data zeroed.

    Model k's dead features are read from its side of ``statistics[k]``; the reference's
    (``target``, when it is one of ``models``) from its side of any other model's statistics.

    Args:
        states: State dicts of ``models`` (not modified).
        models: The models (to recognise the reference).
        target: The alignment reference.
        statistics: ``statistics[k]``: model k's statistics against the reference (or None).
        spec: The architecture's alignment spec.
        points: Points to consider (default all).
    """
    selected = spec.names() if points is None else list(points)
    # The reference's own features: its side (0) of any other model's statistics.
    of_reference = next((s for s, model in zip(statistics, models) if model is not target and s is not None), None)
    out = list(states)
    for index, model in enumerate(models):
        source, side = (of_reference, 0) if model is target else (statistics[index], 1)
        if source is None:
            continue
        masks = {point: source[point].zero_features()[side] for point in selected if point in source}
        masks = {point: mask for point, mask in masks.items() if mask.any()}
        if masks:
            logger.info("models[%d]: zeroed dead features before alignment: %s", index,
                        {point: int(mask.sum()) for point, mask in masks.items()})
            out[index] = zero_features(states[index], spec, masks)
    return out


# ----------------------------------------------------------------------------- helpers

def _aligned(
    state_dict: Mapping[str, torch.Tensor],
    reference_state: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    method: str,
    statistics: Mapping[str, PairStatistics] | None,
    ridge: float | None,
    ridge_mode: str,
    selected: Sequence[str],
    name: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Transform]]:
    """One model's weights in the reference's coordinates, with the transforms that put them there."""
    transforms = _transforms(state_dict, reference_state, spec, method, statistics, ridge, ridge_mode,
                             selected, name)
    aligned = apply_transforms(state_dict, spec, transforms)
    _check_finite(aligned, f"{name} after {method} alignment")
    return aligned, transforms


def _transforms(
    state_dict: Mapping[str, torch.Tensor],
    reference_state: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    method: str,
    statistics: Mapping[str, PairStatistics] | None,
    ridge: float | None,
    ridge_mode: str,
    selected: Sequence[str],
    name: str,
) -> dict[str, Transform]:
    """Transforms of the selected points for one model."""
    chosen = [spec.point(point) for point in selected]
    if method == "direct" or not chosen:
        return {}
    if method == "weight-matching":
        return weight_matching(reference_state, state_dict, AlignmentSpec(points=tuple(chosen)))
    missing = [point.name for point in chosen if statistics is None or point.name not in statistics]
    if missing:
        raise ValueError(f"{name}: no statistics for point '{missing[0]}' (method {method!r})")
    assert statistics is not None
    if method == "cca":
        return {p.name: cca_transform(statistics[p.name], ridge, ridge_mode=ridge_mode, point=p.name)
                for p in chosen}
    return {p.name: permute_transform(statistics[p.name], point=p.name) for p in chosen}


def _fill_statistics(
    target: nn.Module,
    models: Sequence[nn.Module],
    given: list[Mapping[str, PairStatistics] | None],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec,
    selected: Sequence[str],
    device: torch.device | str | None,
    batch_size: int,
) -> list[Mapping[str, PairStatistics] | None]:
    """Compute the statistics not given, in one pass over the calibration data."""
    missing = [k for k, model in enumerate(models) if given[k] is None and model is not target]
    if missing and selected:
        computed = collect_statistics(target, [models[k] for k in missing], calibration, spec,
                                      points=selected, device=device, batch_size=batch_size)
        for k, stats in zip(missing, computed):
            given[k] = stats
    return given


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def _checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"{len(values)} weights for {count} models")
    if not all(w >= 0 and w < float("inf") for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {values}")
    return values


def _checked_statistics(statistics: Sequence[Mapping[str, PairStatistics] | None] | None,
                        count: int) -> list[Mapping[str, PairStatistics] | None]:
    if statistics is None:
        return [None] * count
    if len(statistics) != count:
        raise ValueError(f"{len(statistics)} statistics entries for {count} models")
    return list(statistics)


def _reference_model(models: Sequence[nn.Module], reference: int | nn.Module) -> nn.Module:
    if isinstance(reference, nn.Module):
        return reference
    if isinstance(reference, bool) or not isinstance(reference, int) or not -len(models) <= reference < len(models):
        raise ValueError(f"reference must be a model or an index into the {len(models)} models, got {reference!r}")
    return models[reference]


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in model.state_dict().items()}


def _check_same_layout(template: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], name: str) -> None:
    """Same keys and shapes, or a ValueError naming the first difference."""
    missing = [key for key in template if key not in state]
    extra = [key for key in state if key not in template]
    if missing or extra:
        raise ValueError(f"{name} does not match the architecture: missing keys {missing[:3]}, "
                         f"unexpected keys {extra[:3]}")
    for key, value in template.items():
        if state[key].shape != value.shape:
            raise ValueError(f"{name} does not match the architecture: '{key}' has shape "
                             f"{tuple(state[key].shape)}, expected {tuple(value.shape)}")


def _check_finite(state: Mapping[str, torch.Tensor], what: str) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise MergeError(f"{what} has non-finite values in '{key}'")
