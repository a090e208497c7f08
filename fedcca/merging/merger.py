"""Merging models: align each to a reference, then average (CCA Merge and baselines).

One pipeline serves offline merging (:func:`merge`), merging with a choice of
hyper-parameters (a :class:`~fedcca.merging.config.MergeSearch` with labelled ``holdout`` data) and the Flower strategy: a
:class:`Merger` takes models one at a time (or in small groups), aligns each to the reference
with the aligner of every candidate :class:`~fedcca.merging.config.MergeConfig`
(:data:`fedcca.methods.registry.ALIGNERS`), shrinks the transforms towards the identity by the
candidate's ``shrinkage`` and adds the aligned weights to that candidate's running weighted
sum. Memory is the reference plus one running sum per candidate, whatever the number of
models. :meth:`Merger.finish` turns each sum into a model (BatchNorm recomputed, REPAIR,
norm balancing) and, with several candidates, keeps the one chosen on labelled held-out data.

With ``zero_dead``, features that are exactly zero on the calibration data (dead ReLU units)
have their weights zeroed before alignment (:func:`fedcca.spec.alignment.zero_features`,
function-preserving on that data), so that their strongly negative biases are neither mixed
into live units by a dense CCA transform nor averaged into a matched live unit.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedcca.blas import one_blas_thread
from fedcca.merging.averages import AVERAGES, RobustAverage, WeightedSum, make_average
from fedcca.merging.batchnorm import (
    fold_batchnorm,
    folded_spec,
    recompute_batchnorm,
    refit_batchnorm,
    unfolded_points,
)
from fedcca.merging.config import MergeConfig, MergeSearch, resolve_search
from fedcca.merging.repair import (
    RepairTargets,
    norm_output_spec,
    norm_output_statistics,
    preactivation_spec,
    preactivation_statistics,
    repair_to_targets,
    restore_norms,
)
from fedcca.merging.selection import CandidateScore, choose
from fedcca.methods.common import shrink_transform
from fedcca.methods.registry import ALIGNERS, AlignmentJob
from fedcca.methods.zipit import zipit_transforms
from fedcca.spec.alignment import (
    AlignmentSpec,
    Transform,
    apply_transforms,
    balance_norms,
    describe_left,
    zero_features,
)
from fedcca.spec.tracing import spec_for
from fedcca.statistics import PairStatistics, as_batches, collect_statistics

__all__ = ["AVERAGES", "MergeError", "MergeResult", "Merger", "average_state_dicts",
           "merge", "merge_sequential", "recompute_batchnorm"]

logger = logging.getLogger(__name__)

MergeChoices = MergeConfig | MergeSearch | str | None
"""What a merge is told to do: a configuration, a search over candidates, a method name, or
None (the defaults)."""


class MergeError(ValueError):
    """A merge produced unusable weights (non-finite values), naming the key."""


class AlignmentBoundError(MergeError):
    """A model's aligned weights moved beyond :class:`Merger`'s ``max_norm_growth`` (e.g. forged statistics)."""


@dataclass
class MergeResult:
    """The outcome of a merge.

    Args:
        model: The merged model.
        config: The configuration that produced it (the chosen candidate).
        scores: Held-out scores of every candidate (empty with a single candidate).
        dead_features: Per added model (by name): ``{point: number of features exactly 0 on the
            calibration data}`` (points without any left out).
        transforms: Per added model (by name), the chosen candidate's transforms, when the
            merger was asked to keep them.
        baseline: The baseline candidate's merged model (candidate 0; None with a single candidate).
        baseline_config: Its configuration.
    """

    model: nn.Module
    config: MergeConfig
    scores: list[CandidateScore] = field(default_factory=list)
    dead_features: dict[str, dict[str, int]] = field(default_factory=dict)
    transforms: dict[str, dict[str, Transform]] = field(default_factory=dict)
    baseline: nn.Module | None = None
    baseline_config: MergeConfig | None = None


@dataclass
class _Candidate:
    """One candidate's running state inside a :class:`Merger`."""

    config: MergeConfig
    sum: WeightedSum | RobustAverage = field(default_factory=WeightedSum)
    moved: set[str] = field(default_factory=set)  # points some transform changed
    repair: RepairTargets = field(default_factory=RepairTargets)
    norms: RepairTargets = field(default_factory=RepairTargets)  # folded BatchNorms' output targets
    transforms: dict[str, dict[str, Transform]] = field(default_factory=dict)


