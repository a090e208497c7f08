"""CCA Merge as a Flower strategy: a drop-in replacement for ``FedAvg``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedcca.devices import resolve_device
from fedcca.flower.aggregation import RoundAggregation, SkipRound
from fedcca.flower.client_alignment import (
    ALIGN_KEY,
    aligned_layout,
    contribution_merger,
    search_to_json,
)
from fedcca.flower.guard import CollapseGuard
from fedcca.flower.inputs import check_runs, checked_holdout
from fedcca.flower.metrics import average_metrics, valid_evaluate_replies
from fedcca.flower.protocol import COMPUTE_STATS_FLAG, LABEL_COUNTS_FLAG, PREACTIVATION_FLAG, DecodedWeights
from fedcca.flower.records import RoundRecord, log_round
from fedcca.flower.screen import UpdateScreen
from fedcca.flower.settings import STATISTICS_SOURCES, AggregationSettings
from fedcca.flower.streaming import ReplyTally, StreamingGrid
from fedcca.flower.summed import SummedAggregation
from fedcca.merging.config import (
    MergeConfig,
    MergeSearch,
    merge_keywords,
    resolve_search,
)
from fedcca.merging.distillation import DistillConfig, TeacherSum, distill
from fedcca.merging.repair import preactivation_spec
from fedcca.merging.selection import FEDERATED_SEARCH, UNLABELLED_DEFAULT
from fedcca.spec.alignment import describe_left
from fedcca.spec.tracing import spec_for
from fedcca.statistics import as_batches


@dataclass
class _Round:
    """What configure_train sent, needed when the replies come back."""

    server_round: int
    arrays: ArrayRecord
    node_ids: list[int]


class CCAMerge(FedAvg):
    """FedAvg with the averaging step replaced by CCA Merge (Horoi et al., ICML 2024).

    Each round, every valid client model is aligned to a reference model (by default the
    round's global model) with transforms computed from activation statistics on public
    calibration data (sent by the client, or computed on the server), the aligned models
    are averaged weighted by ``num-examples``, and BatchNorm statistics are recomputed on the
    calibration data. With labelled ``holdout`` data, a :class:`~fedcca.merging.config.MergeSearch`
    chooses each round among candidate merges (by default :data:`FEDERATED_SEARCH`, whose
    baseline is plain FedAvg). Replies are merged one at a time into running sums, so the
    server holds the reference, one sum per candidate and one client model (reference
    "global"). Outlying updates are screened by default (``screen``), each merge weight is capped
    at ``max_weight_ratio`` median claims, and with a hold-out set a collapsing round is rolled
    back (``guard``). Invalid replies are dropped (one log line each, naming node
    and reason); a round with fewer than ``min_train_nodes`` valid replies keeps the previous
    global model. Each round's :class:`~fedcca.flower.records.RoundRecord` is appended to ``rounds``.

    Swapping strategies changes one line::

        FedAvg(fraction_train=0.5, min_available_nodes=4)
        CCAMerge(Net, calibration, fraction_train=0.5, min_available_nodes=4)

    Args:
        model_fn: Builds a fresh model of the federated architecture; ``fedcca.spec.tracing.spec_for``
            must be able to describe it.
        calibration: Public calibration inputs for statistics, BatchNorm and REPAIR: a tensor
            or an iterable of batches (or of ``(x, y)`` batches).
        config: How to merge: a ``MergeConfig``, a ``MergeSearch`` or None (the defaults above).
        holdout: Labelled public data, disjoint from ``calibration``: ``(inputs, labels)``
            tensors, or a ``DataLoader`` / ``Dataset`` of ``(x, y)``; read only to choose among
            a search's candidates and to early-stop distillation.
        reference: "auto" ("best" in round 1, whose global model is the initial one, "global" after),
            "global" (the round's global model, an alignment target only, not averaged), "best" (the
            reply most accurate on ``holdout``, ties within one standard error to the most capped examples;
            without it, the medoid of the replies' weights),
            "largest" (the reply with most ``num-examples``, a claim the client makes) or "first"
            (the first valid reply). See :data:`fedcca.flower.settings.REFERENCES`.
        stats: "client" (use statistics sent in replies when they match the reference,
            compute the missing ones on the server) or "server" (always on the server).
        device: Where statistics and merging run (None: CUDA if available, else CPU).
        batch_size: Calibration batch size.
        statistics_group: Replies whose statistics the server computes together (one pass of
            the reference over the calibration data per group).
        max_weight_ratio: A reply's merge weight (its ``num-examples``) is capped at this many
            times the round's median claim, so one client claiming 10^12 examples weighs at most
            as much as ``r`` median clients. The default 2 keeps honest label-skewed shards (up to
            1.8 median claims in NIID-Bench's #C=2 split) at their weight, whose capping at 1 cost
            5 points of accuracy there, while one attacker among 5 clients gains no more than at 1
            (docs/results.md); 3 gave one attacker among 3 clients 60% of the average; inf:
            FedAvg's uncapped weights. Capped replies are listed in the round record.
        max_norm_growth: A reply whose weights after alignment have more than this many times
            their own norm (or less than its inverse) is dropped with that reason: honest
            transforms move features, forged statistics can scale the weights; None: no bound.
        average: "mean" (weighted by ``num-examples``, replies streamed into running sums) or a
            robust coordinate-wise "median" / "trimmed" mean of the aligned replies (unweighted,
            as Flower's FedMedian / FedTrimmedAvg; every aligned reply is kept until the merge).
        distill: After each merge, distil it toward the clients' ensemble on the calibration
            images, early-stopped on ``holdout`` (:mod:`fedcca.merging.distillation`); None: off.
            ``CCAMerge(model_fn, calibration, "direct", holdout=..., distill=DistillConfig(teachers=("logits",)))``
            is FedDF (Lin et al., 2020).
        screen: Bounds on each reply's update ``|w - g|`` against the round's global model and the
            round's median update (:class:`~fedcca.flower.screen.UpdateScreen`; default 10x each); a reply
            that breaks one, or that cannot be measured, is dropped with that reason. None: off (the
            screen needs the round's ``configure_train``: ``aggregate_train`` alone is not screened).
        guard: With ``holdout``: a round whose chosen merge collapses against the global model the clients
            trained from rolls back to the previous round's baseline (FedAvg's average) or keeps the global
            model (:class:`~fedcca.flower.guard.CollapseGuard`); logged and recorded as ``guard``.
        alignment: "server", or "client": in rounds aligned to the global model each client aligns itself
            and sends its share of every candidate (:mod:`fedcca.flower.client_alignment`); the server sums
            them and chooses (needs ``average="mean"``, no ``distill``).
        **kwargs: ``MergeConfig`` fields (``method="permute"``, ``repair="affine"``, ...)
            override ``config``'s; every other keyword goes to ``FedAvg`` (``fraction_train``,
            ``min_train_nodes``, ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        calibration: torch.Tensor | Iterable[Any],
        config: MergeConfig | MergeSearch | None = None,
        *,
        holdout: tuple[torch.Tensor, torch.Tensor] | Iterable[Any] | None = None,
        reference: str = "auto",
        stats: str = "client",
        device: torch.device | str | None = None,
        batch_size: int = 256,
        statistics_group: int = 8,
        distill: DistillConfig | None = None,
        max_weight_ratio: float = 2.0,
        max_norm_growth: float | None = 1e4,
        average: str = "mean",
        guard: bool = True,
        screen: UpdateScreen | None = UpdateScreen(),
        alignment: str = "server",
        **kwargs: Any,
    ) -> None:
        if isinstance(model_fn, nn.Module):
            raise TypeError(f"CCAMerge: model_fn must build a fresh model (e.g. {type(model_fn).__name__} or "
                            f"lambda: {type(model_fn).__name__}()), not a model instance")
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in merge_keywords()}
        # Mixed ClientApps report different metrics; FedAvg's default needs equal keys.
        kwargs.setdefault("train_metrics_aggr_fn", average_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", average_metrics)
        super().__init__(**kwargs)
        if stats not in STATISTICS_SOURCES:
            raise ValueError(f"CCAMerge: stats must be one of {STATISTICS_SOURCES}, got {stats!r}")
        search = resolve_search(config, default=FEDERATED_SEARCH if holdout is not None else UNLABELLED_DEFAULT,
                                **options)
        self.search, self.reference, self.stats = search, reference, stats
        self.rounds: list[RoundRecord] = []
        batches = list(as_batches(calibration, batch_size))  # materialised: read every round
        model = model_fn()
        check_runs(model, batches)
        needs_spec = any(c.aligns or c.repair != "none" for c in search.candidates())
        # A model without alignment_spec() is traced on a calibration batch (UnsupportedModelError if refused).
        self.spec = spec_for(model, batches[0], strict=search.base.strict) if needs_spec else None
        if self.spec is not None and self.spec.left:
            log(INFO, "[fedcca] partial alignment: %d point(s) aligned; left unaligned (averaged as FedAvg "
                "does): %s", len(self.spec.points), describe_left(self.spec))
        self._settings = AggregationSettings(
            model_fn=model_fn, template={key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
            spec=self.spec, search=search, calibration=batches, holdout=checked_holdout(holdout), reference=reference,
            client_statistics=self.requests_client_statistics, device=resolve_device(device), batch_size=batch_size, statistics_group=statistics_group,
            weights_key=self.arrayrecord_key, weighted_by_key=self.weighted_by_key, min_replies=self.min_train_nodes,
            distill=distill, max_weight_ratio=max_weight_ratio, max_norm_growth=max_norm_growth, average=average,
            preactivation_sizes={} if self.spec is None else
            {point.name: point.size for point in preactivation_spec(self.spec, model)[0].points},
            alignment=alignment, aligned_layout={} if alignment != "client" else  # its own share: the shapes
            aligned_layout(contribution_merger(model, batches, search, device=device, batch_size=batch_size)))
        self._sent: _Round | None = None
        self._screen = screen
        self._guard = None if holdout is None or not guard else CollapseGuard(
            self._settings.holdout, min_z=search.min_z, device=self._settings.device, batch_size=batch_size)

    accepts_stream = True
    """``aggregate_train`` reads its replies once, lazily (wrappers may hand it a stream)."""

    @property
    def requests_client_statistics(self) -> bool:
        """Whether the strategy asks clients for statistics in rounds whose reference is the global model."""
        needed = any(config.needs_statistics for config in self.search.candidates())
        return needed and self.stats == "client" and self.reference in ("global", "auto")

    def requests_client_statistics_in(self, server_round: int) -> bool:
        """Whether ``server_round``'s train messages ask clients for statistics (COMPUTE_STATS_FLAG)."""
        return self._settings.client_statistics_in(server_round)

    @property
    def settings(self) -> AggregationSettings:
        """What every round's aggregation uses (calibration batches, held-out data, device, ...)."""
        return self._settings

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        candidates, settings = self.search.candidates(), self._settings
        log(INFO, "\t├──> CCA Merge:")
        log(INFO, "\t│\t├── Merge: %s", " | ".join(c.label() for c in candidates)
            + (f" (chosen each round on {len(settings.holdout[1])} held-out examples, baseline margin "
               f"{self.search.min_z:g} SE)" if len(candidates) > 1 and settings.holdout else ""))
        log(INFO, "\t│\t├── Reference: %s | statistics: %s | calibration: %d examples", self.reference,
            "by the clients when aligned to the global model" if self.stats == "client" else "by the server",
            sum(len(batch) for batch in settings.calibration))
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Run ``Strategy.start`` with replies merged as they arrive; if no round produced a model,
        report ``initial_arrays``.

        The grid is wrapped in :class:`~fedcca.flower.streaming.StreamingGrid`, so Flower's loop
        hands ``aggregate_train`` each reply as it arrives. ``Strategy.start`` keeps the previous
        global model when ``aggregate_train`` returns ``None`` arrays, but leaves ``Result.arrays``
        empty when that happens in every round.
        """
        result = super().start(StreamingGrid(grid), initial_arrays, *args, **kwargs)
        if not result.arrays:
            result.arrays = initial_arrays
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training; tells clients whether to send statistics."""
        config = ConfigRecord(dict(config))  # start() passes the same record every round
        config[COMPUTE_STATS_FLAG] = self.requests_client_statistics_in(server_round)
        config[PREACTIVATION_FLAG] = self._settings.client_preactivation_in(server_round)
        config[LABEL_COUNTS_FLAG] = self._settings.wants_label_counts
        if self._settings.client_alignment_in(server_round):
            config[ALIGN_KEY] = search_to_json(self.search)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = _Round(server_round, arrays, [msg.metadata.dst_node_id for msg in messages])
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, merge the valid ones with CCA Merge and average metrics.

        ``replies`` may be a list (Flower's ``send_and_receive``) or a stream of replies as they
        arrive (:func:`fedcca.flower.streaming.stream_replies`): with the "global" reference and
        the weighted mean, each reply is merged as it is read, so the merge overlaps the other
        clients' training and one reply is held at a time (a round whose reference is a reply,
        and the robust averages, read them all first). A list is merged in node-id order.

        Returns ``(None, None)`` (the previous global model is kept) when fewer than
        ``min_train_nodes`` replies are valid or no merge could be made.
        """
        if isinstance(replies, (list, tuple)):
            replies = sorted(replies, key=lambda msg: msg.metadata.src_node_id)
        record = RoundRecord(server_round)
        tally = ReplyTally(replies)
        sent = self._sent if self._sent is not None and self._sent.server_round == server_round else None
        screened: Iterable[Message] = tally
        kind = SummedAggregation if self._settings.client_alignment_in(server_round) else RoundAggregation
        # The screen's decoding of a reply's weights is the merge's; a summed round only reads them: views.
        decoded = DecodedWeights(views=kind is SummedAggregation)
        if self._screen is not None and sent is not None:  # a dropped reply arrives as an error reply (code 4000)
            screened = self._screen.screen(tally, sent.arrays.to_torch_state_dict(), self.arrayrecord_key,
                                           self.weighted_by_key, decoded)
        if sent is not None:
            record.num_sent = len(sent.node_ids)
        self.rounds.append(record)
        started = time.perf_counter()
        aggregation = kind(self._settings, record, sent and sent.arrays, sent and sent.node_ids, decoded)
        try:
            result = aggregation.run(screened)
        except SkipRound as skip:
            return _skipped(record, str(skip))
        finally:
            record.num_replies = tally.count
            record.bytes_received = {**dict.fromkeys(record.bytes_received, 0), **tally.bytes_received}
            record.aggregate_seconds = time.perf_counter() - started - tally.waited
            record.merge_seconds = max(0.0, record.merge_seconds - tally.waited)
            log(INFO, "aggregate_train: Received %s results and %s failures", tally.count - tally.errors, tally.errors)
        state = result.model.state_dict()
        bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            return _skipped(record, f"merged model has non-finite values in {bad[:3]}")
        record.merge_choice, record.candidates = result.config.label(), result.scores
        model = result.model
        if self._guard is not None:
            model = self._guard.apply(record, sent and self._model_from(sent.arrays), result)
            state = model.state_dict()
        if self._settings.distill is not None and aggregation.teacher is not None:
            state = self._distilled(model, aggregation.teacher, record)
        log_round(record)
        return ArrayRecord(state), self.train_metrics_aggr_fn(aggregation.metrics, self.weighted_by_key)

    def alignment_report(self) -> dict[str, Any]:
        """What is aligned and what partial alignment left out (and why), for ``history.json``."""
        if self.spec is None:
            return {"aligned": [], "left": []}
        return {"aligned": self.spec.names(), "left": [dataclasses.asdict(entry) for entry in self.spec.left]}

    def round_record(self, server_round: int) -> RoundRecord | None:
        """This strategy's record of ``server_round`` (drops, reference, statistics, merge chosen), or None.

        :class:`~fedcca.flower.recording.RecordRounds` completes it with the exchange and the evaluation.
        """
        return next((record for record in reversed(self.rounds) if record.round == server_round), None)

    def _model_from(self, arrays: ArrayRecord) -> nn.Module:
        model = self._settings.model_fn()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    def _distilled(self, merged: nn.Module, teacher: TeacherSum, record: RoundRecord) -> dict[str, torch.Tensor]:
        """The merge distilled toward the clients' ensemble on the calibration images (early-stopped on the hold-out set)."""
        settings = self._settings
        assert settings.distill is not None and settings.holdout is not None
        config = dataclasses.replace(settings.distill, seed=settings.distill.seed + record.round)
        result = distill(merged, settings.distill_images, teacher, settings.holdout, config,
                         device=settings.device)
        record.distillation = result.to_json()
        log(INFO, "aggregate_train: distilled toward the clients' %s: hold-out accuracy %.4f -> %.4f in %d steps "
            "(%.1fs)", result.teacher or "ensemble (merge kept)", result.holdout_before, result.holdout_after,
            result.steps, result.seconds)
        return result.model.state_dict()

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics, dropping replies without a usable weight (logged)."""
        valid = valid_evaluate_replies(replies, self.weighted_by_key)
        return self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key) if valid else None


def _skipped(record: RoundRecord, reason: str) -> tuple[None, None]:
    """Mark the round skipped (the global model is kept), logged with ``reason``."""
    log(WARNING, "aggregate_train: round %s skipped, global model unchanged: %s", record.round, reason)
    record.skipped, record.skip_reason = True, reason
    return None, None
