"""Merge recipes studied in issue 8, with hyper-parameters chosen on held-out calibration data.

:func:`merge_variant` is an all-to-one merge like :func:`fedcca.merging.merge`, driven by a
:class:`Variant` (or the name of one in :data:`VARIANTS`):

* alignment: ``"cca"`` (any :data:`~fedcca.transforms.RIDGE_MODES`: the library's default
  ``"trace"`` ridge, the per-feature ``"relative"`` one, or the paper's ``"absolute"`` one),
  ``"permute"``, ``"weight-matching"``, ``"direct"``, or ``"blend"``:
  ``T = (1 - l) P + l C`` between the rescaled permutation ``P`` and the CCA transform ``C``
  of the same statistics.
* candidates: when a variant lists several ridges / blend weights, each candidate is merged
  and scored on a labelled *held-out* calibration set (never test data); the best is kept.
* repair: ``"mean"`` or ``"affine"`` (:func:`fedcca.repair.repair`) after averaging.

Every variant is exact where its transforms are: merging a model with a positively
scaled-permutation copy of itself returns the model's function.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedcca.alignment import AlignmentSpec, Transform, apply_transforms, spec_for
from fedcca.batchnorm import recompute_batchnorm
from fedcca.devices import resolve_device
from fedcca.merging import average_state_dicts, zero_dead_features
from fedcca.repair import REPAIRS, preactivation_statistics, repair
from fedcca.statistics import PairStatistics, collect_statistics, running_on
from fedcca.training import evaluate
from fedcca.transforms import DEFAULT_RIDGE_MODE, RIDGE_MODES, cca_transform, permute_transform, weight_matching

logger = logging.getLogger(__name__)

ALIGNMENTS = ("cca", "permute", "weight-matching", "direct", "blend")
RELATIVE_RIDGES: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ABSOLUTE_RIDGES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
TRACE_RIDGES: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, float("inf"))
BLENDS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Variant:
    """A merge recipe: alignment, candidate hyper-parameters and post-averaging repair.

    Args:
        alignment: One of :data:`ALIGNMENTS`.
        ridges: CCA ridge candidates (for "cca" and the CCA part of "blend"), read in
            ``ridge_mode``; ``(None,)`` is the library default. Several -> chosen on held-out
            calibration data.
        ridge_mode: One of :data:`fedcca.transforms.RIDGE_MODES`.
        blends: Weights ``l`` of the CCA part for "blend" (0 = permutation, 1 = CCA).
        repair: One of :data:`fedcca.repair.REPAIRS`.
        zero_dead: Zero the weights of exactly-dead features before aligning
            (:func:`fedcca.merging.zero_dead_features`; statistics-based alignments only).
        description: One line for tables and reports.
    """

    alignment: str
    ridges: tuple[float | None, ...] = (None,)
    ridge_mode: str = DEFAULT_RIDGE_MODE
    blends: tuple[float, ...] = (1.0,)
    repair: str = "none"
    zero_dead: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose one of {ALIGNMENTS}")
        if self.ridge_mode not in RIDGE_MODES:
            raise ValueError(f"unknown ridge_mode {self.ridge_mode!r}; choose one of {RIDGE_MODES}")
        if self.repair not in REPAIRS:
            raise ValueError(f"unknown repair {self.repair!r}; choose one of {REPAIRS}")
        if not self.ridges or any(r is not None and not r >= 0 for r in self.ridges):
            raise ValueError(f"ridges must be a non-empty tuple of values >= 0 (or None), got {self.ridges}")
        if not self.blends or any(not 0 <= b <= 1 for b in self.blends):
            raise ValueError(f"blends must be a non-empty tuple of values in [0, 1], got {self.blends}")

    def candidates(self) -> list[dict[str, float | None]]:
        """The hyper-parameter settings to try (one when nothing is selected)."""
        ridges = self.ridges if self.alignment in ("cca", "blend") else (float("nan"),)
        blends = self.blends if self.alignment == "blend" else (float("nan"),)
        return [{"ridge": r, "blend": b} for r, b in itertools.product(ridges, blends)]


VARIANTS: dict[str, Variant] = {
    "direct": Variant("direct", description="no alignment (FedAvg of the weights)"),
    "permute": Variant("permute", description="correlation permutation, rescaled"),
    "weight-matching": Variant("weight-matching", description="Git Re-Basin weight matching"),
    "cca": Variant("cca", description="CCA, library default (trace ridge, fixed g)"),
    "cca-trace": Variant("cca", TRACE_RIDGES, description="CCA, trace ridge g mean(var) I, g chosen on held-out calibration"),
    "cca-procrustes": Variant("cca", (float("inf"),), description="CCA, trace ridge g -> inf (scaled orthogonal Procrustes)"),
    "cca-keep-dead": Variant("cca", zero_dead=False, description="cca without zeroing dead units first"),
    "permute-keep-dead": Variant("permute", zero_dead=False, description="permute without zeroing dead units first"),
    "cca-relative": Variant("cca", RELATIVE_RIDGES, "relative",
                            description="CCA, per-feature relative ridge g diag(C), g chosen on held-out calibration"),
    "cca-paper": Variant("cca", ABSOLUTE_RIDGES, "absolute",
                         description="CCA as in the paper (absolute ridge g I), g chosen on held-out calibration"),
    "blend": Variant("blend", blends=BLENDS, description="(1-l) P + l cca(default ridge), l chosen on held-out calibration"),
    "permute-mean": Variant("permute", repair="mean", description="permute + pre-activation mean correction"),
    "cca-mean": Variant("cca", repair="mean", description="cca + pre-activation mean correction"),
    "permute-repair": Variant("permute", repair="affine", description="permute + REPAIR (mean and std)"),
    "weight-matching-repair": Variant("weight-matching", repair="affine", description="weight matching + REPAIR"),
    "cca-repair": Variant("cca", repair="affine", description="cca + REPAIR (mean and std)"),
    "cca-trace-repair": Variant("cca", TRACE_RIDGES, repair="affine",
                                description="cca-trace + REPAIR, g chosen on held-out calibration"),
}
"""Named variants (see :class:`Variant`); ``"cca-paper"`` is the paper's transform."""


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
    if recipe.zero_dead and stats:
        states = zero_dead_features(states, models, target, [stats.get(k) for k in range(len(models))], spec)
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
    batches = [(inputs[start:start + batch_size], labels[start:start + batch_size])
               for start in range(0, len(inputs), batch_size)]
    with running_on(model, resolve_device(device), training=False):  # back on its device afterwards
        return evaluate(model, batches, device=device)


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
            out[point] = cca_transform(pair, setting["ridge"], ridge_mode=recipe.ridge_mode, point=point)
        elif recipe.alignment == "blend":
            out[point] = blend_transform(permute_transform(pair, point=point),
                                         cca_transform(pair, setting["ridge"], ridge_mode=recipe.ridge_mode, point=point),
                                         setting["blend"], point=point)
    return out
