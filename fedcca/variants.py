"""Merge variants studied in issue 8: held-out hyper-parameter selection, CCA/permutation
blends, the paper's exact CCA, and REPAIR-style statistics correction after averaging.

:func:`merge_variant` is an all-to-one merge like :func:`fedcca.merging.merge`, driven by a
:class:`Variant` (or the name of one in :data:`VARIANTS`):

* alignment: ``"cca"`` (the library's per-feature relative ridge ``C + g diag(C)``),
  ``"cca-paper"`` (Horoi et al.'s absolute ridge ``C + g I``), ``"cca-trace"`` (absolute ridge
  scaled per block by the mean feature variance, ``C + g mean(diag C) I``: one grid for every
  layer, and low-variance features are shrunk instead of amplified), ``"permute"``,
  ``"weight-matching"``, ``"direct"``, or
  ``"blend"``: ``T = (1 - l) P + l C`` between the rescaled permutation ``P`` and the CCA
  transform ``C`` of the same statistics.
* candidates: when a variant lists several ridges / blend weights, each candidate is merged
  and scored on a labelled *held-out* calibration set (never test data); the best is kept.
* repair: ``"mean"`` or ``"affine"``: after averaging, every point's pre-activation (the
  output of the conv/linear or BatchNorm feeding its ReLU) is corrected per channel, layer by
  layer, so that its mean (and standard deviation) on the calibration data equal the
  weighted average of the endpoints' pre-activation statistics expressed in the reference's
  coordinates (``T mu``, ``sqrt(diag(T C T^T))``): REPAIR (Jordan et al., 2023) generalised
  to dense transforms.

Every variant is exact where the transforms are: merging a model with a positively
scaled-permutation copy of itself returns the model's function.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from fedcca.alignment import AlignmentPoint, AlignmentSpec, Transform, apply_transforms, spec_for
from fedcca.devices import resolve_device
from fedcca.merging import average_state_dicts, recompute_batchnorm
from fedcca.statistics import PairStatistics, as_batches, collect_statistics, running_on
from fedcca.transforms import DEFAULT_RIDGE, cca_transform, permute_transform, weight_matching

logger = logging.getLogger(__name__)

ALIGNMENTS = ("cca", "cca-paper", "cca-trace", "permute", "weight-matching", "direct", "blend")
REPAIRS = ("none", "mean", "affine")
RELATIVE_RIDGES: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ABSOLUTE_RIDGES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
TRACE_RIDGES: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
BLENDS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)

# A pre-activation channel whose spread is below this fraction of the target's is treated as
# constant: rescaling it would blow it up, so only its mean is corrected (logged).
_FLAT_RTOL = 1e-6


@dataclass(frozen=True)
class Variant:
    """A merge recipe: alignment, candidate hyper-parameters and post-averaging repair.

    Args:
        alignment: One of :data:`ALIGNMENTS`.
        ridges: Ridge candidates ("cca": relative, "cca-paper": absolute, "cca-trace": times
            the mean variance, "blend": ridge of its "cca-trace" part). Several -> chosen on
            held-out calibration data.
        blends: Weights ``l`` of the CCA part for "blend" (0 = permutation, 1 = CCA).
        repair: One of :data:`REPAIRS`.
        description: One line for tables and reports.
    """

    alignment: str
    ridges: tuple[float, ...] = (DEFAULT_RIDGE,)
    blends: tuple[float, ...] = (1.0,)
    repair: str = "none"
    description: str = ""

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose one of {ALIGNMENTS}")
        if self.repair not in REPAIRS:
            raise ValueError(f"unknown repair {self.repair!r}; choose one of {REPAIRS}")
        if not self.ridges or any(not r >= 0 for r in self.ridges):
            raise ValueError(f"ridges must be a non-empty tuple of values >= 0, got {self.ridges}")
        if not self.blends or any(not 0 <= b <= 1 for b in self.blends):
            raise ValueError(f"blends must be a non-empty tuple of values in [0, 1], got {self.blends}")

    def candidates(self) -> list[dict[str, float]]:
        """The hyper-parameter settings to try (one when nothing is selected)."""
        ridges = self.ridges if self.alignment in ("cca", "cca-paper", "cca-trace", "blend") else (float("nan"),)
        blends = self.blends if self.alignment == "blend" else (float("nan"),)
        return [{"ridge": r, "blend": b} for r, b in itertools.product(ridges, blends)]


VARIANTS: dict[str, Variant] = {
    "direct": Variant("direct", description="no alignment (FedAvg of the weights)"),
    "permute": Variant("permute", description="correlation permutation, rescaled"),
    "weight-matching": Variant("weight-matching", description="Git Re-Basin weight matching"),
    "cca": Variant("cca", RELATIVE_RIDGES, description="CCA, library relative ridge chosen on held-out calibration"),
    "cca-default": Variant("cca", description=f"CCA, library relative ridge fixed at {DEFAULT_RIDGE}"),
    "cca-paper": Variant("cca-paper", ABSOLUTE_RIDGES,
                         description="CCA as in the paper (absolute ridge g I), g chosen on held-out calibration"),
    "cca-trace": Variant("cca-trace", TRACE_RIDGES,
                         description="CCA, ridge g mean(var) I per block, g chosen on held-out calibration"),
    "blend": Variant("blend", TRACE_RIDGES[3:4], BLENDS,
                     description="(1-l) P + l cca-trace(g=1), l chosen on held-out calibration"),
    "permute-mean": Variant("permute", repair="mean", description="permute + pre-activation mean correction"),
    "cca-trace-mean": Variant("cca-trace", TRACE_RIDGES, repair="mean",
                              description="cca-trace + pre-activation mean correction"),
    "permute-repair": Variant("permute", repair="affine", description="permute + REPAIR (mean and std)"),
    "weight-matching-repair": Variant("weight-matching", repair="affine", description="weight matching + REPAIR"),
    "cca-repair": Variant("cca", RELATIVE_RIDGES, repair="affine", description="library cca + REPAIR"),
    "cca-trace-repair": Variant("cca-trace", TRACE_RIDGES, repair="affine",
                                description="cca-trace + REPAIR (mean and std)"),
}
"""Named variants (see :class:`Variant`); ``"cca-paper"`` is the paper's exact transform."""


