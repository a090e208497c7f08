"""CCA Merge as a Flower strategy: a drop-in replacement for ``FedAvg``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from logging import DEBUG, INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedcca.aligners import ALIGNERS
from fedcca.alignment import spec_for
from fedcca.config import MergeConfig, MergeSearch
from fedcca.devices import resolve_device
from fedcca.merging import Merger, MergeResult
from fedcca.metrics import average_metrics
from fedcca.norm_screen import NORM_CENTERS, screen
from fedcca.protocol import COMPUTE_STATS_FLAG, ClientUpdate, InvalidReplyError, record_bytes, validate_evaluate_reply, \
    validate_reply
from fedcca.rounds import RoundRecord
from fedcca.statistics import Moments, PairStatistics, StatisticsError, as_batches, assemble, collect_moments, \
    collect_statistics

REFERENCES = ("global", "largest", "first")
STATISTICS_SOURCES = ("client", "server")
# What aligning one reply may raise because of its contents: degenerate statistics, a failed
# decomposition, non-finite aligned weights (fedcca.merging.MergeError is a ValueError).
_REPLY_DATA_ERRORS = (ValueError, ArithmeticError, RuntimeError)

FEDERATED_SEARCH = MergeSearch(
    MergeConfig("cca", zero_dead=False),
    (("shrinkage", (0.0, 0.25, 0.5, 1.0)), ("repair", ("none", "affine"))),
    min_z=2.0,
    description="CCA shrunk towards FedAvg, with and without REPAIR, chosen on held-out data",
)
"""CCAMerge's default when it has labelled held-out data: the transforms ``T_a = I + a (T - I)``
for ``a`` in {0, 0.25, 0.5, 1}, each with and without REPAIR; ``a = 0`` without REPAIR (plain
FedAvg) is kept unless another candidate's held-out loss is lower by more than 2 paired
standard errors. Measured in README, Federated results."""

UNLABELLED_DEFAULT = MergeConfig("cca", zero_dead=False, shrinkage=0.5)
"""CCAMerge's default without labelled held-out data (nothing to choose with): CCA shrunk
half-way towards FedAvg."""


@dataclass
class _Round:
    """What configure_train sent, needed when the replies come back."""

    server_round: int
    arrays: ArrayRecord
    node_ids: list[int]


class _SkipRound(Exception):
    """The round cannot produce a model; the message is the reason."""


class CCAMerge(FedAvg):
    """FedAvg with the averaging step replaced by CCA Merge (Horoi et al., ICML 2024).

    Each round, every valid client model is aligned to a reference model (by default the
    round's global model) with transforms computed from activation statistics on public
    calibration data (sent by the client, or computed on the server), the aligned models
    are averaged weighted by ``num-examples``, and BatchNorm statistics are recomputed on the
    calibration data. With labelled ``holdout`` data, a :class:`~fedcca.config.MergeSearch`
    chooses each round among candidate merges (by default :data:`FEDERATED_SEARCH`, whose
    baseline is plain FedAvg). Replies are merged one at a time into running sums, so the
    server holds the reference, one sum per candidate and one client model (reference
    "global", no norm screen). Invalid replies are dropped (one log line each, naming node
    and reason); a round with fewer than ``min_train_nodes`` valid replies keeps the previous
    global model. Each round's :class:`~fedcca.rounds.RoundRecord` is appended to ``rounds``.

    Swapping strategies changes one line::

        FedAvg(fraction_train=0.5, min_available_nodes=4)
        CCAMerge(Net, calibration, fraction_train=0.5, min_available_nodes=4)

    Args:
        model_fn: Builds a fresh model of the federated architecture; ``fedcca.alignment.spec_for``
            must be able to describe it.
        calibration: Public calibration inputs for statistics, BatchNorm and REPAIR: a tensor
            or an iterable of batches (or of ``(x, y)`` batches).
        config: How to merge: a ``MergeConfig``, a ``MergeSearch`` or None (the defaults above).
        holdout: Labelled public ``(inputs, labels)``, disjoint from ``calibration``; read
            only to choose among a search's candidates.
        reference: "global" (the round's global model, an alignment target only, not
            averaged), "largest" (the reply with most ``num-examples``) or "first" (the
            first valid reply).
        stats: "client" (use statistics sent in replies when they match the reference,
            compute the missing ones on the server) or "server" (always on the server).
        max_norm_ratio: If set, drop a reply whose weights lie farther than this multiple
            of the median distance from ``norm_center`` (a pass over all replies first).
        norm_center: "median" (coordinate-wise median of the replies) or "global".
        device: Where statistics and merging run (None: CUDA if available, else CPU).
        batch_size: Calibration batch size.
        statistics_group: Replies whose statistics the server computes together (one pass of
            the reference over the calibration data per group).
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
        holdout: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference: str = "global",
        stats: str = "client",
        max_norm_ratio: float | None = None,
        norm_center: str = "median",
        device: torch.device | str | None = None,
        batch_size: int = 256,
        statistics_group: int = 8,
        **kwargs: Any,
    ) -> None:
        merge_fields = {f.name for f in dataclasses.fields(MergeConfig)}
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in merge_fields}
        # Mixed ClientApps report different metrics; FedAvg's default needs equal keys.
        kwargs.setdefault("train_metrics_aggr_fn", average_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", average_metrics)
        super().__init__(**kwargs)
        for name, value, choices in (("reference", reference, REFERENCES), ("stats", stats, STATISTICS_SOURCES),
                                     ("norm_center", norm_center, NORM_CENTERS)):
            if value not in choices:
                raise ValueError(f"CCAMerge: {name} must be one of {choices}, got {value!r}")
        if max_norm_ratio is not None and not max_norm_ratio > 0:
            raise ValueError(f"CCAMerge: max_norm_ratio must be positive, got {max_norm_ratio!r}")
        if statistics_group < 1:
            raise ValueError(f"CCAMerge: statistics_group must be >= 1, got {statistics_group}")
        if config is None:
            config = FEDERATED_SEARCH if holdout is not None else UNLABELLED_DEFAULT
        search = MergeSearch.of(config)
        if options:
            search = dataclasses.replace(search, base=MergeConfig.from_options(search.base, **options))
        joint = [c.method for c in search.candidates() if c.aligns and ALIGNERS[c.method].joint]
        if joint:
            raise ValueError(f"CCAMerge: method {joint[0]!r} aligns all client models jointly; a federated round "
                             "aligns each reply to the reference (use cca, permute, weight-matching or blend)")
        if len(search.candidates()) > 1 and holdout is None:
            raise ValueError(f"CCAMerge: a search over {len(search.candidates())} candidates needs labelled "
                             "holdout data (holdout=(inputs, labels))")
        self.search = search
        self.model_fn = model_fn
        # Materialised: the calibration data is read every round.
        self.calibration = list(as_batches(calibration, batch_size))
        self.holdout = _checked_holdout(holdout)
        self.reference = reference
        self.stats = stats
        self.max_norm_ratio = max_norm_ratio
        self.norm_center = norm_center
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.statistics_group = statistics_group
        self.rounds: list[RoundRecord] = []
        model = model_fn()
        example = self.calibration[0] if self.calibration else None  # traces a model without alignment_spec()
        self.spec = spec_for(model, example) if self._needs_spec() else None  # UnsupportedModelError if refused
        self._template = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        _check_runs(model, self.calibration)
        self._sent: _Round | None = None
        self._moments: dict[str, Moments] | None = None

    @property
    def requests_client_statistics(self) -> bool:
        """Whether train messages ask clients for statistics (COMPUTE_STATS_FLAG)."""
        # Client statistics are taken against the model the client received, so they
        # fit only when that model is the alignment reference.
        needed = any(config.needs_statistics for config in self.search.candidates())
        return needed and self.stats == "client" and self.reference == "global"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        candidates = self.search.candidates()
        log(INFO, "\t├──> CCA Merge:")
        log(INFO, "\t│\t├── Merge: %s", " | ".join(c.label() for c in candidates)
            + (f" (chosen each round on {len(self.holdout[1])} held-out examples, baseline margin "
               f"{self.search.min_z:g} SE)" if len(candidates) > 1 and self.holdout else ""))
        log(INFO, "\t│\t├── Reference: %s | statistics: %s | calibration: %d examples",
            self.reference, self.stats, sum(len(batch) for batch in self.calibration))
        log(INFO, "\t│\t└── Norm screen: %s", "off" if self.max_norm_ratio is None
            else f"{self.max_norm_ratio} x median distance from {self.norm_center}")
        super().summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
        """Run ``Strategy.start``; if no round produced a model, report ``initial_arrays``.

        ``Strategy.start`` keeps the previous global model when ``aggregate_train`` returns
        ``None`` arrays, but leaves ``Result.arrays`` empty when that happens in every round.
        """
        result = super().start(grid, initial_arrays, *args, **kwargs)
        if not result.arrays:
            result.arrays = initial_arrays
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of training; tells clients whether to send statistics."""
        config = ConfigRecord(dict(config))  # start() passes the same record every round
        config[COMPUTE_STATS_FLAG] = self.requests_client_statistics
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = _Round(server_round, arrays, [msg.metadata.dst_node_id for msg in messages])
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, merge the valid ones with CCA Merge and average metrics.

        Returns ``(None, None)`` (the previous global model is kept) when fewer than
        ``min_train_nodes`` replies are valid or no merge could be made.
        """
        replies = sorted(replies, key=lambda msg: msg.metadata.src_node_id)
        self._moments = None  # the global model's own statistics, measured when the first client's arrive
        record = RoundRecord(server_round, num_replies=len(replies),
                             bytes_received={msg.metadata.src_node_id: record_bytes(msg) for msg in replies})
        if self._sent is not None and self._sent.server_round == server_round:
            record.num_sent = len(self._sent.node_ids)
        self.rounds.append(record)
        started = time.perf_counter()
        metrics: list[RecordDict] = []
        try:
            result = self._merge(server_round, replies, record, metrics)
        except _SkipRound as skip:
            log(WARNING, "aggregate_train: round %s skipped, global model unchanged: %s", server_round, skip)
            record.skipped, record.skip_reason = True, str(skip)
            return None, None
        finally:
            record.aggregate_seconds = time.perf_counter() - started
        state = result.model.state_dict()
        bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            skip = f"merged model has non-finite values in {bad[:3]}"
            log(WARNING, "aggregate_train: round %s skipped, global model unchanged: %s", server_round, skip)
            record.skipped, record.skip_reason = True, skip
            return None, None
        record.merge_choice = result.config.label()
        record.candidates = result.scores
        _log_round(record)
        return ArrayRecord(state), self.train_metrics_aggr_fn(metrics, self.weighted_by_key)

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate evaluation metrics, dropping replies without a usable weight."""
        valid: list[RecordDict] = []
        for msg in replies:
            try:
                validate_evaluate_reply(msg, self.weighted_by_key)
            except InvalidReplyError as err:
                _log_drop("aggregate_evaluate", msg.metadata.src_node_id, str(err))
                continue
            valid.append(msg.content)
        return self.evaluate_metrics_aggr_fn(valid, self.weighted_by_key) if valid else None

    # ------------------------------------------------------------------ one round

    def _merge(self, server_round: int, replies: list[Message], record: RoundRecord,
               metrics: list[RecordDict]) -> MergeResult:
        if self.reference == "global" or (self.max_norm_ratio is not None and self.norm_center == "global"):
            self._global_arrays(server_round)  # a usage error, raised before anything is merged
        updates = self._updates(server_round, replies, record)
        if self.max_norm_ratio is not None or self.reference != "global":
            updates = iter(self._screened(server_round, list(updates), record))
        started = time.perf_counter()
        merger: Merger | None = None
        group: list[tuple[ClientUpdate, nn.Module]] = []
        try:
            for update in updates:
                if merger is None:
                    merger = self._merger(server_round, update, record)
                    if self.reference != "global":  # the reference reply is averaged as it is
                        self._add(merger, [(update, merger.reference)], record, metrics, is_reference=True)
                        continue
                group.append((update, self._model_from(update.state_dict)))
                if len(group) >= self.statistics_group or not self._needs_server_statistics(update):
                    self._add(merger, group, record, metrics)
                    group = []
            if merger is not None and group:
                self._add(merger, group, record, metrics)
            self._drop_missing(server_round, record)
            record.num_valid = len(metrics)
            self._require_enough(record)
            assert merger is not None
            return merger.finish()
        except _REPLY_DATA_ERRORS as err:
            log(DEBUG, "aggregate_train: merge failed in round %s", server_round, exc_info=True)
            raise _SkipRound(f"merge failed: {type(err).__name__}: {err}") from err
        finally:
            record.merge_seconds = time.perf_counter() - started
            if merger is not None:
                record.dead_features = {int(name): counts for name, counts in merger.dead_features.items()}

    def _updates(self, server_round: int, replies: list[Message], record: RoundRecord) -> Iterator[ClientUpdate]:
        """Valid replies, decoded one at a time (duplicates and invalid ones dropped and logged)."""
        seen: set[int] = set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            try:
                if node_id in seen:
                    raise InvalidReplyError("duplicate reply from the same node")
                seen.add(node_id)
                update = validate_reply(msg, self._template, self.spec, weights_key=self.arrayrecord_key,
                                        weighted_by_key=self.weighted_by_key)
            except InvalidReplyError as err:
                _drop(record, node_id, str(err))
                continue
            record.statistics_bytes[node_id] = update.statistics_bytes
            yield update

    def _screened(self, server_round: int, updates: list[ClientUpdate], record: RoundRecord) -> list[ClientUpdate]:
        """All valid updates (norm screen applied), the reference reply first for "largest"/"first"."""
        if self.max_norm_ratio is not None:
            center = self._global_arrays(server_round).to_torch_state_dict() if self.norm_center == "global" else None
            reasons = screen([u.state_dict for u in updates], self.max_norm_ratio, self.norm_center, center)
            for update, reason in zip(updates, reasons):
                if reason is not None:
                    _drop(record, update.node_id, reason)
            updates = [u for u, reason in zip(updates, reasons) if reason is None]
        if self.reference == "global":
            return updates
        while updates:
            index = max(range(len(updates)), key=lambda i: updates[i].num_examples) if self.reference == "largest" else 0
            updates.insert(0, updates.pop(index))
            failure = self._reference_failure(updates[0])
            if failure is None:
                break
            _drop(record, updates.pop(0).node_id, f"server-side statistics failed: {failure}")
        return updates

    def _reference_failure(self, update: ClientUpdate) -> StatisticsError | None:
        """Why a reply cannot be the reference (non-finite features on the calibration data), or None."""
        if self.spec is None or not any(c.needs_statistics for c in self.search.candidates()):
            return None
        model = self._model_from(update.state_dict)
        try:
            collect_statistics(model, [model], self.calibration, self.spec, device=self.device)
        except StatisticsError as err:
            return err
        return None

    def _merger(self, server_round: int, first: ClientUpdate, record: RoundRecord) -> Merger:
        if self.reference == "global":
            record.reference = "global"
            reference = self._model_from(self._global_arrays(server_round).to_torch_state_dict())
        else:
            record.reference = first.node_id
            reference = self._model_from(first.state_dict)
        return Merger(reference, self.calibration, self.search, holdout=self.holdout, spec=self.spec,
                      device=self.device, batch_size=self.batch_size)

    def _add(self, merger: Merger, group: list[tuple[ClientUpdate, nn.Module]], record: RoundRecord,
             metrics: list[RecordDict], is_reference: bool = False) -> None:
        """Add a group of replies to the merge; a reply whose data breaks alignment is dropped alone."""
        statistics = [self._client_statistics(merger, update, record) for update, _ in group]
        record.client_statistics += sum(isinstance(stats, dict) for stats in statistics)
        sent = [isinstance(stats, StatisticsError) for stats in statistics]  # broken client statistics
        if merger.needs_statistics and not is_reference:
            statistics = self._fill_statistics(merger, group, statistics, record)
        for (update, model), stats, invalid in zip(group, statistics, sent):
            if isinstance(stats, StatisticsError):
                reason = "invalid statistics" if invalid else "server-side statistics failed"
                _drop(record, update.node_id, f"{reason}: {stats}")
                continue
            try:
                merger.add(model, update.num_examples, stats, name=str(update.node_id), is_reference=is_reference)
            except _REPLY_DATA_ERRORS as err:
                if is_reference:
                    raise
                _drop(record, update.node_id, f"alignment failed: {type(err).__name__}: {err}")
                continue
            metrics.append(RecordDict({"metrics": update.metrics}))

    def _fill_statistics(self, merger: Merger, group: list[tuple[ClientUpdate, nn.Module]], statistics: list,
                         record: RoundRecord) -> list:
        """Server-side statistics for the replies without usable client ones (a failure marks one reply)."""
        missing = [i for i, stats in enumerate(statistics) if stats is None]
        if not missing:
            return statistics
        started = time.perf_counter()
        models = [group[i][1] for i in missing]
        try:
            computed: list = collect_statistics(merger.reference, models, self.calibration, merger.spec,
                                                device=self.device)
        except StatisticsError as err:
            if err.model_index == -1:  # the reference's own features are unusable: nothing can be aligned
                raise _SkipRound(f"the reference's statistics failed: {err}") from err
            computed = [self._one_statistics(merger, model) for model in models]
        for i, stats in zip(missing, computed):
            statistics[i] = stats
        record.stats_seconds += time.perf_counter() - started
        return statistics

    def _one_statistics(self, merger: Merger, model: nn.Module) -> Any:
        try:
            return collect_statistics(merger.reference, [model], self.calibration, merger.spec, device=self.device)[0]
        except StatisticsError as err:
            return err

    def _client_statistics(self, merger: Merger, update: ClientUpdate,
                           record: RoundRecord) -> dict[str, PairStatistics] | StatisticsError | None:
        """A reply's statistics paired with the global model's own moments (measured once per round)."""
        if not self.requests_client_statistics or update.statistics is None:
            return None
        if self._moments is None:
            started = time.perf_counter()
            try:
                self._moments = collect_moments(merger.reference, self.calibration, merger.spec, device=self.device)
            except StatisticsError as err:
                raise _SkipRound(f"the global model's statistics failed: {err}") from err
            finally:
                record.stats_seconds += time.perf_counter() - started
        try:
            return assemble(self._moments, update.statistics)
        except StatisticsError as err:
            return err

    def _needs_server_statistics(self, update: ClientUpdate) -> bool:
        return self.spec is not None and any(c.needs_statistics for c in self.search.candidates()) \
            and (update.statistics is None or not self.requests_client_statistics)

    def _drop_missing(self, server_round: int, record: RoundRecord) -> None:
        if self._sent is None or self._sent.server_round != server_round:
            return
        for node_id in self._sent.node_ids:
            if node_id not in record.bytes_received:
                record.bytes_received[node_id] = 0
                _drop(record, node_id, "no reply (dropout or timeout)")

    def _require_enough(self, record: RoundRecord) -> None:
        needed = max(self.min_train_nodes, 1)
        if record.num_valid < needed:
            raise _SkipRound(f"{record.num_valid} valid replies, min_train_nodes is {needed}")

    # ------------------------------------------------------------------ helpers

    def _needs_spec(self) -> bool:
        return any(c.aligns or c.repair != "none" for c in self.search.candidates())

    def _global_arrays(self, server_round: int) -> ArrayRecord:
        if self._sent is None or self._sent.server_round != server_round:
            raise RuntimeError(
                f"CCAMerge needs the global model of round {server_round}: call configure_train "
                f"for that round before aggregate_train (reference={self.reference!r}, "
                f"norm_center={self.norm_center!r})")
        return self._sent.arrays

    def _model_from(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        model = self.model_fn()
        model.load_state_dict(state_dict)
        return model


def _checked_holdout(holdout: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out inputs and int64 labels of equal length, or None."""
    if holdout is None:
        return None
    inputs, labels = holdout
    labels = torch.as_tensor(labels).long()
    if not isinstance(inputs, torch.Tensor) or labels.shape != (len(inputs),) or len(inputs) == 0:
        raise ValueError(f"CCAMerge: holdout must be (inputs tensor [N, ...], labels [N]) with N > 0, got "
                         f"{type(inputs).__name__} and labels of shape {tuple(labels.shape)}")
    return inputs, labels


def _check_runs(model: nn.Module, calibration: list[torch.Tensor]) -> None:
    if not calibration:
        raise ValueError("CCAMerge: the calibration data is empty")
    try:
        with torch.no_grad():
            model.eval()(calibration[0].detach().cpu())
    except Exception as err:
        raise ValueError(f"CCAMerge: model_fn()'s model cannot run on the calibration data "
                         f"(batch shape {tuple(calibration[0].shape)}): {err}") from err


def _drop(record: RoundRecord, node_id: int, reason: str) -> None:
    record.drop(node_id, reason)
    _log_drop("aggregate_train", node_id, reason)


def _log_drop(where: str, node_id: int, reason: str) -> None:
    log(WARNING, "%s: dropped reply from node %s: %s", where, node_id, reason)


def _log_round(record: RoundRecord) -> None:
    """One INFO line per round: what was merged and chosen; details at DEBUG."""
    dead = record.dead_summary()
    log(INFO, "aggregate_train: round %s merged %d replies (%d dropped) -> %s%s", record.round, record.num_valid,
        record.num_dropped, record.merge_choice,
        f"; dead features on the calibration set: {dead}" if dead else "")
    for score in record.candidates:
        log(DEBUG, "  candidate %-22s held-out loss %.4f acc %.4f z %.2f%s", score.label, score.loss,
            score.accuracy, score.z, " (chosen)" if score.chosen else "")