class Merger:
    """Align models to one reference and keep a running weighted average per candidate configuration.

    Args:
        reference: The alignment target (not modified). It is averaged only if added itself
            with ``add(..., is_reference=True)``.
        calibration: Unlabelled inputs for statistics, BatchNorm and REPAIR (a tensor or an
            iterable of batches; read several times).
        choices: A :class:`MergeConfig`, a :class:`MergeSearch`, a method name or None.
        holdout: Labelled ``(inputs, labels)`` disjoint from ``calibration``; required when
            there are several candidates, read only to choose among them.
        spec: The architecture's alignment spec (default ``spec_for(reference)`` when needed).
        device: Where forwards run (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.
        keep_transforms: Keep every model's transforms in the result (memory grows with K).
        average: One of :data:`AVERAGES`: "mean" (the weighted running sum; memory does not grow
            with the number of models) or a robust coordinate-wise "median" / "trimmed" mean of
            the aligned models (unweighted; every aligned model is kept until :meth:`finish`).
        max_norm_growth: Refuse a model (:class:`AlignmentBoundError`) whose weights after
            alignment have more than this many times their norm before it, or less than its
            inverse: honest transforms move features, not the weights' scale; statistics that
            do not describe the model (forged, or from another model) can scale them by orders
            of magnitude. None: no bound (offline merges of trusted models).
        contributes: The merger only computes one model's additive share of a merge
            (:func:`fedcca.merging.contribution.contribution`, e.g. on a client): no ``holdout`` needed.
    """

    def __init__(
        self,
        reference: nn.Module,
        calibration: torch.Tensor | Iterable,
        choices: MergeChoices = None,
        *,
        holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
        spec: AlignmentSpec | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 256,
        keep_transforms: bool = False,
        max_norm_growth: float | None = None,
        average: str = "mean",
        contributes: bool = False,
    ) -> None:
        if average not in AVERAGES:
            raise ValueError(f"unknown average {average!r}; choose one of {', '.join(AVERAGES)}")
        if max_norm_growth is not None and not max_norm_growth >= 1:
            raise ValueError(f"max_norm_growth must be >= 1 (None: no bound), got {max_norm_growth!r}")
        self.max_norm_growth = max_norm_growth
        self.average = average
        self.norm_growth: dict[str, float] = {}  # per model: the largest factor alignment moved its norm by
        self.search = resolve_search(choices)
        self.candidates = [_Candidate(config, make_average(average), repair=RepairTargets(average),
                                      norms=RepairTargets(average))
                           for config in self.search.candidates()]
        if len(self.candidates) > 1 and holdout is None and not contributes:
            raise ValueError(f"{len(self.candidates)} candidate merge configurations need a labelled holdout set")
        self.reference = reference
        self.calibration = list(as_batches(calibration, batch_size))
        self.holdout = holdout
        self.device = device
        self.batch_size = batch_size
        self.keep_transforms = keep_transforms
        self.template = _state_of(reference)
        needs_spec = any(c.config.aligns or c.config.repair != "none" for c in self.candidates)
        example = self.calibration[0] if self.calibration else None  # traces a model without alignment_spec()
        strict = self.search.base.strict
        self.spec = (spec if spec is not None else spec_for(reference, example, strict=strict)) if needs_spec else spec
        if self.spec is not None and self.spec.left:
            logger.info("partial alignment: %d point(s) aligned; left unaligned (averaged as FedAvg does): %s",
                        len(self.spec.points), describe_left(self.spec))
        self.needs_statistics = any(c.config.needs_statistics for c in self.candidates)
        folding = self.spec is not None and any(self._folds(c.config) for c in self.candidates)
        self.folded_spec = folded_spec(self.spec) if folding else None
        self.folded_template = fold_batchnorm(reference, self.spec) if folding else None
        self._norm_owners = norm_output_spec(self.spec, reference)[1] if folding else {}
        # point -> the BatchNorm producing its pre-activation (that BatchNorm's output is the pre-activation)
        self._norm_producers = {point: producer for point, producer in
                                preactivation_spec(self.spec, reference)[1].items() if producer in self._norm_owners} \
            if folding else {}
        if folding and unfolded_points(self.spec):
            logger.warning("points %s hold BatchNorms the spec does not pair with their producer (spec.norms): "
                           "their BatchNorm vectors are transformed without folding",
                           [p.name for p in unfolded_points(self.spec)])
        self._has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in reference.modules())
        self.dead_features: dict[str, dict[str, int]] = {}
        self._cache: dict[str, Any] = {}  # what methods keep per reference (CCA: its whitening per point)
        self._reference_dead: dict[str, torch.Tensor] | None = None
        self._pending_reference: tuple[dict[str, torch.Tensor], float, str] | None = None
        self._count = 0

    # ------------------------------------------------------------------ adding models

    def add(self, model: nn.Module, weight: float = 1.0, statistics: Mapping[str, PairStatistics] | None = None,
            *, name: str | None = None, is_reference: bool = False,
            preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Align ``model`` and add it to every candidate's running average.

        Args:
            model: A model of the reference's architecture (not modified).
            weight: Its non-negative averaging weight.
            statistics: Its per-point statistics against the reference (e.g. sent by a
                client); computed here when needed and not given.
            name: How messages and the result call it (default ``models[i]``).
            is_reference: It is the reference itself (averaged without a transform).
            preactivation: Its pre-activation ``{point: (mean, covariance)}`` measured with its
                BatchNorms as they are (e.g. sent by a client,
                :func:`fedcca.merging.repair.preactivation_statistics` with ``recompute_bn=False``):
                REPAIR's targets without a pass of the model here, for candidates whose merge
                measures endpoints that way (BatchNorm-folded ones, or any without BatchNorm).

        Raises:
            ValueError: A layout that differs from the reference's, a bad weight, missing statistics.
            fedcca.statistics.StatisticsError: Its features on the calibration data are not finite.
            MergeError: Its aligned weights are not finite.
        """
        self.add_many([model], [weight], [statistics], names=None if name is None else [name],
                      references=[is_reference], preactivation=[preactivation])

    def add_many(
        self,
        models: Sequence[nn.Module],
        weights: Sequence[float],
        statistics: Sequence[Mapping[str, PairStatistics] | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        references: Sequence[bool] | None = None,
        transforms: Sequence[Mapping[str, Transform]] | None = None,
        preactivation: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
    ) -> None:
        """:meth:`add` for a group: missing statistics are computed in one pass over the calibration data.

        Args:
            models: Models of the reference's architecture.
            weights: One weight per model.
            statistics: One entry (or None) per model.
            names: One name per model.
            references: One flag per model (see :meth:`add`).
            transforms: Transforms computed elsewhere (e.g. jointly, :mod:`fedcca.methods.zipit`), one set
                per model, used instead of the aligner's (single-candidate merges only).
            preactivation: One entry (or None) per model (see :meth:`add`).
        """
        count = len(models)
        statistics = [None] * count if statistics is None else list(statistics)
        names = [f"models[{self._count + i}]" for i in range(count)] if names is None else list(names)
        references = [False] * count if references is None else list(references)
        if not len(weights) == len(statistics) == len(names) == len(references) == count:
            raise ValueError(f"add_many: {count} models but {len(weights)} weights, {len(statistics)} statistics, "
                             f"{len(names)} names and {len(references)} flags")
        weights = [_checked_weight(w, name) for w, name in zip(weights, names)]
        states = [_state_of(model) for model in models]
        for state, name in zip(states, names):
            _check_same_layout(self.template, state, name)
        if transforms is not None and (len(transforms) != count or len(self.candidates) != 1):
            raise ValueError(f"add_many: {len(transforms)} given transform sets for {count} models "
                             f"and {len(self.candidates)} candidates (one candidate only)")
        statistics = self._filled_statistics(models, statistics, references)
        given = [None] * count if transforms is None else list(transforms)
        measured = [None] * count if preactivation is None else list(preactivation)
        if len(measured) != count:
            raise ValueError(f"add_many: {len(measured)} pre-activation entries for {count} models")
        with one_blas_thread():  # scipy's decompositions alternate with torch's products (fedcca.blas)
            for model, state, weight, stats, name, is_reference, fixed, pre in zip(
                    models, states, weights, statistics, names, references, given, measured):
                self._count += 1
                if is_reference:
                    self._pending_reference = (state, weight, name)  # zeroed once the reference's dead units are known
                    continue
                self._note_reference_dead(stats)
                self._accumulate(model, state, weight, stats, name, fixed, preactivation=pre)

    def _filled_statistics(self, models: Sequence[nn.Module], given: list[Mapping[str, PairStatistics] | None],
                           references: Sequence[bool]) -> list[Mapping[str, PairStatistics] | None]:
        if not self.needs_statistics:
            return given
        missing = [i for i, stats in enumerate(given) if stats is None and not references[i]]
        if missing:
            assert self.spec is not None
            computed = collect_statistics(self.reference, [models[i] for i in missing], self.calibration, self.spec,
                                          points=self._statistics_points(), device=self.device)
            for i, stats in zip(missing, computed):
                given[i] = stats
        return given

    def _statistics_points(self) -> list[str]:
        assert self.spec is not None
        selected: set[str] = set()
        for candidate in self.candidates:
            if candidate.config.needs_statistics:
                selected.update(self.points(candidate.config))
        return [name for name in self.spec.names() if name in selected]

    def _note_reference_dead(self, stats: Mapping[str, PairStatistics] | None) -> None:
        """The reference's dead features: its side of any model's statistics (the same for all)."""
        if self._reference_dead is None and stats is not None:
            self._reference_dead = {point: pair.zero_features()[0] for point, pair in stats.items()}

    def _accumulate(self, model: nn.Module, state: dict[str, torch.Tensor], weight: float,
                    stats: Mapping[str, PairStatistics] | None, name: str,
                    given: Mapping[str, Transform] | None = None, is_reference: bool = False,
                    preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Add one model to every candidate (the reference itself: ``given={}``, its own dead units zeroed)."""
        if stats is not None:
            dead = {point: int(pair.zero_features()[1].sum()) for point, pair in stats.items()}
            self.dead_features[name] = {point: count for point, count in dead.items() if count}
        forms: dict[bool, dict[str, torch.Tensor]] = {False: state}  # folded or not
        zeroed: dict[bool, dict[str, torch.Tensor]] = {}
        base: dict[tuple, dict[str, Transform]] = {}
        endpoints: dict[bool, dict] = {}  # pre-activation statistics, as folded or unfolded merges use them
        norm_outputs: dict | None = None  # BatchNorm outputs, for folded merges
        additions = []  # computed for every candidate first: a failure adds nothing anywhere
        for candidate in self.candidates:
            config = candidate.config
            fold = self._folds(config)
            if fold not in forms:
                forms[fold] = self._template(fold) if is_reference else fold_batchnorm(model, self.spec)
            work, spec = forms[fold], self._spec(fold)
            dead_known = self._reference_dead is not None if is_reference else stats is not None
            if config.zero_dead and config.needs_statistics and dead_known:
                if fold not in zeroed:
                    assert spec is not None
                    zeroed[fold] = (self._zero_dead(work, None, spec, side=0, name=name) if is_reference
                                    else self._zero_dead(work, stats, spec, side=1))
                work = zeroed[fold]
            transforms: dict[str, Transform] = {}
            if given is not None:
                transforms = dict(given)
            elif config.aligns:
                key = _aligner_key(config, fold)
                if key not in base:
                    assert spec is not None
                    job = AlignmentJob(self._sub_spec(config, spec), config.method_options(), stats, work,
                                       self._template(fold), name, self._cache)
                    base[key] = ALIGNERS[config.method].transforms(job)
                transforms = {point: shrink_transform(t, config.shrinkage, point=point)
                              for point, t in base[key].items()}
            if transforms:
                before = work
                work = apply_transforms(work, spec, transforms)
                _check_finite(work, f"{name} after {config.label()} alignment")
                self._check_growth(before, work, name, config)
            if config.repair != "none" and fold not in endpoints:
                endpoints[fold] = dict(preactivation) if preactivation is not None and self._as_measured(fold) \
                    else self._endpoint_statistics(model, fold)
            if self._restores(config) and norm_outputs is None:
                norm_outputs = self._norm_statistics(model, preactivation)
            additions.append((candidate, work, transforms, fold))
        for candidate, work, transforms, fold in additions:
            if transforms and candidate.config.needs_statistics:  # statistics-based transforms rescale features
                candidate.moved.update(point for point, t in transforms.items() if not _is_identity(t))
            if candidate.config.repair != "none":
                candidate.repair.add(endpoints[fold], transforms, weight)
            if self._restores(candidate.config):
                candidate.norms.add(norm_outputs, self._norm_transforms(transforms), weight)
            candidate.sum.add(work, weight)
            if self.keep_transforms:
                candidate.transforms[name] = transforms

    def _check_growth(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], name: str,
                      config: MergeConfig) -> None:
        """Record how alignment changed the weights' norm (``norm_growth``); ``max_norm_growth`` bounds it."""
        old, new = _float_norm(before), _float_norm(after)
        growth = new / old if old > 0 else (1.0 if new == 0 else float("inf"))
        extreme = max(growth, 1 / growth) if growth > 0 else float("inf")
        self.norm_growth[name] = max(self.norm_growth.get(name, 1.0), extreme)
        if self.max_norm_growth is None:
            return
        if not 1 / self.max_norm_growth <= growth <= self.max_norm_growth:
            raise AlignmentBoundError(
                f"{name}: its weights after {config.label()} alignment have {growth:.3g}x the norm they had "
                f"(bound {self.max_norm_growth:g}x): the statistics do not describe this model, or the alignment "
                "is degenerate")

    def _zero_dead(self, state: dict[str, torch.Tensor], stats: Mapping[str, PairStatistics] | None,
                   spec: AlignmentSpec, side: int, name: str | None = None) -> dict[str, torch.Tensor]:
        """``state`` with the dead features of the model (``side`` 1, from ``stats``) or of the reference (0) zeroed."""
        if side == 0:
            masks = dict(self._reference_dead or {})
        else:
            masks = {point: pair.zero_features()[side] for point, pair in (stats or {}).items()}
        # zeroing a unit before a GroupNorm/LayerNorm changes its group's statistics: not there
        masks = {point: mask for point, mask in masks.items() if point in spec.names() and spec.point(point).groups is None}
        masks = {point: mask for point, mask in masks.items() if mask.any()}
        if side == 0 and name is not None:
            self.dead_features[name] = {point: int(mask.sum()) for point, mask in masks.items()}
        if not masks:
            return state
        return zero_features(state, spec, masks)

    def _as_measured(self, fold: bool) -> bool:
        """Whether endpoints measured with their BatchNorms as they are serve a ``fold`` merge (whose
        targets are measured so) — always, for a model without BatchNorm."""
        return fold or not self._has_batchnorm

    def _endpoint_statistics(self, model: nn.Module, fold: bool) -> dict:
        """REPAIR's view of one endpoint: BatchNorm as the model has it (folded merges) or recomputed."""
        return preactivation_statistics([model], self.calibration, self.spec, recompute_bn=not fold,
                                        device=self.device)[0]

    def _restores(self, config: MergeConfig) -> bool:
        """Whether ``config``'s merge restores its folded BatchNorms (real statistics, averaged outputs)."""
        return config.recompute_bn and self._folds(config)

    def _norm_statistics(self, model: nn.Module,
                         preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
        """The outputs of ``model``'s BatchNorms: what a folded merge's BatchNorms are restored to.

        A BatchNorm that produces a point's pre-activation has its output in ``preactivation``
        (measured with the model's own statistics, as here): when that covers every BatchNorm,
        the model is not run.
        """
        assert self.spec is not None
        if preactivation is not None:
            given = {norm: preactivation[point] for point, norm in self._norm_producers.items() if point in preactivation}
            if set(given) >= set(self._norm_owners):
                return {norm: given[norm] for norm in self._norm_owners}
        return norm_output_statistics([model], self.calibration, self.spec, device=self.device)[0]

    def _norm_transforms(self, transforms: Mapping[str, Transform]) -> dict[str, Transform]:
        """``transforms`` keyed by BatchNorm (each BatchNorm's output lives in its point's coordinates)."""
        return {norm: transforms[point] for norm, point in self._norm_owners.items() if point in transforms}

    def _folds(self, config: MergeConfig) -> bool:
        """Whether ``config``'s models are aligned in BatchNorm-folded form."""
        return config.fold_bn and config.aligns and self.spec is not None and bool(self.spec.norms)

    def _spec(self, fold: bool) -> AlignmentSpec | None:
        return self.folded_spec if fold else self.spec

    def _template(self, fold: bool) -> dict[str, torch.Tensor]:
        return self.folded_template if fold and self.folded_template is not None else self.template

    # ------------------------------------------------------------------ results

    def finish(self) -> MergeResult:
        """The merged model of every candidate; with several, the one chosen on the held-out data.

        Raises:
            ValueError: Nothing with a positive weight was added.
            MergeError: A merged model has non-finite weights.
        """
        self._add_pending_reference()
        merged = [self._finish_candidate(candidate) for candidate in self.candidates]
        scores: list[CandidateScore] = []
        index = 0
        if len(merged) > 1:
            assert self.holdout is not None
            index, scores = choose(merged, [c.config for c in self.candidates], *self.holdout,
                                   min_z=self.search.min_z, device=self.device, batch_size=self.batch_size)
        chosen = self.candidates[index]
        several = len(merged) > 1
        return MergeResult(merged[index], chosen.config, scores, dict(self.dead_features), dict(chosen.transforms),
                           baseline=merged[0] if several else None,
                           baseline_config=self.candidates[0].config if several else None)

    def _add_pending_reference(self) -> None:
        if self._pending_reference is None:
            return
        state, weight, name = self._pending_reference
        self._pending_reference = None
        self._accumulate(self.reference, state, weight, None, name, given={}, is_reference=True)

    def _finish_candidate(self, candidate: _Candidate) -> nn.Module:
        config = candidate.config
        averaged = candidate.sum.average(self.template)
        _check_finite(averaged, f"the merged model ({config.label()})")
        merged = copy.deepcopy(self.reference)
        merged.load_state_dict(averaged)
        if self._restores(config):
            assert self.spec is not None
            refit_batchnorm(merged, self.spec, self.calibration, device=self.device)
            restore_norms(merged, candidate.norms.targets(), self.calibration, self.spec, device=self.device)
        elif config.recompute_bn:
            recompute_batchnorm(merged, self.calibration, device=self.device)
        if config.repair != "none":
            assert self.spec is not None
            # A point whose pre-activation is the output of a BatchNorm just restored has the targets
            # REPAIR would set (the same endpoints, transforms and weights), until REPAIR corrects an
            # earlier point (its output feeds that BatchNorm): the leading restored points are skipped.
            restored = set(self._norm_producers) if self._restores(config) else set()
            points = list(self.spec.points)  # forward order, as REPAIR corrects them
            while points and points[0].name in restored:
                points.pop(0)
            repaired = AlignmentSpec(tuple(points))
            if repaired.points:
                repair_to_targets(merged, candidate.repair.targets(), self.calibration, mode=config.repair,
                                  spec=repaired, device=self.device)
        moved = [name for name in self.points(config) if name in candidate.moved
                 and self.spec.point(name).groups is None] if candidate.moved else []  # rescaling breaks group norms
        if config.balance and moved:
            # Last: a positive rescaling keeps the function, BatchNorm statistics and repair intact.
            assert self.spec is not None
            points = AlignmentSpec(tuple(self.spec.point(name) for name in moved))
            merged.load_state_dict(balance_norms(merged.state_dict(), points, like=self.template))
        return merged

    def points(self, config: MergeConfig) -> list[str]:
        """The names of the points ``config`` aligns (all of the spec's unless it selects some)."""
        assert self.spec is not None
        return self.spec.names() if config.points is None else list(config.points)

    def _sub_spec(self, config: MergeConfig, spec: AlignmentSpec) -> AlignmentSpec:
        """The points ``config`` aligns; points normalised in groups only for permutation methods
        (a dense transform does not pass a GroupNorm/LayerNorm: those points are averaged as they are)."""
        permutes = ALIGNERS[config.method].permutation
        return AlignmentSpec(tuple(spec.point(name) for name in self.points(config)
                                   if permutes or spec.point(name).groups is None))


def merge(models: Sequence[nn.Module], calibration: torch.Tensor | Iterable, config: MergeChoices = None,
          **kwargs: Any) -> nn.Module:
    """Align every model to the reference, average them, recompute BatchNorm statistics.

    ``merge(models, x)`` is CCA Merge with the defaults; ``merge(models, x, "permute")``,
    ``merge(models, x, method="cca", ridge=0.1, repair="affine")`` or
    ``merge(models, x, MergeConfig(...))`` choose otherwise (keywords are
    :class:`~fedcca.merging.config.MergeConfig` fields). It is :func:`merge_with_result` (which documents
    every argument: reference, weights, statistics, holdout, device, ...) returning the model alone.

    Args:
        models: Models of one architecture; they are not modified.
        calibration: Inputs for statistics and BatchNorm (see :func:`fedcca.statistics.as_batches`).
        config: A :class:`MergeConfig`, a :class:`MergeSearch`, a method name, or None.
        **kwargs: The other arguments of :func:`merge_with_result`.

    Returns:
        A new model (a deep copy of the reference holding the merged weights).
    """
    return merge_with_result(models, calibration, config, **kwargs).model


def merge_with_result(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    config: MergeChoices = None,
    reference: int | nn.Module = 0,
    weights: Sequence[float] | None = None,
    *,
    statistics: Sequence[Mapping[str, PairStatistics] | None] | None = None,
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    keep_transforms: bool = False,
    **options: Any,
) -> MergeResult:
    """Merge all-to-one and return the :class:`MergeResult` (model, chosen configuration, held-out scores).

    Args:
        models: Models of one architecture (describable by ``fedcca.spec.tracing.spec_for``
            unless nothing is aligned); they are not modified.
        calibration: Inputs for statistics and BatchNorm (see :func:`fedcca.statistics.as_batches`).
        config: A :class:`MergeConfig`, a :class:`MergeSearch`, a method name, or None (the defaults).
        reference: Index of the reference in ``models`` (it is averaged too), or a separate
            model used only as the alignment target and not averaged.
        weights: Non-negative averaging weights, one per model (default uniform).
        statistics: ``statistics[k]``: precomputed statistics of ``models[k]`` against the
            reference (e.g. sent by a client), or None to compute them here.
        holdout: Labelled ``(inputs, labels)`` to choose among a search's candidates.
        device: Where forwards run (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.
        keep_transforms: Keep every model's transforms in the result.
        **options: :class:`MergeConfig` fields overriding ``config``.

    Raises:
        ValueError: Unknown method or option value (listing the choices), bad weights,
            reference or statistics, models whose state dicts differ in keys or shapes.
        MergeError: Non-finite merged weights, naming the key.
    """
    if not models:
        raise ValueError("merge: no models given")
    search = resolve_search(config, **options)
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models")
    statistics = [None] * len(models) if statistics is None else list(statistics)
    if len(statistics) != len(models):
        raise ValueError(f"{len(statistics)} statistics entries for {len(models)} models")
    target = _reference_model(models, reference)
    merger = Merger(target, calibration, search, holdout=holdout, device=device, batch_size=batch_size,
                    keep_transforms=keep_transforms)
    names = [f"models[{k}]" for k in range(len(models))]
    joint = [c for c in search.candidates() if c.aligns and ALIGNERS[c.method].joint]
    if joint:
        merger.add_many(models, weights, names=names, references=[False] * len(models),
                        transforms=_joint_transforms(joint, search, merger, models, weights, batch_size))
    else:
        merger.add_many(models, weights, statistics, names=names, references=[model is target for model in models])
    return merger.finish()


def _joint_transforms(joint: Sequence[MergeConfig], search: MergeSearch, merger: Merger,
                      models: Sequence[nn.Module], weights: Sequence[float],
                      batch_size: int) -> list[dict[str, Transform]]:
    """Every model's transforms from a joint aligner (ZipIt!), over the configuration's points."""
    if len(search.candidates()) != 1:
        raise ValueError(f"{joint[0].method!r} aligns all models jointly: a search over it is not supported")
    assert merger.spec is not None
    points = AlignmentSpec(tuple(merger.spec.point(name) for name in merger.points(joint[0])
                                 if merger.spec.point(name).groups is None))  # ZipIt! is a dense transform
    with one_blas_thread():
        return zipit_transforms(models, merger.calibration, points, weights, device=merger.device,
                                batch_size=batch_size)


def merge_sequential(
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    config: MergeChoices = None,
    weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Merge pairwise into a running model: ``m = merge([m, models[k]])`` for k = 1..K-1.

    The running model is the reference of each step and carries the summed weight of the
    models already merged, so uniform weights give every model an equal share.

    Args:
        models: Models to merge, in order.
        calibration: Inputs for statistics and BatchNorm.
        config: As for :func:`merge`.
        weights: Non-negative weights, one per model (default uniform).
        **kwargs: Passed to :func:`merge` (``device``, ``batch_size`` and MergeConfig fields);
            ``reference`` and ``statistics`` are not allowed.
    """
    clash = sorted({"reference", "statistics"} & set(kwargs))
    if clash:
        raise TypeError(f"merge_sequential: {clash} cannot be given (the running model is the reference)")
    if not models:
        raise ValueError("merge_sequential: no models given")
    weights = [1.0] * len(models) if weights is None else [_checked_weight(w, "weights") for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"{len(weights)} weights for {len(models)} models")
    running, running_weight = merge([models[0]], calibration, config, weights=[1.0], **kwargs), weights[0]
    for model, weight in zip(models[1:], weights[1:]):
        if running_weight + weight == 0:
            continue  # nothing to average yet
        running = merge([running, model], calibration, config, weights=[running_weight, weight], **kwargs)
        running_weight += weight
    return running


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
    weights = [1.0] * len(state_dicts) if weights is None else [_checked_weight(w, "weights") for w in weights]
    if len(weights) != len(state_dicts):
        raise ValueError(f"{len(weights)} weights for {len(state_dicts)} models")
    if sum(weights) <= 0:
        raise ValueError(f"weights must not all be zero, got {weights}")
    first = state_dicts[0]
    total = WeightedSum()
    for index, (state, weight) in enumerate(zip(state_dicts, weights)):
        _check_same_layout(first, state, f"state_dicts[{index}]")
        total.add(state, weight)
    averaged = total.average(first)
    _check_finite(averaged, "the merged model")
    return averaged


# ----------------------------------------------------------------------------- helpers

def _aligner_key(config: MergeConfig, fold: bool) -> tuple:
    """The fields an aligner's transforms depend on (candidates sharing them share transforms)."""
    return (config.method, tuple(sorted(config.method_options().items())), config.points, config.zero_dead, fold)


def _float_norm(state: Mapping[str, torch.Tensor]) -> float:
    return float(sum(float(value.detach().double().square().sum()) for value in state.values()
                     if value.is_floating_point()) ** 0.5)


def _is_identity(transform: Transform) -> bool:
    return torch.equal(transform.matrix, torch.eye(transform.size, dtype=transform.matrix.dtype))


def _checked_weight(weight: Any, name: str) -> float:
    value = float(weight)
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name}: weights must be finite and non-negative, got {weight!r}")
    return value


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
