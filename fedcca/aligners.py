"""The table of aligners: how each merge method turns one model into reference coordinates.

Each :class:`Aligner` says whether it reads activation statistics and computes the
transforms of one model at the selected points (:class:`AlignmentJob`). Merging
(:mod:`fedcca.merging`), the Flower strategy, the CLI and the benchmarks all look methods up
here, so a new method is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedcca.alignment import AlignmentSpec, Transform
from fedcca.statistics import PairStatistics
from fedcca.transforms import WhiteningCache, blend_transform, cca_transform, permute_transform, weight_matching

if TYPE_CHECKING:
    from fedcca.config import MergeConfig


@dataclass(frozen=True)
class AlignmentJob:
    """Everything an aligner may read to align one model.

    Args:
        spec: The points to align (a sub-spec of the model's).
        config: The merge configuration (ridge, blend, scale bound).
        statistics: Per-point statistics of the model against the reference (None for
            data-free aligners).
        state: The model's weights.
        reference_state: The reference's weights.
        name: How messages call the model.
        cache: What stays valid for every model aligned to this reference (e.g. its whitening).
    """

    spec: AlignmentSpec
    config: MergeConfig
    statistics: Mapping[str, PairStatistics] | None
    state: Mapping[str, torch.Tensor]
    reference_state: Mapping[str, torch.Tensor]
    name: str = "model"
    cache: WhiteningCache | None = None

    def pair(self, point: str) -> PairStatistics:
        """The statistics of ``point``; ValueError naming the model when they are missing."""
        if self.statistics is None or point not in self.statistics:
            raise ValueError(f"{self.name}: no statistics for point '{point}' (method {self.config.method!r})")
        return self.statistics[point]


@dataclass(frozen=True)
class Aligner:
    """One merge method.

    Args:
        name: The method's name (``MergeConfig.method``).
        needs_statistics: Whether it reads activation statistics against the reference.
        transforms: ``job -> {point: Transform}`` for every point of ``job.spec``.
        description: One line for documentation and tables.
        joint: It aligns all models together (:mod:`fedcca.zipit`) rather than each to the
            reference: only :func:`fedcca.merging.merge` can use it, with every model at hand.
        shrinkable: Its transforms stay invertible when shrunk towards the identity,
            ``I + a (T - I)`` for ``0 < a < 1`` (dense CCA transforms do; a permutation with a
            swap does not: ``(I + P) / 2`` has two equal rows).
    """

    name: str
    needs_statistics: bool
    transforms: Callable[[AlignmentJob], dict[str, Transform]]
    description: str
    joint: bool = False
    shrinkable: bool = True


def _cca(job: AlignmentJob) -> dict[str, Transform]:
    config = job.config
    return {p.name: cca_transform(job.pair(p.name), config.resolved_ridge, ridge_mode=config.ridge_mode, point=p.name,
                                  cache=job.cache)
            for p in job.spec.points}


def _permute(job: AlignmentJob) -> dict[str, Transform]:
    return {p.name: permute_transform(job.pair(p.name), max_scale=job.config.max_scale, point=p.name)
            for p in job.spec.points}


def _blend(job: AlignmentJob) -> dict[str, Transform]:
    permuted, canonical = _permute(job), _cca(job)
    return {p.name: blend_transform(permuted[p.name], canonical[p.name], job.config.blend, point=p.name)
            for p in job.spec.points}


def _weight_matching(job: AlignmentJob) -> dict[str, Transform]:
    return weight_matching(job.reference_state, job.state, job.spec)


def _direct(_: AlignmentJob) -> dict[str, Transform]:
    return {}


def _joint(job: AlignmentJob) -> dict[str, Transform]:
    raise ValueError(f"{job.name}: {job.config.method!r} aligns all models jointly, not one model to a reference; "
                     "merge the models together with fedcca.merge (CCAMerge cannot use it)")


ALIGNERS: dict[str, Aligner] = {
    aligner.name: aligner for aligner in (
        Aligner("cca", True, _cca, "CCA Merge (Horoi et al., 2024): T = S_aa^1/2 U V^T S_bb^-1/2"),
        Aligner("permute", True, _permute, "rescaled permutation matching features by correlation", shrinkable=False),
        Aligner("weight-matching", False, _weight_matching, "Git Re-Basin weight matching (data free)",
                shrinkable=False),
        Aligner("blend", True, _blend, "(1 - l) Permute + l CCA"),
        Aligner("zipit", False, _joint, "ZipIt! (Stoica et al., 2023): all models' features zipped jointly", joint=True),
        Aligner("direct", False, _direct, "no alignment: the plain (FedAvg) average"),
    )
}
"""Merge method name -> :class:`Aligner`."""

METHODS: tuple[str, ...] = tuple(ALIGNERS)
"""Names of the merge methods, for argument choices."""
