"""How aligned models, and the statistics targets that follow them, are averaged.

:class:`WeightedSum` is the running weighted mean (memory does not grow with the number of
models); :class:`RobustAverage` the coordinate-wise median or trimmed mean of models kept until
the end (unweighted, as Flower's FedMedian and FedTrimmedAvg): one outlying model cannot move
it far. :func:`make_average` builds either from a name of :data:`AVERAGES`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class WeightedSum:
    """A running weighted sum of state dicts: floating-point entries, in float64 on the CPU."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """``total += weight * state`` (floating-point entries only)."""
        for key, value in state.items():
            if value.is_floating_point():
                term = weight * value.detach().to(torch.float64).cpu()
                self.total[key] = self.total[key] + term if key in self.total else term
        self.weight += weight

    def add_total(self, total: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in a sum made elsewhere (``sum_k w_k state_k`` whose weights ``w_k`` total ``weight``)."""
        for key, value in total.items():
            term = value.detach().to(torch.float64).cpu()
            self.total[key] = self.total[key] + term if key in self.total else term
        self.weight += weight

    def average(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``total / weight`` in the dtypes of ``like``; entries never summed (integer buffers) from ``like``.

        Raises:
            ValueError: Nothing with a positive weight was added.
        """
        if self.weight <= 0:
            raise ValueError("merge: no model with a positive weight was added")
        return {key: (self.total[key] / self.weight).to(value.dtype) if key in self.total else value.clone()
                for key, value in like.items()}


AVERAGES: tuple[str, ...] = ("mean", "median", "trimmed")
"""How aligned models are averaged: "mean" (weighted by the models' weights, a running sum),
"median" or "trimmed" (coordinate-wise median, or mean without the largest and smallest
:data:`TRIM` share of values per coordinate; unweighted, as Flower's FedMedian / FedTrimmedAvg:
robust to a few outlying models, but every aligned model is kept until the end)."""

TRIM = 0.2
"""Share of values cut at each end per coordinate by the "trimmed" average (at least one of
each end with three models or more)."""


class RobustAverage:
    """The coordinate-wise median or trimmed mean of state dicts (kept until :meth:`average`)."""

    def __init__(self, kind: str) -> None:
        if kind not in ("median", "trimmed"):
            raise ValueError(f"RobustAverage: kind must be 'median' or 'trimmed', got {kind!r}")
        self.kind = kind
        self.states: list[dict[str, torch.Tensor]] = []
        self.weight = 0.0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Keep ``state``'s floating-point entries (float64, CPU); a zero weight leaves it out."""
        if weight > 0:
            self.states.append({k: v.detach().to("cpu", torch.float64, copy=True) for k, v in state.items()
                                if v.is_floating_point()})
            self.weight += weight

    def average(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The median / trimmed mean per coordinate in the dtypes of ``like``; other entries from ``like``."""
        if not self.states:
            raise ValueError("merge: no model with a positive weight was added")
        out = {}
        for key, value in like.items():
            if key not in self.states[0]:
                out[key] = value.clone()
                continue
            stacked = torch.stack([state[key] for state in self.states])
            if self.kind == "median":
                middle = stacked.median(dim=0).values if len(stacked) % 2 else stacked.quantile(0.5, dim=0)
            else:
                cut = max(int(TRIM * len(stacked)), 1 if len(stacked) >= 3 else 0)
                ordered = stacked.sort(dim=0).values
                middle = ordered[cut:len(stacked) - cut].mean(dim=0)
            out[key] = middle.to(value.dtype)
        return out


def make_average(kind: str) -> WeightedSum | RobustAverage:
    """A :class:`WeightedSum` for "mean", else a :class:`RobustAverage` of that kind.

    Raises:
        ValueError: ``kind`` is not one of :data:`AVERAGES`.
    """
    if kind not in AVERAGES:
        raise ValueError(f"unknown average {kind!r}; choose one of {', '.join(AVERAGES)}")
    return WeightedSum() if kind == "mean" else RobustAverage(kind)
