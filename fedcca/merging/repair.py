"""REPAIR-style correction of a merged model's pre-activation statistics (Jordan et al., 2023).

Averaging aligned models shrinks the spread of their features ("variance collapse"). After
the average (and any BatchNorm recomputation), :func:`repair` rescales and shifts each
alignment point's pre-activation, per channel and layer by layer, so that its mean (and
standard deviation) on calibration data equal the weighted average of the endpoints'
statistics expressed in the reference's coordinates (``T mu``, ``sqrt(diag(T C T^T))``): REPAIR
generalised to dense transforms. A merge of symmetric copies is left exactly unchanged.

The same correction, applied at the output of every folded BatchNorm (:func:`restore_norms`),
is how a BatchNorm-folded merge gets its normalisation back: re-estimating BatchNorm after an
unfolded merge resets each channel's spread to the averaged ``gamma``; a folded merge has no
``gamma`` left to average, so each BatchNorm's output is set to the endpoints' average mean
and standard deviation instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from fedcca.merging.averages import WeightedSum, make_average
from fedcca.merging.batchnorm import recompute_batchnorm
from fedcca.spec.alignment import PRODUCERS, AlignmentPoint, AlignmentSpec, Transform, resolve_tap
from fedcca.spec.tracing import spec_for
from fedcca.statistics import Moments, PairStatistics, as_batches, collect_moments, collect_statistics, feature_moments

logger = logging.getLogger(__name__)

REPAIRS: tuple[str, ...] = ("none", "mean", "affine")
"""``"none"``; ``"mean"``: match pre-activation means; ``"affine"``: means and standard deviations."""

# A pre-activation channel whose spread is below this fraction of the target's is treated as
# constant: rescaling it would blow it up, so only its mean is corrected (logged).
_FLAT_RTOL = 1e-6


def preactivation_spec(spec: AlignmentSpec, model: nn.Module) -> tuple[AlignmentSpec, dict[str, str]]:
    """The points whose pre-activation can be tapped and corrected, with taps moved there.

    A point qualifies when its taps are ``nn.ReLU`` modules and one module produces what they
    consume: its BatchNorm if the point has one (a single one), else its single conv/linear
    with a bias. Residual-stream points (several producers) do not qualify.

    Args:
        spec: The model's alignment spec.
        model: The model (to look modules up).

    Returns:
        ``(spec of the qualifying points tapping their producers, {point: producer module})``.
    """
    modules = dict(model.named_modules())
    points, producers = [], {}
    for point in spec.points:
        producer = _producer(point, modules)
        if producer is None:
            continue
        producers[point.name] = producer
        points.append(AlignmentPoint(point.name, point.size, (producer,), point.axes))
    return AlignmentSpec(tuple(points)), producers


def norm_output_spec(spec: AlignmentSpec, model: nn.Module) -> tuple[AlignmentSpec, dict[str, str]]:
    """One point per BatchNorm of ``spec.norms``, tapping its output, and the point each belongs to.

    Residual streams hold several BatchNorms (one per block writing into the stream); each is
    a point of its own here, named by its module, so each is corrected on its own.

    Args:
        spec: The model's alignment spec (``spec.norms`` lists the BatchNorms).
        model: The model (to look modules up).

    Returns:
        ``(spec of the BatchNorm outputs in forward order, {BatchNorm: alignment point})``.

    Raises:
        ValueError: A BatchNorm's bias belongs to no alignment point of ``spec``.
    """
    modules = dict(model.named_modules())
    owner = {ax.key[:-len(".bias")]: point.name for point in spec.points for ax in point.axes
             if ax.key.endswith(".bias")}
    points, owners = [], {}
    for _, norm in spec.norms:
        if norm not in owner:
            raise ValueError(f"BatchNorm '{norm}' has no alignment point holding its bias")
        owners[norm] = owner[norm]
        points.append(AlignmentPoint(norm, modules[norm].num_features, (norm,), ()))
    return AlignmentSpec(tuple(points)), owners


class RepairTargets:
    """Average of the endpoints' pre-activation statistics in reference coordinates.

    For endpoint ``k`` with weight ``w_k`` and transform ``T_k`` at a point, the target mean
    averages ``T_k mu_k`` and the target standard deviation ``sqrt(diag(T_k C_k T_k^T))``
    (``mu_k``, ``C_k``: the endpoint's pre-activation mean and covariance), weighted by ``w_k``
    for the "mean" average (a running sum: a merge never holds the endpoints), or robustly
    (coordinate-wise median / trimmed mean, :mod:`fedcca.merging.averages`) as the models are.

    Args:
        average: One of :data:`fedcca.merging.averages.AVERAGES`.
    """

    def __init__(self, average: str = "mean") -> None:
        self._mean = make_average(average)
        self._std = make_average(average)
        self._like: dict[str, torch.Tensor] | None = None

    def add(self, statistics: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
            transforms: Mapping[str, Transform], weight: float) -> None:
        """Fold in one endpoint.

        Args:
            statistics: Its :func:`preactivation_statistics` entry ``{point: (mean, covariance)}``.
            transforms: Its transforms into the reference's coordinates (identity where absent).
            weight: Its averaging weight.
        """
        means, stds = {}, {}
        for name, (mean, cov) in statistics.items():
            t = transforms.get(name)
            if t is not None:
                mean, cov = t.matrix @ mean, t.matrix @ cov @ t.matrix.T
            means[name], stds[name] = mean.double(), cov.diagonal().clamp_min(0).sqrt().double()
        self._mean.add(means, weight)
        self._std.add(stds, weight)
        if self._like is None:
            self._like = means

    def sums(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weighted sums of the means and of the standard deviations so far ("mean" average only)."""
        if not isinstance(self._mean, WeightedSum) or not isinstance(self._std, WeightedSum):
            raise ValueError("RepairTargets: only the 'mean' average has additive sums")
        return dict(self._mean.total), dict(self._std.total)

    def add_sums(self, means: Mapping[str, torch.Tensor], stds: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in sums made elsewhere (e.g. by clients, :meth:`sums`) whose weights total ``weight``."""
        if not isinstance(self._mean, WeightedSum) or not isinstance(self._std, WeightedSum):
            raise ValueError("RepairTargets: only the 'mean' average has additive sums")
        self._mean.add_total(means, weight)
        self._std.add_total(stds, weight)
        if self._like is None:
            self._like = {name: value.double() for name, value in means.items()}

    def targets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{point: (target mean, target std)}``: the averages so far."""
        if self._like is None or self._mean.weight <= 0:
            raise ValueError("RepairTargets: no endpoint with a positive weight was added")
        means, stds = self._mean.average(self._like), self._std.average(self._like)
        return {name: (means[name], stds[name]) for name in means}


def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    transforms: Sequence[Mapping[str, Transform]],
    calibration: torch.Tensor | Iterable,
    weights: Sequence[float] | None = None,
    *,
    mode: str = "affine",
    spec: AlignmentSpec | None = None,
    endpoint_statistics: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    recompute_bn: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Correct the merged model's pre-activation statistics towards the endpoints' (in place).

    Target of each channel at a point: the weighted average over endpoints ``k`` of the mean
    ``T_k mu_k`` and standard deviation ``sqrt(diag(T_k C_k T_k^T))`` of endpoint k's
    pre-activations (:class:`RepairTargets`). See :func:`repair_to_targets` for how the
    correction is applied.

    Args:
        merged: The averaged model, modified in place and returned.
        endpoints: The original (unaligned) models that were averaged.
        transforms: ``transforms[k]``: endpoint k's transforms into the reference's coordinates.
        calibration: Inputs.
        weights: Averaging weights of the endpoints (default uniform).
        mode: ``"affine"`` (mean and std) or ``"mean"`` (mean only).
        spec: The alignment spec (default ``spec_for(merged)``).
        endpoint_statistics: :func:`preactivation_statistics` of ``endpoints`` (computed when
            None; pass them to reuse one pass over several candidate merges).
        recompute_bn: How the endpoints are measured (see :func:`preactivation_statistics`): True
            for a merge whose BatchNorm statistics were recomputed, False for a folded merge.
        device: Where forwards run.
        batch_size: Batch size for forwards.
    """
    if len(transforms) != len(endpoints):
        raise ValueError(f"{len(transforms)} transform sets for {len(endpoints)} endpoints")
    weights = [1.0] * len(endpoints) if weights is None else [float(w) for w in weights]
    spec = spec_for(merged) if spec is None else spec
    calibration = list(as_batches(calibration, batch_size))
    if endpoint_statistics is None:
        endpoint_statistics = preactivation_statistics(endpoints, calibration, spec, recompute_bn=recompute_bn,
                                                       device=device)
    targets = RepairTargets()
    for stats, ts, w in zip(endpoint_statistics, transforms, weights):
        targets.add(stats, ts, w)
    return repair_to_targets(merged, targets.targets(), calibration, mode=mode, spec=spec, device=device)


def repair_to_targets(
    merged: nn.Module,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    calibration: torch.Tensor | Iterable,
    *,
    mode: str = "affine",
    spec: AlignmentSpec | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Rescale and shift each point's pre-activation so its statistics hit ``targets`` (in place).

    Points are corrected in forward order, each measured after the previous ones were fixed,
    by rescaling/shifting the producing conv/linear or BatchNorm's weight and bias. Points
    without a single producer (see :func:`preactivation_spec`) are skipped and logged. Call it
    after any BatchNorm recomputation (it edits BatchNorm affine parameters).

    Args:
        merged: The averaged model, modified in place and returned.
        targets: ``{point: (target mean, target std)}`` (:meth:`RepairTargets.targets`).
        calibration: Inputs.
        mode: ``"affine"`` (mean and std) or ``"mean"`` (mean only).
        spec: The alignment spec (default ``spec_for(merged)``).
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    if mode not in ("affine", "mean"):
        raise ValueError(f"repair mode must be 'affine' or 'mean', got {mode!r}")
    spec = spec_for(merged) if spec is None else spec
    pre_spec, producers = preactivation_spec(spec, merged)
    skipped = [p for p in spec.names() if p not in producers]
    if skipped:
        logger.info("repair: points %s have no single pre-activation producer; left uncorrected", skipped)
    return _correct_in_order(merged, targets, pre_spec, producers, calibration, mode, device, batch_size)


def restore_norms(
    merged: nn.Module,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Set each folded BatchNorm's output mean and std to ``targets`` (in place), in forward order.

    Call it after :func:`fedcca.merging.batchnorm.refit_batchnorm`: the BatchNorms then normalise with
    the real statistics of their inputs, and this sets their affine parameters so every
    channel's output has the target mean and standard deviation.

    Args:
        merged: A merge of BatchNorm-folded models, modified in place and returned.
        targets: ``{BatchNorm: (target mean, target std)}`` (:meth:`RepairTargets.targets` of
            :func:`norm_output_statistics`).
        calibration: Inputs.
        spec: The (unfolded) alignment spec; ``spec.norms`` lists the BatchNorms.
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    outputs, _ = norm_output_spec(spec, merged)
    producers = {point.name: point.name for point in outputs.points}
    return _correct_in_order(merged, targets, outputs, producers, calibration, "affine", device, batch_size)


def _correct_in_order(merged: nn.Module, targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      taps: AlignmentSpec, producers: Mapping[str, str], calibration: torch.Tensor | Iterable,
                      mode: str, device: torch.device | str | None, batch_size: int) -> nn.Module:
    """Correct each point of ``taps`` through its producer, measuring it after the earlier ones were fixed."""
    calibration = list(as_batches(calibration, batch_size))
    for point in taps.points:
        target_mean, target_std = targets[point.name]
        mean, variance = feature_moments(merged, calibration, point, device=device)  # stops at the point
        std = variance.clamp_min(0).sqrt()
        scale = torch.ones_like(std)
        if mode == "affine":
            flat = std <= _FLAT_RTOL * target_std.clamp_min(1e-30)
            if flat.any():
                logger.info("repair: point '%s' has %d constant merged channel(s); only their mean "
                            "is corrected", point.name, int(flat.sum()))
            scale = torch.where(flat, 1.0, target_std / std.clamp_min(1e-30))
        _affine_correct(merged, producers[point.name], scale, target_mean - scale * mean)
    return merged


def preactivation_statistics(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec | None = None,
    *,
    recompute_bn: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per model, ``{point: (mean, covariance)}`` of its pre-activations (float64, CPU).

    Only points qualifying for :func:`preactivation_spec` are present. With ``recompute_bn``,
    models with BatchNorm are measured on a copy whose BatchNorm statistics were recomputed on
    ``calibration``, as an unfolded merge's are; a folded merge keeps the models' own
    statistics (:func:`fedcca.merging.batchnorm.refit_batchnorm`), so its targets are measured on the
    models as they are (``recompute_bn=False``). Either way a merge of identical models is
    left unchanged by :func:`repair`.

    Args:
        models: Models of one architecture.
        calibration: Inputs.
        spec: The alignment spec (default ``spec_for(models[0])``).
        recompute_bn: Measure copies with BatchNorm statistics recomputed on ``calibration``.
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    spec = spec_for(models[0]) if spec is None else spec
    pre_spec, _ = preactivation_spec(spec, models[0])
    return _output_statistics(models, calibration, pre_spec, recompute_bn, device, batch_size)


def statistics_and_preactivation(
    reference: nn.Module,
    model: nn.Module,
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec,
    *,
    points: Sequence[str] | None = None,
    reference_moments: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> tuple[dict[str, PairStatistics], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``model``'s statistics against ``reference`` (:func:`~fedcca.statistics.collect_statistics`) and its
    pre-activation ``{point: (mean, covariance)}`` with its BatchNorms as they are
    (``preactivation_statistics(..., recompute_bn=False)``), from one forward pass of each model.

    Args:
        reference: Model A.
        model: Model B.
        calibration: Inputs.
        spec: The alignment spec.
        points: The points whose statistics are collected (default all).
        reference_moments: Measure the reference's own second moments too.
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    pre_spec, _ = preactivation_spec(spec, model)
    own: list[dict[str, Moments]] = []
    stats = collect_statistics(reference, [model], calibration, spec, points=points,
                               reference_moments=reference_moments, device=device, batch_size=batch_size,
                               own_moments=pre_spec if pre_spec.points else None,
                               own_out=own if pre_spec.points else None)[0]
    moments = own[0] if own else {}
    return stats, {name: (m.mean.double().cpu(), m.covariance().double().cpu()) for name, m in moments.items()}


def norm_output_statistics(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per model, ``{BatchNorm: (mean, covariance)}`` of the output of every BatchNorm of ``spec.norms``.

    The models are measured as they are (their own running statistics): a folded model
    computes the same function, so these are the targets of :func:`restore_norms`.

    Args:
        models: Models of one architecture (unfolded or folded).
        calibration: Inputs.
        spec: The (unfolded) alignment spec.
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    outputs, _ = norm_output_spec(spec, models[0])
    return _output_statistics(models, calibration, outputs, False, device, batch_size)


def _output_statistics(models: Sequence[nn.Module], calibration: torch.Tensor | Iterable, taps: AlignmentSpec,
                       recompute_bn: bool, device: torch.device | str | None,
                       batch_size: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per model, ``{point: (mean, covariance)}`` (float64, CPU) of the outputs ``taps`` names."""
    if not taps.points:
        return [{} for _ in models]
    out = []
    batches = list(as_batches(calibration, batch_size))
    for model in models:
        if recompute_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = recompute_batchnorm(copy.deepcopy(model), batches, device=device)
        # the model's own moments: one Gram per point (a pair with itself would compute three)
        moments = collect_moments(model, batches, taps, device=device)
        out.append({name: (own.mean.double().cpu(), own.covariance().double().cpu()) for name, own in moments.items()})
    return out


# ----------------------------------------------------------------------------- helpers

def _producer(point: AlignmentPoint, modules: Mapping[str, nn.Module]) -> str | None:
    """The one module whose output the point's ReLU taps consume, or None.

    Taps are ReLU modules, or ``"<module>+relu"`` taps (a functional ReLU of a traced model),
    whose module is then the producer itself.
    """
    resolved = [resolve_tap(tap, modules) for tap in point.taps]
    if any(found is None or found.input for found in resolved):
        return None  # a feature read at a consumer's input has no one module to correct
    functional = {found.module for found in resolved if found.relu}
    if point.taps and all(found.relu for found in resolved) and len(functional) == 1:
        (name,) = functional
        module = modules[name]
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                isinstance(module, PRODUCERS) and module.bias is not None):
            return name
        return None
    if not point.taps or not all(isinstance(modules.get(t), nn.ReLU) for t in point.taps):
        return None
    outs = {ax.key.rsplit(".", 1)[0] for ax in point.axes if ax.role in ("out", "var")}
    norms = [m for m in outs if isinstance(modules.get(m), nn.modules.batchnorm._BatchNorm)]
    if norms:
        return norms[0] if len(norms) == 1 else None
    layers = [m for m in outs if isinstance(modules.get(m), PRODUCERS)]
    if len(layers) == 1 and getattr(modules[layers[0]], "bias", None) is not None:
        return layers[0]
    return None


def _affine_correct(model: nn.Module, name: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make module ``name``'s output ``scale * out + shift`` per channel (weight and bias edited)."""
    module = dict(model.named_modules())[name]
    with torch.no_grad():
        weight, bias = module.weight, module.bias
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.mul_(scale.to(weight).reshape(shape))
        bias.mul_(scale.to(bias)).add_(shift.to(bias))
    if not (torch.isfinite(module.weight).all() and torch.isfinite(module.bias).all()):
        raise ValueError(f"repair produced non-finite parameters in '{name}'")
