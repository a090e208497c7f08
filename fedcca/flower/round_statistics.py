"""One round's alignment statistics: the clients' own, checked against the global model's moments, or
computed on the server (:class:`RoundStatistics`)."""

from __future__ import annotations

import dataclasses
import math
import time
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from fedcca.flower.errors import SkipRound
from fedcca.flower.protocol import ClientUpdate
from fedcca.flower.records import RoundRecord
from fedcca.flower.settings import AggregationSettings
from fedcca.merging.merger import Merger
from fedcca.merging.repair import preactivation_spec
from fedcca.spec.alignment import AlignmentSpec
from fedcca.statistics import (
    Moments,
    PairStatistics,
    StatisticsError,
    assemble,
    collect_moments,
    collect_statistics,
)

MAX_PREACTIVATION_RATIO = 10.0
"""A client's pre-activation moments (REPAIR's targets) are used when, at every point, the root
mean square of its pre-activations is within this factor of the global model's (measured on the
server once per round); otherwise the server measures that client's model itself and logs why:
forged targets would rescale the merged model's layers."""

_PRE = "pre-activation:"  # names the pre-activation points beside the alignment points in one pass


SPOT_CHECK_SAMPLES = 64
"""At most this many calibration examples (and at most an eighth of them) on which the server re-measures
a client's cross moments, a fresh random subset each round, to check the statistics it sent."""
MIN_SPOT_CHECK_CORRELATION = 0.5
"""Least correlation, at every point, between the cross moments a client sent and those the server measures
on :data:`SPOT_CHECK_SAMPLES` examples; below it the statistics do not describe the client's model (e.g.
negated cross moments, which keep every norm and scramble the aligned features) and the reply is dropped."""


