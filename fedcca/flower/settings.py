"""What a CCAMerge strategy fixes once for every round's aggregation: typed and validated when built."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from fedcca.merging.config import MergeSearch
from fedcca.merging.distillation import DistillConfig, transfer_images
from fedcca.merging.merger import AVERAGES
from fedcca.methods.registry import ALIGNERS
from fedcca.spec.alignment import AlignmentSpec

REFERENCES: tuple[str, ...] = ("auto", "global", "best", "largest", "first")
"""Reference policies: "auto" ("best" in round 1, the global model after; see
:meth:`AggregationSettings.reference_in`), "global", "best" (the reply most accurate on the hold-out
set, ties within one standard error to the most capped examples; without one, the medoid: the reply
whose weights are nearest the others'), "largest" (the
most ``num-examples``, capped: a claim a client makes), "first"."""
STATISTICS_SOURCES: tuple[str, ...] = ("client", "server")
"""Where alignment statistics are computed."""
ALIGNMENT_SITES: tuple[str, ...] = ("server", "client")
"""Where models are aligned in rounds whose reference is the global model: by the server, or by each
client before it replies (:mod:`fedcca.flower.client_alignment`; the server then only sums)."""


@dataclass(frozen=True)
class AggregationSettings:
    """What a strategy fixed once for every round's aggregation.

    Args:
        model_fn: Builds a fresh model of the federated architecture.
        template: A state dict of that model (keys, shapes and dtypes replies must have).
        spec: Its alignment spec (None when nothing is aligned).
        search: The merge configuration(s).
        calibration: Calibration batches.
        holdout: Labelled held-out data to choose among candidates, or None.
        reference: One of :data:`REFERENCES` (see :meth:`reference_in`).
        client_statistics: Clients compute statistics (``stats="client"``) when the reference
            is the global model (see :meth:`client_statistics_in`).
        device: Where statistics and merges run.
        batch_size: Calibration batch size.
        statistics_group: Replies whose statistics are computed together.
        weights_key: Record name of the weights in a reply.
        weighted_by_key: Metric holding the number of examples.
        min_replies: The fewest valid replies a round needs.
        distill: Distil the merge toward the clients' ensemble (:mod:`fedcca.merging.distillation`), or None.
        average: "mean" or a robust "median" / "trimmed" mean of the aligned replies
            (:data:`fedcca.merging.merger.AVERAGES`).
        max_norm_growth: A reply whose aligned weights have more than this many times the norm
            of its own (or less than the inverse) is dropped (:class:`~fedcca.merging.merger.Merger`).
        max_weight_ratio: A reply's merge weight is at most this many times the median
            ``num-examples`` claimed in the round (inf: FedAvg's uncapped weights).
        preactivation_sizes: ``{point: features}`` of the points REPAIR corrects, whose
            pre-activation moments clients send when asked (:meth:`client_preactivation_in`).
        alignment: One of :data:`ALIGNMENT_SITES` (see :meth:`client_alignment_in`).
        aligned_layout: With client-side alignment, the names and shapes of a reply's contribution.
    """

    model_fn: Callable[[], nn.Module]
    template: Mapping[str, torch.Tensor]
    spec: AlignmentSpec | None
    search: MergeSearch
    calibration: list[torch.Tensor]
    holdout: tuple[torch.Tensor, torch.Tensor] | None
    reference: str
    client_statistics: bool
    device: torch.device
    batch_size: int
    statistics_group: int
    weights_key: str
    weighted_by_key: str
    min_replies: int
    max_weight_ratio: float  # no default here: CCAMerge's keyword is the one place it is declared
    distill: DistillConfig | None = None
    max_norm_growth: float | None = 1e4
    average: str = "mean"
    preactivation_sizes: Mapping[str, int] = field(default_factory=dict)
    alignment: str = "server"
    aligned_layout: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENT_SITES:
            raise ValueError(f"CCAMerge: alignment must be one of {ALIGNMENT_SITES}, got {self.alignment!r}")
        if self.alignment == "client" and (self.average != "mean" or self.distill is not None):
            raise ValueError("CCAMerge: client-side alignment sums the replies: it needs average='mean' and no "
                             "distillation (the server never holds a client model)")
        for name, value, choices in (("reference", self.reference, REFERENCES), ("average", self.average, AVERAGES)):
            if value not in choices:
                raise ValueError(f"CCAMerge: {name} must be one of {choices}, got {value!r}")
        if not self.max_weight_ratio >= 1:
            raise ValueError(f"CCAMerge: max_weight_ratio must be >= 1 (inf: uncapped), got {self.max_weight_ratio!r}")
        if self.statistics_group < 1:
            raise ValueError(f"CCAMerge: statistics_group must be >= 1, got {self.statistics_group}")
        candidates = self.search.candidates()
        joint = [c.method for c in candidates if c.aligns and ALIGNERS[c.method].joint]
        if joint:
            raise ValueError(f"CCAMerge: method {joint[0]!r} aligns all client models jointly; a federated round "
                             "aligns each reply to the reference (use cca, permute, weight-matching or blend)")
        if len(candidates) > 1 and self.holdout is None:
            raise ValueError(f"CCAMerge: a search over {len(candidates)} candidates needs labelled "
                             "holdout data (holdout=(inputs, labels))")
        if self.distill is not None and self.holdout is None:
            raise ValueError("CCAMerge: distillation is early-stopped on labelled holdout data (holdout=(inputs, labels))")

    def reference_in(self, server_round: int) -> str:
        """The reference policy of ``server_round``: "auto" is "best" in round 1, "global" after.

        In round 1 the global model is the initial model — untrained in one-shot federated
        learning and whenever training starts from scratch — and aligning to its random
        features destroys what the clients learned (CHANGELOG.md, 0.1.0); from round 2 it is the
        previous merge, which every client started from.
        """
        if self.reference == "auto":
            return "best" if server_round <= 1 else "global"
        return self.reference

    def client_statistics_in(self, server_round: int) -> bool:
        """Whether clients are asked for statistics in ``server_round`` (they are taken against
        the model the clients received, so they fit only when that model is the reference)."""
        return (self.client_statistics and self.reference_in(server_round) == "global"
                and not self.client_alignment_in(server_round))

    def client_alignment_in(self, server_round: int) -> bool:
        """Whether clients align themselves in ``server_round``: with ``alignment="client"``, in rounds
        whose reference is the global model (round 1 of "auto" stays server-side: its reference is a reply)."""
        return self.alignment == "client" and self.reference_in(server_round) == "global"

    def client_preactivation_in(self, server_round: int) -> bool:
        """Whether clients are asked for their pre-activation moments in ``server_round``: with their
        statistics, when some candidate repairs (the server then runs no client model)."""
        return (self.client_statistics_in(server_round) and bool(self.preactivation_sizes)
                and any(c.repair != "none" for c in self.search.candidates()))

    @functools.cached_property
    def distill_images(self) -> torch.Tensor | None:
        """The images the distillation teacher labels and the student learns on: the calibration images and
        the configured augmented copies of them (:func:`fedcca.merging.distillation.transfer_images`), made
        once; None without distillation."""
        if self.distill is None:
            return None
        return transfer_images(torch.cat(self.calibration), self.distill.copies, self.distill.seed)

    @property
    def wants_label_counts(self) -> bool:
        """Whether clients are asked for their per-class example counts (a "label-counts" teacher)."""
        return self.distill is not None and "label-counts" in self.distill.teachers

    @property
    def needs_statistics(self) -> bool:
        """Whether some candidate aligns with activation statistics."""
        return self.spec is not None and any(c.needs_statistics for c in self.search.candidates())