@dataclass
class MergeReport:
    """What :func:`merge_variant` chose and how each candidate scored on the held-out set.

    Args:
        chosen: The selected hyper-parameters (``ridge``, ``blend``; NaN when unused).
        scores: Per candidate: its hyper-parameters, held-out ``accuracy`` and ``loss``
            (absent when there was a single candidate and no held-out set).
        transforms: The selected transforms of each model (empty dicts for the reference and
            for "direct").
    """

    chosen: dict[str, float]
    scores: list[dict[str, float]] = field(default_factory=list)
    transforms: list[dict[str, Transform]] = field(default_factory=list)


def get_variant(variant: str | Variant) -> Variant:
    """The :class:`Variant` named ``variant`` (or ``variant`` itself); ValueError listing names."""
    if isinstance(variant, Variant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown merge variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def merge_variant(
    models: Sequence[nn.Module],
    calibration: torch.Tensor,
    variant: str | Variant = "cca",
    *,
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference: int = 0,
    weights: Sequence[float] | None = None,
    statistics: Sequence[Mapping[str, PairStatistics] | None] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> tuple[nn.Module, MergeReport]:
    """All-to-one merge of ``models`` onto ``models[reference]`` with a :class:`Variant`.

    Args:
        models: Models of one architecture with ``alignment_spec()``; not modified.
        calibration: Unlabelled inputs for statistics, repair and BatchNorm recomputation.
        variant: A :class:`Variant` or a name in :data:`VARIANTS`.
        holdout: Labelled ``(inputs, labels)`` disjoint from ``calibration``, used only to choose
            among several candidates. Required when the variant has more than one.
        reference: Index of the alignment target (it is averaged too).
        weights: Averaging weights (default uniform).
        statistics: Precomputed statistics of each model against the reference (None entries,
            or None, are computed here on ``calibration``).
        device: Where forwards run (None: CUDA if available, else CPU).
        batch_size: Batch size for forwards.

    Returns:
        ``(merged model, MergeReport)``.
    """
    recipe = get_variant(variant)
    if not models:
        raise ValueError("merge_variant: no models given")
    if not -len(models) <= reference < len(models):
        raise ValueError(f"reference {reference} is not an index into {len(models)} models")
    reference %= len(models)
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models")
    candidates = recipe.candidates()
    if len(candidates) > 1 and holdout is None:
        raise ValueError(f"variant with {len(candidates)} candidate settings needs a labelled holdout set")
    target = models[reference]
    spec = spec_for(target)
    states = [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in models]
    others = [k for k in range(len(models)) if k != reference]
    stats = _statistics(recipe, models, reference, others, calibration, spec, statistics, device, batch_size)
    matched = {k: weight_matching(states[reference], states[k], spec) for k in others} \
        if recipe.alignment == "weight-matching" else {}
    endpoint_stats = preactivation_statistics(models, calibration, spec, device=device, batch_size=batch_size) \
        if recipe.repair != "none" else None
    best: tuple[tuple[float, float], nn.Module, dict, list] | None = None
    scores: list[dict[str, float]] = []
    for setting in candidates:
        transforms: list[dict[str, Transform]] = [{} for _ in models]
        for k in others:
            if recipe.alignment == "weight-matching":
                transforms[k] = matched[k]
            elif recipe.alignment != "direct":
                transforms[k] = _transforms(recipe, spec, stats[k], setting)
        aligned = [apply_transforms(states[k], spec, transforms[k]) for k in range(len(models))]
        merged = copy.deepcopy(target)
        merged.load_state_dict(average_state_dicts(aligned, weights))
        recompute_batchnorm(merged, calibration, device=device, batch_size=batch_size)
        if recipe.repair != "none":
            repair(merged, models, transforms, calibration, weights, mode=recipe.repair, spec=spec,
                   endpoint_statistics=endpoint_stats, device=device, batch_size=batch_size)
        if holdout is None:
            best = ((0.0, 0.0), merged, setting, transforms)
            break
        loss, accuracy = score(merged, *holdout, device=device, batch_size=batch_size)
        scores.append({**setting, "accuracy": accuracy, "loss": loss})
        key = (accuracy, -loss)
        if best is None or key > best[0]:
            best = (key, merged, setting, transforms)
    assert best is not None
    return best[1], MergeReport(chosen=best[2], scores=scores, transforms=best[3])


def paper_cca_transform(stats: PairStatistics, ridge: float, *, point: str = "?") -> Transform:
    """CCA Merge transform exactly as Horoi et al. compute it: absolute ridge on the own blocks.

    With ``S_aa = C_aa + g I``, ``S_bb = C_bb + g I`` and ``U S V^T = svd(S_aa^-1/2 C_ab S_bb^-1/2)``
    (symmetric roots): ``T = S_aa^1/2 U V^T S_bb^-1/2``, ``T^-1 = S_bb^1/2 V U^T S_aa^-1/2``.
    Unlike :func:`fedcca.transforms.cca_transform` the ridge is not scale-aware, so a rescaled
    copy is recovered exactly only as ``g -> 0``.

    Args:
        stats: Statistics of reference A and model B at the point.
        ridge: Absolute ridge ``g >= 0``.
        point: The point's name, for error messages.
    """
    return _ridged_cca(stats, ridge, scaled=False, point=point)


def trace_cca_transform(stats: PairStatistics, ridge: float, *, point: str = "?") -> Transform:
    """CCA transform with each own block ridged by ``ridge`` times its mean feature variance.

    ``S_aa = C_aa + ridge * mean(diag C_aa) I`` (likewise for B), then as
    :func:`paper_cca_transform`. A uniform rescaling of a layer leaves ``T`` exact, one grid
    fits every layer, and, unlike a per-feature relative ridge, features of small variance
    (nearly dead ReLUs, whose large negative pre-activations would otherwise be amplified by
    ``1/std`` and mixed into live channels) are shrunk towards zero weight.

    Args:
        stats: Statistics of reference A and model B at the point.
        ridge: Ridge relative to the mean variance (>= 0).
        point: The point's name, for error messages.
    """
    return _ridged_cca(stats, ridge, scaled=True, point=point)


def _ridged_cca(stats: PairStatistics, ridge: float, *, scaled: bool, point: str) -> Transform:
    """``T = S_aa^1/2 U V^T S_bb^-1/2`` with ``S = C + g I`` (``g`` times the mean variance if scaled)."""
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    c_aa, c_bb, c_ab = (c.double().cpu().numpy() for c in stats.covariances())
    if not all(np.isfinite(c).all() for c in (c_aa, c_bb, c_ab)):
        raise ValueError(f"point '{point}': non-finite covariances")
    eye = np.eye(len(c_aa))
    g_a = ridge * (c_aa.diagonal().mean() if scaled else 1.0)
    g_b = ridge * (c_bb.diagonal().mean() if scaled else 1.0)
    root_a, inv_root_a = _sym_roots(c_aa + g_a * eye, point, "reference")
    root_b, inv_root_b = _sym_roots(c_bb + g_b * eye, point, "model")
    u, _, vh = scipy.linalg.svd(inv_root_a @ c_ab @ inv_root_b)
    polar = u @ vh
    return Transform(matrix=torch.from_numpy(root_a @ polar @ inv_root_b),
                     inverse=torch.from_numpy(root_b @ polar.T @ inv_root_a))


def blend_transform(first: Transform, second: Transform, weight: float, *, point: str = "?") -> Transform:
    """``T = (1 - weight) * first + weight * second`` with a numerically computed inverse.

    Args:
        first: E.g. the rescaled permutation (``weight = 0`` returns it exactly).
        second: E.g. the CCA transform (``weight = 1`` returns it exactly).
        weight: Blend weight in [0, 1].
        point: The point's name, for error messages.

    Raises:
        ValueError: The blend is singular or ill-conditioned (condition number > 1e12).
    """
    if weight == 0:
        return first
    if weight == 1:
        return second
    matrix = (1 - weight) * first.matrix + weight * second.matrix
    cond = torch.linalg.cond(matrix).item()
    if not cond < 1e12:
        raise ValueError(f"point '{point}': blend with weight {weight} is singular (condition {cond:.3g})")
    return Transform(matrix=matrix, inverse=torch.linalg.inv(matrix))


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
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """Correct the merged model's pre-activation statistics towards the endpoints' (in place).

    Target of each channel at a point: the weighted average over endpoints ``k`` of the mean
    ``T_k mu_k`` and standard deviation ``sqrt(diag(T_k C_k T_k^T))`` of endpoint k's
    pre-activations (``mu_k``, ``C_k`` on the calibration data; ``T_k`` its transform, identity
    when absent). Points are corrected in forward order, each measured after the previous
    ones were fixed, by rescaling/shifting the producing conv/linear or BatchNorm's weight and
    bias. Points without a single producer (see :func:`preactivation_spec`) are skipped and
    logged. Call it after any BatchNorm recomputation (it edits BatchNorm affine parameters).

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
        device: Where forwards run.
        batch_size: Batch size for forwards.
    """
    if mode not in ("affine", "mean"):
        raise ValueError(f"repair mode must be 'affine' or 'mean', got {mode!r}")
    if len(transforms) != len(endpoints):
        raise ValueError(f"{len(transforms)} transform sets for {len(endpoints)} endpoints")
    weights = [1.0] * len(endpoints) if weights is None else [float(w) for w in weights]
    spec = spec_for(merged) if spec is None else spec
    pre_spec, producers = preactivation_spec(spec, merged)
    skipped = [p for p in spec.names() if p not in producers]
    if skipped:
        logger.warning("repair: points %s have no single pre-activation producer; left uncorrected", skipped)
    if not producers:
        return merged
    calibration = list(as_batches(calibration, batch_size))
    if endpoint_statistics is None:
        endpoint_statistics = preactivation_statistics(endpoints, calibration, spec, device=device)
    total = sum(weights)
    target_mean: dict[str, torch.Tensor] = {}
    target_std: dict[str, torch.Tensor] = {}
    for stats, ts, w in zip(endpoint_statistics, transforms, weights):
        for name, (mean, cov) in stats.items():
            t = ts.get(name)
            if t is not None:
                mean, cov = t.matrix @ mean, t.matrix @ cov @ t.matrix.T
            std = cov.diagonal().clamp_min(0).sqrt()
            target_mean[name] = target_mean.get(name, 0) + (w / total) * mean
            target_std[name] = target_std.get(name, 0) + (w / total) * std
    for point in pre_spec.points:
        single = AlignmentSpec((point,))
        pair = collect_statistics(merged, [merged], calibration, single, device=device)[0][point.name]
        mean = pair.means()[1].double()
        std = pair.covariances()[1].diagonal().clamp_min(0).sqrt().double()
        scale = torch.ones_like(std)
        if mode == "affine":
            flat = std <= _FLAT_RTOL * target_std[point.name].clamp_min(1e-30)
            if flat.any():
                logger.warning("repair: point '%s' has %d constant merged channel(s); only their mean "
                               "is corrected", point.name, int(flat.sum()))
            scale = torch.where(flat, 1.0, target_std[point.name] / std.clamp_min(1e-30))
        _affine_correct(merged, producers[point.name], scale, target_mean[point.name] - scale * mean)
    return merged


def preactivation_statistics(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec | None = None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per model, ``{point: (mean, covariance)}`` of its pre-activations (float64, CPU).

    Only points qualifying for :func:`preactivation_spec` are present. Models with BatchNorm
    are measured on a copy whose BatchNorm statistics were recomputed on ``calibration``, as
    the merged model's are: otherwise running statistics gathered on other data would make
    :func:`repair` move even a merge of identical models.

    Args:
        models: Models of one architecture.
        calibration: Inputs.
        spec: The alignment spec (default ``spec_for(models[0])``).
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    spec = spec_for(models[0]) if spec is None else spec
    pre_spec, _ = preactivation_spec(spec, models[0])
    if not pre_spec.points:
        return [{} for _ in models]
    out = []
    batches = list(as_batches(calibration, batch_size))
    for model in models:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = recompute_batchnorm(copy.deepcopy(model), batches, device=device)
        stats = collect_statistics(model, [model], batches, pre_spec, device=device)[0]
        out.append({name: (pair.means()[1].double(), pair.covariances()[1].double())
                    for name, pair in stats.items()})
    return out


def score(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
          device: torch.device | str | None = None, batch_size: int = 256) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on labelled inputs (eval mode, no grad).

    Args:
        model: Classifier producing logits.
        inputs: Inputs ``[N, ...]``.
        labels: Integer labels ``[N]``.
        device: Where to run.
        batch_size: Batch size.
    """
    device = resolve_device(device)
    loss, correct = 0.0, 0
    with running_on(model, device, training=False), torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start:start + batch_size].to(device), labels[start:start + batch_size].to(device)
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    return loss / len(inputs), correct / len(inputs)


# ----------------------------------------------------------------------------- helpers

def _statistics(recipe: Variant, models: Sequence[nn.Module], reference: int, others: list[int],
                calibration: torch.Tensor, spec: AlignmentSpec,
                given: Sequence[Mapping[str, PairStatistics] | None] | None,
                device: torch.device | str | None, batch_size: int) -> dict[int, Mapping[str, PairStatistics]]:
    """Statistics of each non-reference model against the reference (given or computed)."""
    if recipe.alignment in ("direct", "weight-matching"):
        return {}
    given = [None] * len(models) if given is None else list(given)
    if len(given) != len(models):
        raise ValueError(f"{len(given)} statistics entries for {len(models)} models")
    missing = [k for k in others if given[k] is None]
    if missing:
        computed = collect_statistics(models[reference], [models[k] for k in missing], calibration, spec,
                                      device=device, batch_size=batch_size)
        for k, stats in zip(missing, computed):
            given[k] = stats
    return {k: given[k] for k in others}  # type: ignore[misc]


def _transforms(recipe: Variant, spec: AlignmentSpec, stats: Mapping[str, PairStatistics],
                setting: Mapping[str, float]) -> dict[str, Transform]:
    """One model's transforms for one candidate setting."""
    out: dict[str, Transform] = {}
    for point in spec.names():
        if point not in stats:
            raise ValueError(f"no statistics for point '{point}'")
        pair = stats[point]
        if recipe.alignment == "permute":
            out[point] = permute_transform(pair, point=point)
        elif recipe.alignment == "cca":
            out[point] = cca_transform(pair, setting["ridge"], point=point)
        elif recipe.alignment == "cca-paper":
            out[point] = paper_cca_transform(pair, setting["ridge"], point=point)
        elif recipe.alignment == "cca-trace":
            out[point] = trace_cca_transform(pair, setting["ridge"], point=point)
        elif recipe.alignment == "blend":
            out[point] = blend_transform(permute_transform(pair, point=point),
                                         trace_cca_transform(pair, setting["ridge"], point=point),
                                         setting["blend"], point=point)
    return out


def _sym_roots(cov: np.ndarray, point: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric ``C^1/2`` and ``C^-1/2``; ValueError when ``C`` is not positive definite."""
    eigenvalues, vectors = scipy.linalg.eigh(cov)
    if not eigenvalues[0] > 1e-12 * max(eigenvalues[-1], 1e-300):
        raise ValueError(f"point '{point}': the {side}'s covariance (+ ridge) is singular; increase the ridge")
    return (vectors * np.sqrt(eigenvalues)) @ vectors.T, (vectors / np.sqrt(eigenvalues)) @ vectors.T


def _producer(point: AlignmentPoint, modules: Mapping[str, nn.Module]) -> str | None:
    """The one module whose output the point's ReLU taps consume, or None."""
    if not point.taps or not all(isinstance(modules.get(t), nn.ReLU) for t in point.taps):
        return None
    outs = {ax.key.rsplit(".", 1)[0] for ax in point.axes if ax.role in ("out", "var")}
    norms = [m for m in outs if isinstance(modules.get(m), nn.modules.batchnorm._BatchNorm)]
    if norms:
        return norms[0] if len(norms) == 1 else None
    layers = [m for m in outs if isinstance(modules.get(m), (nn.Conv2d, nn.Linear))]
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