class RoundStatistics:
    """Where each reply's alignment statistics and REPAIR targets come from in one round.

    A reply's own statistics are paired with the global model's moments, measured once per round
    (with its pre-activation moments when clients send theirs); the replies without usable ones
    get statistics computed on the server, a group per pass over the calibration data.

    Args:
        settings: The strategy's settings.
        record: The round's record (server statistics time, refused pre-activation moments).
    """

    def __init__(self, settings: AggregationSettings, record: RoundRecord) -> None:
        self.settings = settings
        self.record = record
        self.client_statistics = settings.client_statistics_in(record.round)
        self._moments: dict[str, Moments] | None = None  # the global model's, once the first client's arrive
        self._global_preactivation: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._subset: torch.Tensor | None = None  # the round's spot-check examples
        self._subset_reference: tuple[nn.Module, list] | None = None  # its reference and that one's features

    def fill(self, merger: Merger, group: list[tuple[ClientUpdate, float, nn.Module]],
                         statistics: list) -> list:
        """Server-side statistics for the replies without usable client ones (a failure marks one reply)."""
        missing = [i for i, stats in enumerate(statistics) if stats is None]
        if not missing:
            return statistics
        started = time.perf_counter()
        models = [group[i][2] for i in missing]
        try:
            computed: list = collect_statistics(merger.reference, models, self.settings.calibration, merger.spec,
                                                device=self.settings.device)
        except StatisticsError as err:
            if err.model_index == -1:  # the reference's own features are unusable: nothing can be aligned
                raise SkipRound(f"the reference's statistics failed: {err}") from err
            computed = [self._one(merger, model) for model in models]
        for i, stats in zip(missing, computed):
            statistics[i] = stats
        self.record.stats_seconds += time.perf_counter() - started
        return statistics

    def _one(self, merger: Merger, model: nn.Module) -> Any:
        try:
            return collect_statistics(merger.reference, [model], self.settings.calibration, merger.spec,
                                      device=self.settings.device)[0]
        except StatisticsError as err:
            return err

    def checked(self, merger: Merger, model: nn.Module, claimed: Any) -> Any:
        """``claimed`` (a reply's statistics, paired) if its cross moments agree with the client model's own on a
        random subset of the calibration data, else a StatisticsError saying where they do not. Other values
        (None, an error) are returned as they are.

        Honest statistics agree closely; forged ones that keep every norm (negated or permuted cross moments)
        are what the aligned-norm bound cannot see. Costs one forward of the client model over
        :data:`SPOT_CHECK_SAMPLES` examples per reply (and of the reference once per round).
        """
        if not isinstance(claimed, dict) or merger.spec is None:
            return claimed
        if self._subset is None:
            inputs = torch.cat(self.settings.calibration)
            generator = torch.Generator().manual_seed(self.record.round)
            size = min(SPOT_CHECK_SAMPLES, max(8, len(inputs) // 8))
            self._subset = inputs[torch.randperm(len(inputs), generator=generator)[:size]]
        started = time.perf_counter()
        try:
            if self._subset_reference is None or self._subset_reference[0] is not merger.reference:
                self._subset_reference = (merger.reference, [])  # the reference runs once per round, not per reply
            measured = collect_statistics(merger.reference, [model], self._subset, merger.spec,
                                          device=self.settings.device, reference_cache=self._subset_reference[1])[0]
        except StatisticsError as err:
            return err
        finally:
            self.record.check_seconds += time.perf_counter() - started
        for point, pair in claimed.items():
            if point not in measured:
                continue
            sent, ours = pair.cross.double().flatten(), measured[point].cross.double().flatten()
            if sent.numel() < 2 or float(ours.std()) == 0 or float(sent.std()) == 0:
                continue
            correlation = float(torch.corrcoef(torch.stack([sent, ours]))[0, 1])
            if not correlation >= MIN_SPOT_CHECK_CORRELATION:
                return StatisticsError(f"the cross moments sent at '{point}' correlate {correlation:.2f} with the "
                                       f"model's own on {len(self._subset)} calibration examples (bound "
                                       f"{MIN_SPOT_CHECK_CORRELATION:g}): they do not describe this model")
        return claimed

    def client(self, merger: Merger, update: ClientUpdate) -> dict[str, PairStatistics] | StatisticsError | None:
        """A reply's statistics paired with the global model's own moments (measured once per round)."""
        if not self.client_statistics or update.statistics is None:
            return None
        self._measure_global(merger)
        assert self._moments is not None
        try:
            return assemble(self._moments, update.statistics)
        except StatisticsError as err:
            return err

    def _measure_global(self, merger: Merger) -> None:
        """The global model's own moments at the alignment points and, when clients send theirs, at
        the pre-activation points: one pass over the calibration data per round."""
        if self._moments is not None:
            return
        assert merger.spec is not None
        points = list(merger.spec.points)
        pre = preactivation_spec(merger.spec, merger.reference)[0].points \
            if self.settings.client_preactivation_in(self.record.round) else ()
        points += [dataclasses.replace(point, name=_PRE + point.name) for point in pre]
        started = time.perf_counter()
        try:
            moments = collect_moments(merger.reference, self.settings.calibration, AlignmentSpec(tuple(points)),
                                      device=self.settings.device)
        except StatisticsError as err:
            raise SkipRound(f"the global model's statistics failed: {err}") from err
        finally:
            self.record.stats_seconds += time.perf_counter() - started
        self._moments = {name: value for name, value in moments.items() if not name.startswith(_PRE)}
        self._global_preactivation = {name[len(_PRE):]: (value.mean.double(), value.covariance().double())
                                      for name, value in moments.items() if name.startswith(_PRE)}

    def preactivation(self, merger: Merger, update: ClientUpdate) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The reply's pre-activation moments if sent and within :data:`MAX_PREACTIVATION_RATIO` of the
        global model's at every point; None (the merger measures the model) otherwise, logged."""
        sent = update.preactivation
        if sent is None or not self.client_statistics or merger.spec is None:
            return None
        self._measure_global(merger)
        assert self._global_preactivation is not None
        for point, (mean, covariance) in sent.items():
            if point not in self._global_preactivation:
                return None  # not asked for this round: measured here
            ours, theirs = _rms(*self._global_preactivation[point]), _rms(mean, covariance)
            ratio = theirs / ours if ours > 0 else (1.0 if theirs == 0 else math.inf)
            if not 1 / MAX_PREACTIVATION_RATIO <= ratio <= MAX_PREACTIVATION_RATIO:
                reason = (f"pre-activation moments at '{point}' of {ratio:.3g}x the global model's RMS "
                          f"(bound {MAX_PREACTIVATION_RATIO:g}x)")
                self.record.preactivation_refused[update.node_id] = reason
                log(WARNING, "aggregate_train: node %s sent %s: its REPAIR targets are measured on the server "
                    "instead", update.node_id, reason)
                return None
        return sent

    def needs_server(self, update: ClientUpdate) -> bool:
        return self.settings.needs_statistics and (update.statistics is None or not self.client_statistics)


def _rms(mean: torch.Tensor, covariance: torch.Tensor) -> float:
    """Root mean square of features with this mean and covariance."""
    return float((mean.double().square() + covariance.double().diagonal().clamp_min(0)).mean().sqrt())
