"""One federated round of CCAMerge: replies in, a merged model out (with what happened, recorded).

:class:`RoundAggregation` decodes and validates the replies one at a time
(:func:`fedcca.flower.protocol.validate_reply`), picks the reference, gathers every reply's alignment statistics
(the client's own, paired with the global model's moments measured once per round; or
computed here, a group of replies per pass over the calibration data) and feeds a
:class:`fedcca.merging.merger.Merger`. A reply whose data breaks a step is dropped alone, with one
reason in the :class:`~fedcca.flower.records.RoundRecord`; a round that cannot produce a model raises
:class:`SkipRound`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from logging import DEBUG, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.logger import log
from torch import nn

from fedcca.flower.errors import SkipRound
from fedcca.flower.protocol import ClientUpdate, DecodedWeights, InvalidReplyError, validate_reply
from fedcca.flower.records import RoundRecord
from fedcca.flower.round_statistics import RoundStatistics
from fedcca.flower.settings import AggregationSettings
from fedcca.flower.streaming import RunningMedian
from fedcca.flower.teacher_inputs import teacher_inputs
from fedcca.merging.teachers import TeacherSum
from fedcca.merging.merger import Merger, MergeResult
from fedcca.merging.selection import score
from fedcca.statistics import (
    StatisticsError,
    collect_moments,
)

# What aligning one reply may raise because of its contents: degenerate statistics, a failed
# decomposition, non-finite aligned weights (fedcca.merging.merger.MergeError is a ValueError), or an
# allocation a forged reply provoked. Such a reply is dropped alone; the round goes on.
REFERENCE_CLAIM_RATIO = 3.0
"""When the reference is chosen by size ("largest", or ties of "best"), a claim counts for at most this
many median claims of the round: a larger client still ranks first, a 10^12 claim gains nothing more."""
REPLY_DATA_ERRORS = (ValueError, ArithmeticError, RuntimeError, MemoryError)


class RoundAggregation:
    """The aggregation of one round's replies into a merged model.

    Args:
        settings: The strategy's settings.
        record: The round's record, filled in as replies are merged or dropped.
        global_arrays: The model sent this round (None when configure_train was not called).
        sent: The nodes the round's instructions went to (None when unknown).
        decoded: Replies' weights a reply screen has decoded already (each reply is decoded once).
    """

    def __init__(self, settings: AggregationSettings, record: RoundRecord, global_arrays: ArrayRecord | None,
                 sent: list[int] | None, decoded: DecodedWeights | None = None) -> None:
        self.settings = settings
        self.decoded = decoded
        self.record = record
        self.global_arrays = global_arrays
        self.sent = sent
        self.reference = settings.reference_in(record.round)
        self.statistics = RoundStatistics(settings, record)
        self.metrics: list[RecordDict] = []  # of the merged replies
        self._weight_cap = math.inf  # set from the replies by run()
        self._claim_cap = math.inf  # what a claim counts for when the reference is chosen
        self._scale: float | None = None  # what streamed weights are divided by (the first median claim)
        self._replied: set[int] = set()  # nodes whose reply was read
        self._scratch: list[nn.Module] = []  # client models already merged, reused for the next replies
        distill = settings.distill
        self.teacher = None if distill is None else TeacherSum(
            distill.teachers, distill.temperatures, None if settings.holdout is None else settings.holdout[1])

    @property
    def streams(self) -> bool:
        """Whether replies are merged as they are read: the reference is the global model (known
        before any reply) and the average is the weighted mean (nothing kept per reply)."""
        return self.reference == "global" and self.settings.average == "mean"

    def run(self, replies: Iterable[Message]) -> MergeResult:
        """Merge the valid replies; SkipRound when the round cannot produce a model.

        When :attr:`streams`, ``replies`` is read lazily (a stream merges while other clients
        train) and each weight is capped by the median claim so far (:meth:`_capped`); otherwise
        every reply is read first, the weights are capped by the round's median claim
        of the valid replies and the reference reply is picked among them.
        """
        settings, record = self.settings, self.record
        if self.reference == "global":
            self._global()  # a usage error, raised before anything is merged
        started = time.perf_counter()
        updates: Iterator[tuple[ClientUpdate, float]]
        if self.streams:
            updates = self._capped(self._updates(replies))
        else:
            valid = list(self._updates(replies))  # each valid reply claims a positive, finite count
            if valid and self.reference != "global":
                self._claim_cap = _median(valid) * REFERENCE_CLAIM_RATIO
                valid = self._reference_first(valid)
            # the cap's median counts the merged replies only: a dropped reply moves no one's weight
            median = _median(valid) if valid else None
            if median is not None:
                self._weight_cap = median * settings.max_weight_ratio
            updates = iter([] if median is None else [(update, self._scaled_weight(update, median)) for update in valid])
        merger: Merger | None = None
        group: list[tuple[ClientUpdate, float, nn.Module]] = []
        try:
            with self._merging(started):
                for update, weight in updates:
                    if merger is None:
                        merger = self._merger(update)
                        if self.reference != "global":  # the reference reply is averaged as it is
                            self._add(merger, [(update, weight, merger.reference)], is_reference=True)
                            continue
                    group.append((update, weight, self._model_from(update.state_dict, scratch=True)))
                    if len(group) >= settings.statistics_group or not self.statistics.needs_server(update):
                        self._add_group(merger, group)
                        group = []
                if merger is not None and group:
                    self._add_group(merger, group)
                return self._finish(merger)
        finally:
            if merger is not None:
                record.dead_features = {int(name): counts for name, counts in merger.dead_features.items()}
                record.norm_growth = {int(name): growth for name, growth in merger.norm_growth.items()}

    def _capped(self, updates: Iterator[ClientUpdate]) -> Iterator[tuple[ClientUpdate, float]]:
        """Valid updates as they come, each with its weight capped at ``max_weight_ratio`` x the median
        valid claim so far (its own included; the first three wait for each other; with fewer than
        three in all, the median of those, as for a whole round). Every weight is divided by the
        first cap (a fixed scale, far from float64's range whatever a client claims)."""
        medians: RunningMedian[ClientUpdate] = RunningMedian(warmup=3)
        for update in updates:
            for decided, median in medians.push(update, update.num_examples):
                yield decided, self._scaled_weight(decided, median)
        for decided, _ in medians.flush():  # fewer than three claims in all: their median
            yield decided, self._scaled_weight(decided, float(np.median(medians.values)))

    def _scaled_weight(self, update: ClientUpdate, median: float) -> float:
        """The reply's merge weight: its ``num-examples`` capped at ``max_weight_ratio`` x ``median`` (one
        client cannot own the average), divided by the first median of the round (weighted sums stay far
        from float64's range whatever a client claims; the cap may be infinite)."""
        self._weight_cap = median * self.settings.max_weight_ratio
        if self._scale is None:
            self._scale = median
        weight = min(update.num_examples, self._weight_cap)
        if weight < update.num_examples:
            self.record.capped[update.node_id] = update.num_examples
        return weight / self._scale

    def _updates(self, replies: Iterable[Message]) -> Iterator[ClientUpdate]:
        """Valid replies, decoded one at a time (duplicates and invalid ones dropped and logged)."""
        for msg in replies:
            node_id = msg.metadata.src_node_id
            try:
                if node_id in self._replied:
                    raise InvalidReplyError("duplicate reply from the same node")
                self._replied.add(node_id)
                update = validate_reply(msg, self.settings.template, self.settings.spec,
                                        weights_key=self.settings.weights_key,
                                        weighted_by_key=self.settings.weighted_by_key,
                                        preactivation_sizes=self.settings.preactivation_sizes,
                                        decoded=self.decoded)
            except InvalidReplyError as err:
                self._drop(node_id, str(err))
                continue
            except Exception as err:  # pylint: disable=broad-except  # a reply must never end the run
                self._drop(node_id, f"cannot be decoded: {type(err).__name__}: {err}")
                continue
            self.record.statistics_bytes[node_id] = update.statistics_bytes
            yield update

    def _reference_first(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        """The valid updates with the reference reply first ("best", "largest" or "first" reference).

        "best" never reads the claimed ``num-examples``: a client cannot make itself the reference by
        claiming more examples.
        """
        while updates:
            if self.reference == "largest":
                index = max(range(len(updates)), key=lambda i: min(updates[i].num_examples, self._claim_cap))
            elif self.reference == "best":
                index = self._best(updates)
            else:
                index = 0
            updates.insert(0, updates.pop(index))
            failure = self._reference_failure(updates[0])
            if failure is None:
                break
            self._drop(updates.pop(0).node_id, f"server-side statistics failed: {failure}")
        return updates

    def _best(self, updates: list[ClientUpdate]) -> int:
        """Index of the reference reply: among the replies whose hold-out accuracy is within one standard error
        of the best, the one with the most examples (claims capped at REFERENCE_CLAIM_RATIO median claims);
        without a hold-out set, the medoid of the replies' floating-point weights.

        A claimed example count only breaks ties between models the hold-out set cannot tell apart: a
        client cannot make a worse model the reference by claiming more examples (under label skew every
        client is about equally accurate on a balanced hold-out set, and the one with more data is the
        better alignment target: docs/results.md).
        """
        settings = self.settings
        if settings.holdout is not None:
            accuracy = [score(self._model_from(update.state_dict), *settings.holdout, device=settings.device)[1]
                        for update in updates]
            best = max(accuracy)
            tolerance = math.sqrt(max(best * (1 - best), 1e-12) / len(settings.holdout[1]))
            tied = [i for i in range(len(updates)) if accuracy[i] >= best - tolerance]
            return max(tied, key=lambda i: (min(updates[i].num_examples, self._claim_cap), -updates[i].node_id))
        flat = torch.stack([torch.cat([v.double().reshape(-1) for v in u.state_dict.values() if v.is_floating_point()])
                            for u in updates])
        distances = torch.cdist(flat, flat).sum(dim=1)
        return int(torch.argmin(distances))

    def _reference_failure(self, update: ClientUpdate) -> StatisticsError | None:
        """Why a reply cannot be the reference (non-finite features on the calibration data), or None."""
        if not self.settings.needs_statistics:
            return None
        model = self._model_from(update.state_dict)
        try:
            collect_moments(model, self.settings.calibration, self.settings.spec, device=self.settings.device)
        except StatisticsError as err:
            return err
        return None

    def _merger(self, first: ClientUpdate) -> Merger:
        settings = self.settings
        if self.reference == "global":
            self.record.reference = "global"
            reference = self._model_from(self._global().to_torch_state_dict())
        else:
            self.record.reference = first.node_id
            reference = self._model_from(first.state_dict)
        return Merger(reference, settings.calibration, settings.search, holdout=settings.holdout, spec=settings.spec,
                      device=settings.device, batch_size=settings.batch_size,
                      max_norm_growth=settings.max_norm_growth, average=settings.average)

    def _add(self, merger: Merger, group: list[tuple[ClientUpdate, float, nn.Module]],
             is_reference: bool = False) -> None:
        """Add a group of replies to the merge; a reply whose data breaks alignment is dropped alone."""
        statistics = [self.statistics.checked(merger, model, self.statistics.client(merger, update))
                      for update, _, model in group]
        self.record.client_statistics += sum(isinstance(stats, dict) for stats in statistics)
        sent = [isinstance(stats, StatisticsError) for stats in statistics]  # broken client statistics
        if merger.needs_statistics and not is_reference:
            statistics = self.statistics.fill(merger, group, statistics)
        for (update, weight, model), stats, invalid in zip(group, statistics, sent):
            if isinstance(stats, StatisticsError):
                reason = "invalid statistics" if invalid else "server-side statistics failed"
                self._drop(update.node_id, f"{reason}: {stats}")
                continue
            try:
                taught = None if self.teacher is None else teacher_inputs(
                    self.teacher, model, self.settings.distill_images, self.settings.holdout, update.metrics,
                    update.node_id, self.settings.device)
                preactivation = None if is_reference else self.statistics.preactivation(merger, update)
                merger.add(model, weight, stats, name=str(update.node_id), is_reference=is_reference,
                           preactivation=preactivation)
            except REPLY_DATA_ERRORS as err:
                if is_reference:
                    raise
                self._drop(update.node_id, f"alignment failed: {type(err).__name__}: {err}")
                continue
            if self.teacher is not None:  # the same weight as in the merge
                self.teacher.add(weight=weight, **taught)
            self.metrics.append(RecordDict({"metrics": update.metrics}))

    @contextlib.contextmanager
    def _merging(self, started: float) -> Iterator[None]:
        """Records the merge's time since ``started``; an error a reply's data provoked becomes SkipRound."""
        try:
            yield
        except REPLY_DATA_ERRORS as err:
            log(DEBUG, "aggregate_train: merge failed in round %s", self.record.round, exc_info=True)
            raise SkipRound(f"merge failed: {type(err).__name__}: {err}") from err
        finally:
            self.record.merge_seconds = time.perf_counter() - started

    def _finish(self, merger: Merger | None) -> MergeResult:
        """The merge once every reply is read (SkipRound when too few were valid)."""
        self._drop_missing()
        self.record.num_valid = len(self.metrics)
        self._require_enough()
        assert merger is not None
        return merger.finish()

    def _drop_missing(self) -> None:
        for node_id in self.sent or []:
            if node_id not in self._replied:
                self.record.bytes_received[node_id] = 0
                self._drop(node_id, "no reply (dropout or timeout)")

    def _require_enough(self) -> None:
        needed = max(self.settings.min_replies, 1)
        if self.record.num_valid < needed:
            raise SkipRound(f"{self.record.num_valid} valid replies, min_train_nodes is {needed}")

    def _global(self) -> ArrayRecord:
        if self.global_arrays is None:
            raise RuntimeError(
                f"CCAMerge needs the global model of round {self.record.round}: call configure_train "
                f"for that round before aggregate_train (reference={self.reference!r})")
        return self.global_arrays

    def _model_from(self, state_dict: Mapping[str, torch.Tensor], scratch: bool = False) -> nn.Module:
        """A model holding ``state_dict``; with ``scratch``, a reused one (see :meth:`_add_group`):
        building a model draws its random initialisation, a few milliseconds per reply."""
        model = self._scratch.pop() if scratch and self._scratch else self.settings.model_fn()
        model.load_state_dict(state_dict)
        return model

    def _add_group(self, merger: Merger, group: list[tuple[ClientUpdate, float, nn.Module]]) -> None:
        """:meth:`_add`, then the group's models are free for the next replies (the merger keeps none)."""
        self._add(merger, group)
        self._scratch.extend(model for _, _, model in group)

    def _drop(self, node_id: int, reason: str) -> None:
        self.record.drop(node_id, reason)
        log(WARNING, "aggregate_train: dropped reply from node %s: %s", node_id, reason)


def _median(updates: list[ClientUpdate]) -> float:
    return float(np.median([update.num_examples for update in updates]))
