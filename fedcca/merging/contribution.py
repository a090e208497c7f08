"""One model's share of a merge, computed where the model is, so that whoever merges only sums.

A :class:`~fedcca.merging.merger.Merger` aligns each model to its reference and adds, per
candidate configuration, the aligned weights, REPAIR's pre-activation targets and the folded
BatchNorms' output targets to running weighted sums; :meth:`Merger.finish` turns the sums into
models. Every one of those terms depends on one model and the reference only. When the
reference is a model every party holds (the global model a Flower server has just broadcast),
a client can compute its own terms (:func:`contribution`), the server sums the clients' terms
weighted by their example counts — as FedAvg sums weights, or as secure aggregation sums
vectors it never sees one by one — and :func:`absorb` hands the sums to a server-side merger
whose :meth:`Merger.finish` recomputes BatchNorm, applies REPAIR and chooses among the
candidates on the hold-out set as usual.

Candidates that differ only in their ``repair`` mode share their terms: a contribution holds
one *form* per distinct alignment (``form0`` is the first candidate's, the plain weights when
the search's baseline is FedAvg). Entries are named ``form<i>/weights/<key>``,
``form<i>/repair-mean/<point>``, ``form<i>/repair-std/<point>``, ``form<i>/norm-mean/<bn>``,
``form<i>/norm-std/<bn>`` and ``form<i>/moved`` (1 for each spec point the alignment moved).
Only the weighted mean is additive: the robust averages keep every model and cannot be split so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedcca.merging.config import MergeConfig
from fedcca.merging.merger import Merger
from fedcca.merging.repair import statistics_and_preactivation
from fedcca.statistics import PairStatistics

__all__ = ["absorb", "contribution", "forms", "layout"]


def forms(merger: Merger) -> list[list[int]]:
    """The merger's candidates grouped by alignment: one list of candidate indices per form, in order.

    Candidates whose configurations differ only in ``repair`` align (and so contribute) identically.
    """
    groups: dict[MergeConfig, list[int]] = {}
    for index, candidate in enumerate(merger.candidates):
        groups.setdefault(candidate.config.replace(repair="none"), []).append(index)
    return list(groups.values())


def contribution(merger: Merger, model: nn.Module, statistics: Mapping[str, PairStatistics] | None = None,
                 preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> dict[str, torch.Tensor]:
    """``model``'s additive share of a merge onto ``merger``'s reference, at weight 1 (float32 on the CPU).

    Args:
        merger: A fresh merger (nothing added yet) built with ``contributes=True`` and the merging
            party's reference and candidate configurations; it is used up.
        model: The model to contribute (not modified).
        statistics: Its statistics against the reference (computed when None and needed).
        preactivation: Its pre-activation moments (computed when None and needed).

    Raises:
        ValueError: The merger has models already, or averages robustly (not additive).
    """
    if any(candidate.sum.weight for candidate in merger.candidates if hasattr(candidate.sum, "weight")) \
            or any(getattr(candidate.sum, "states", None) for candidate in merger.candidates):
        raise ValueError("contribution: the merger already holds models; build a fresh one per contribution")
    if merger.average != "mean":
        raise ValueError(f"contribution: only the weighted mean is additive, the merger averages by "
                         f"{merger.average!r}")
    if statistics is None and preactivation is None and merger.needs_statistics and merger.spec is not None \
            and model is not merger.reference and any(c.config.repair != "none" or merger._restores(c.config) for c in merger.candidates):
        # REPAIR's and BatchNorm's targets from the statistics' own forward pass (one pass of each model)
        statistics, preactivation = statistics_and_preactivation(
            merger.reference, model, merger.calibration, merger.spec, points=merger._statistics_points(),
            device=merger.device)
    merger.add(model, 1.0, statistics, name="contribution", preactivation=preactivation)
    names = merger.spec.names() if merger.spec is not None else []
    out: dict[str, torch.Tensor] = {}
    for number, members in enumerate(forms(merger)):
        prefix = f"form{number}"
        first = merger.candidates[members[0]]
        out.update({f"{prefix}/weights/{key}": value.float() for key, value in first.sum.total.items()})
        repairing = [merger.candidates[i] for i in members if merger.candidates[i].config.repair != "none"]
        if repairing:
            means, stds = repairing[0].repair.sums()
            out.update({f"{prefix}/repair-mean/{point}": value.float() for point, value in means.items()})
            out.update({f"{prefix}/repair-std/{point}": value.float() for point, value in stds.items()})
        restoring = [merger.candidates[i] for i in members if merger._restores(merger.candidates[i].config)]
        if restoring:
            means, stds = restoring[0].norms.sums()
            out.update({f"{prefix}/norm-mean/{norm}": value.float() for norm, value in means.items()})
            out.update({f"{prefix}/norm-std/{norm}": value.float() for norm, value in stds.items()})
        if names:
            out[f"{prefix}/moved"] = torch.tensor([float(name in first.moved) for name in names])
    return out


def layout(merger: Merger) -> dict[str, tuple[int, ...]]:
    """The names and shapes a contribution to ``merger``'s candidates has (its reference contributing itself).

    Args:
        merger: A fresh merger built with ``contributes=True`` (used up).
    """
    return {name: tuple(value.shape) for name, value in contribution(merger, merger.reference).items()}


def absorb(merger: Merger, summed: Mapping[str, torch.Tensor], weight: float) -> None:
    """Give ``merger``'s candidates the sum of contributions whose weights total ``weight``.

    ``summed`` is ``sum_k w_k contribution_k`` (or, with ``weight`` 1, their weighted average, as
    secure aggregation returns it). Afterwards :meth:`Merger.finish` builds and chooses as if every
    model had been added to ``merger`` itself.

    Args:
        merger: A fresh merger with the contributors' reference and candidate configurations.
        summed: The summed contributions, named as :func:`contribution` names them.
        weight: The total weight (positive).

    Raises:
        ValueError: A non-positive weight; an entry missing for a candidate that needs it.
    """
    if not weight > 0:
        raise ValueError(f"absorb: the total weight must be positive, got {weight!r}")
    names = merger.spec.names() if merger.spec is not None else []
    for number, members in enumerate(forms(merger)):
        prefix = f"form{number}"
        weights = _entries(summed, f"{prefix}/weights/")
        missing = [key for key, value in merger.template.items() if value.is_floating_point() and key not in weights]
        if missing:
            raise ValueError(f"absorb: {prefix} lacks weights {missing[:3]}")
        moved = summed.get(f"{prefix}/moved")
        for index in members:
            candidate = merger.candidates[index]
            candidate.sum.add_total(weights, weight)
            if candidate.config.repair != "none":
                candidate.repair.add_sums(_entries(summed, f"{prefix}/repair-mean/"),
                                          _entries(summed, f"{prefix}/repair-std/"), weight)
            if merger._restores(candidate.config):
                candidate.norms.add_sums(_entries(summed, f"{prefix}/norm-mean/"),
                                         _entries(summed, f"{prefix}/norm-std/"), weight)
            if moved is not None:
                candidate.moved.update(name for name, flag in zip(names, moved.tolist()) if flag > 0)


def _entries(summed: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: value for name, value in summed.items() if name.startswith(prefix)}
