"""CCA Merge as a Flower strategy: a drop-in replacement for ``FedAvg``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import nn

from fedcca.alignment import spec_for
from fedcca.devices import resolve_device
from fedcca.merging import METHODS, merge
from fedcca.repair import REPAIRS
from fedcca.transforms import DEFAULT_RIDGE_MODE, RIDGE_MODES
from fedcca.statistics import PairStatistics, StatisticsError, as_batches, collect_statistics
from fedcca.protocol import (
    COMPUTE_STATS_FLAG,
    ClientUpdate,
    InvalidReplyError,
    record_bytes,
    validate_evaluate_reply,
    validate_reply,
)

REFERENCES = ("global", "largest", "first")
STATISTICS_SOURCES = ("client", "server")
NORM_CENTERS = ("median", "global")
# Methods whose transforms come from activation statistics (the others are data-free).
_STATISTICS_METHODS = ("cca", "permute")
# What a merge may raise because of the replies' contents (the configuration was
# checked in __init__): degenerate statistics, failed decompositions, overflow.
_MERGE_DATA_ERRORS = (ValueError, ArithmeticError, RuntimeError)


def average_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted average of every metric over the replies that report it.

    Equal to FedAvg's ``aggregate_metricrecords`` when all replies carry the same keys;
    unlike it, replies of different ClientApps (the fedcca one and a FedAvg-style one)
    may report different metrics. A list metric whose length differs from the first
    reply's is left out of the average for that reply (logged).

    Args:
        records: Reply contents, each with one ``MetricRecord`` holding ``weighted_by_key``.
        weighted_by_key: The metric used as weight (excluded from the result).
    """
    metric_records = [next(iter(record.metric_records.values())) for record in records]
    # Scaled by the largest so that huge (but finite) weights cannot overflow a sum.
    largest = max((float(m[weighted_by_key]) for m in metric_records), default=1.0)  # type: ignore[arg-type]
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for metrics in metric_records:
        weight = float(metrics[weighted_by_key]) / largest  # type: ignore[arg-type]
        for key, value in metrics.items():
            if key == weighted_by_key:
                continue
            value_array = np.asarray(value, dtype=np.float64)
            if key in sums and sums[key].shape != value_array.shape:
                log(WARNING, "Metric '%s' has shape %s, others %s: not averaged for this reply",
                    key, value_array.shape, sums[key].shape)
                continue
            sums[key] = sums.get(key, 0.0) + weight * value_array
            totals[key] = totals.get(key, 0.0) + weight
    return MetricRecord({key: (sums[key] / totals[key]).tolist() for key in sums})


@dataclass
class _SentRound:
    """What configure_train sent, needed when the replies come back."""

    server_round: int
    arrays: ArrayRecord
    node_ids: list[int]


class _SkipRound(Exception):
    """The round cannot produce a model; the message is the reason."""


# pylint: disable=too-many-instance-attributes
class CCAMerge(FedAvg):
    """FedAvg with the averaging step replaced by CCA Merge (Horoi et al., ICML 2024).

    Each round, every valid client model is aligned to a reference model with a transform
    computed from activation statistics on calibration data (sent by the client, or
    computed on the server), then all aligned models are averaged weighted by
    ``num-examples`` and BatchNorm statistics are recomputed on the calibration data.
    Invalid replies are dropped (one log line each, naming node and reason); a round with
    fewer than ``min_train_nodes`` valid replies keeps the previous global model.
    Per-round timings and bytes received are appended to ``round_log``.

    Swapping strategies changes one line::

        FedAvg(fraction_train=0.5, min_available_nodes=4)
        CCAMerge(model_fn, calibration, fraction_train=0.5, min_available_nodes=4)

    Args:
        model_fn: Builds a fresh model of the federated architecture; it must describe its
            alignment points (``alignment_spec()``).
        calibration: Server-side calibration inputs: a tensor or an iterable of batches
            (or of ``(x, y)`` batches). Used for server-side statistics and BatchNorm.
        method: One of ``fedcca.merging.METHODS``: "cca", "permute", "weight-matching",
            "direct".
        reference: "global" (the round's global model, an alignment target only, not
            averaged), "largest" (the reply with most ``num-examples``) or "first"
            (the first valid reply).
        stats: "client" (use statistics sent in replies when they match the reference,
            compute the missing ones on the server) or "server" (always on the server).
        ridge: Ridge of the CCA transform (None: the default of ``ridge_mode``).
        ridge_mode: How the CCA ridge regularises, one of ``fedcca.transforms.RIDGE_MODES``
            (default "trace"; "absolute" is the paper's).
        recompute_bn: Recompute BatchNorm running statistics of the merged model.
        repair: One of ``fedcca.repair.REPAIRS``: correct the merged model's pre-activation
            statistics towards the aligned clients' on the calibration set ("none" default).
        zero_dead: Zero the weights of client features that are exactly 0 on the
            calibration data (dead ReLU units) before aligning (see ``fedcca.merging.merge``).
        balance: Balance the incoming and outgoing weight norms of every merged feature
            (function-preserving; keeps CCA/Permute merges trainable in the next round).
        max_norm_ratio: If set, drop a reply whose weights lie farther than this multiple
            of the median distance from ``norm_center``.
        norm_center: "median" (coordinate-wise median of the replies) or "global" (the
            round's global model) for the norm screen.
        device: Where statistics and merging run (None: CUDA if available, else CPU).
        batch_size: Calibration batch size.
        calibration_labels: Labels of ``calibration`` (a tensor then). When given, each
            round's aligned merge is kept only if its cross-entropy on the calibration set is
            *significantly* lower than that of the plain weighted average of the same
            replies: the mean of the paired per-example loss differences must exceed
            ``guard_z`` standard errors. Otherwise the plain average (FedAvg) is used
            (logged; ``merge_choice``, ``calibration_loss`` and ``guard_z`` are recorded in
            ``round_log``). A guard against alignments that break the network, on public
            data, never on test data. The statistics are fitted on the same calibration
            images, which favours the aligned merge slightly; the margin also covers that.
        guard_z: The guard's margin in standard errors (default 2; 0 keeps any merge with a
            lower mean loss).
        **fedavg_kwargs: Any ``FedAvg`` argument (``fraction_train``, ``min_train_nodes``,
            ``min_available_nodes``, ``weighted_by_key``, ...).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        calibration: torch.Tensor | Iterable[Any],
        *,
        method: str = "cca",
        reference: str = "global",
        stats: str = "client",
        ridge: float | None = None,
        ridge_mode: str = DEFAULT_RIDGE_MODE,
        recompute_bn: bool = True,
        repair: str = "none",
        zero_dead: bool = True,
        balance: bool = True,
        max_norm_ratio: float | None = None,
        norm_center: str = "median",
        device: torch.device | str | None = None,
        batch_size: int = 256,
        calibration_labels: torch.Tensor | None = None,
        guard_z: float = 2.0,
        **fedavg_kwargs: Any,
    ) -> None:
        # Mixed ClientApps report different metrics; FedAvg's default needs equal keys.
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", average_metrics)
        fedavg_kwargs.setdefault("evaluate_metrics_aggr_fn", average_metrics)
        super().__init__(**fedavg_kwargs)
        _check_choice("method", method, METHODS)
        _check_choice("reference", reference, REFERENCES)
        _check_choice("stats", stats, STATISTICS_SOURCES)
        _check_choice("norm_center", norm_center, NORM_CENTERS)
        _check_choice("ridge_mode", ridge_mode, RIDGE_MODES)
        _check_choice("repair", repair, REPAIRS)
        if max_norm_ratio is not None and not max_norm_ratio > 0:
            raise ValueError(f"max_norm_ratio must be positive, got {max_norm_ratio!r}")
        self.model_fn = model_fn
        # Materialised: the calibration data is read every round.
        self.calibration = calibration if isinstance(calibration, torch.Tensor) else list(calibration)
        self.method = method
        self.reference = reference
        self.stats = stats
        self.ridge = ridge
        self.ridge_mode = ridge_mode
        self.recompute_bn = recompute_bn
        self.repair = repair
        self.zero_dead = zero_dead
        self.balance = balance
        self.max_norm_ratio = max_norm_ratio
        self.norm_center = norm_center
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.calibration_labels = _checked_labels(calibration_labels, self.calibration)
        if not guard_z == guard_z:
            raise ValueError("guard_z must be a number, got NaN")
        self.guard_z = float(guard_z)
        self.round_log: list[dict[str, Any]] = []
        model = model_fn()
        self.spec = spec_for(model)  # raises UnsupportedModelError for foreign models
        self._template = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        self._check_calibration(model)
        self._sent: _SentRound | None = None

    @property
    def requests_client_statistics(self) -> bool:
        """Whether train messages ask clients for statistics (COMPUTE_STATS_FLAG)."""
        # Client statistics are taken against the model the client received, so they
        # fit only when that model is the alignment reference.
        return self.method in _STATISTICS_METHODS and self.stats == "client" and self.reference == "global"

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> CCA Merge:")
        log(INFO, "\t│\t├── Method: %s | reference: %s | statistics: %s",
            self.method, self.reference, self.stats)
        log(INFO, "\t│\t├── Ridge: %s (%s) | BatchNorm recomputation: %s | repair: %s",
            self.ridge, self.ridge_mode, self.recompute_bn, self.repair)
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
        self._sent = _SentRound(server_round, arrays, [msg.metadata.dst_node_id for msg in messages])
        return messages

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, merge the valid ones with CCA Merge and average metrics.

        Returns ``(None, None)`` (the previous global model is kept) when fewer than
        ``min_train_nodes`` replies are valid or the merge fails on the replies' data.
        """
        replies = list(replies)
        entry: dict[str, Any] = {
            "round": server_round, "num_replies": len(replies), "num_valid": 0, "num_dropped": 0,
            "dropped": {}, "skipped": False, "skip_reason": None, "reference": None,
            "client_statistics": 0, "stats_seconds": 0.0, "merge_seconds": 0.0,
            "bytes_received": {msg.metadata.src_node_id: record_bytes(msg) for msg in replies},
            "statistics_bytes": {},
        }
        self.round_log.append(entry)
        started = time.perf_counter()
        try:
            updates = self._valid_updates(server_round, replies, entry)
            arrays = self._merge(server_round, updates, entry)
        except _SkipRound as skip:
            log(WARNING, "aggregate_train: round %s skipped, global model unchanged: %s",
                server_round, skip)
            entry.update(skipped=True, skip_reason=str(skip))
            return None, None
        finally:
            entry["num_dropped"] = len(entry["dropped"])
            entry["aggregate_seconds"] = time.perf_counter() - started
        metrics = self.train_metrics_aggr_fn(
            [RecordDict({"metrics": update.metrics}) for update in updates], self.weighted_by_key
        )
        return arrays, metrics

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

    # ------------------------------------------------------------------ validation

    def _valid_updates(
        self, server_round: int, replies: list[Message], entry: dict[str, Any]
    ) -> list[ClientUpdate]:
        updates: list[ClientUpdate] = []
        seen: set[int] = set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            try:
                if node_id in seen:
                    raise InvalidReplyError("duplicate reply from the same node")
                seen.add(node_id)
                update = validate_reply(msg, self._template, self.spec,
                                        weights_key=self.arrayrecord_key,
                                        weighted_by_key=self.weighted_by_key)
            except InvalidReplyError as err:
                self._drop(entry, node_id, str(err))
                continue
            updates.append(update)
            entry["statistics_bytes"][node_id] = update.statistics_bytes
        if self._sent is not None and self._sent.server_round == server_round:
            for node_id in self._sent.node_ids:
                if node_id not in seen:
                    entry["bytes_received"][node_id] = 0
                    self._drop(entry, node_id, "no reply (dropout or timeout)")
        log(INFO, "aggregate_train: %s valid replies, %s dropped",
            len(updates), len(entry["dropped"]))
        updates = self._screen_norms(server_round, updates, entry)
        self._require_enough(updates, entry)
        return updates

    def _screen_norms(
        self, server_round: int, updates: list[ClientUpdate], entry: dict[str, Any]
    ) -> list[ClientUpdate]:
        if self.max_norm_ratio is None or not updates:
            return updates
        center = None
        if self.norm_center == "global":
            center = _flatten(self._global_arrays(server_round).to_torch_state_dict())
        ratios = _distance_ratios([_flatten(u.state_dict) for u in updates], center)
        kept = []
        for update, ratio in zip(updates, ratios, strict=True):
            if ratio > self.max_norm_ratio:
                self._drop(entry, update.node_id, f"weights {ratio:.3g}x the median distance from "
                           f"the {self.norm_center} (max_norm_ratio={self.max_norm_ratio})")
            else:
                kept.append(update)
        return kept

    def _drop(self, entry: dict[str, Any], node_id: int, reason: str) -> None:
        entry["dropped"][node_id] = reason
        _log_drop("aggregate_train", node_id, reason)

    def _require_enough(self, updates: list[ClientUpdate], entry: dict[str, Any]) -> None:
        entry["num_valid"] = len(updates)
        needed = max(self.min_train_nodes, 1)
        if len(updates) < needed:
            raise _SkipRound(f"{len(updates)} valid replies, min_train_nodes is {needed}")

    # ------------------------------------------------------------------ merging

    def _merge(
        self, server_round: int, updates: list[ClientUpdate], entry: dict[str, Any]
    ) -> ArrayRecord:
        models = [self._model_from(update.state_dict) for update in updates]
        reference, statistics = self._reference_and_statistics(server_round, updates, models, entry)
        # Scaled by the largest so that huge (but finite) num-examples cannot overflow a sum.
        largest = max(update.num_examples for update in updates)
        weights = [update.num_examples / largest for update in updates]
        started = time.perf_counter()
        try:
            merged = merge(
                models, self.calibration, method=self.method, reference=reference, weights=weights,
                ridge=self.ridge, ridge_mode=self.ridge_mode, statistics=statistics,
                recompute_bn=self.recompute_bn, repair=self.repair, zero_dead=self.zero_dead,
                balance=self.balance, device=self.device,
                batch_size=self.batch_size,
            )
        except _MERGE_DATA_ERRORS as err:
            log(ERROR, "aggregate_train: merge failed in round %s", server_round, exc_info=True)
            raise _SkipRound(f"merge failed: {type(err).__name__}: {err}") from err
        finally:
            entry["merge_seconds"] = time.perf_counter() - started
        state_dict = merged.state_dict()
        bad = [key for key, value in state_dict.items()
               if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise _SkipRound(f"merged model has non-finite values in {bad[:3]}")
        if self.calibration_labels is not None and self.method != "direct":
            state_dict = self._guarded(server_round, merged, models, weights, entry)
        return ArrayRecord(state_dict)

    def _guarded(
        self,
        server_round: int,
        merged: nn.Module,
        models: list[nn.Module],
        weights: list[float],
        entry: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """The aligned merge where it fits the calibration set significantly better, else the plain average."""
        plain = merge(
            models, self.calibration, method="direct", weights=weights, recompute_bn=self.recompute_bn,
            device=self.device, batch_size=self.batch_size,
        )
        aligned_losses, direct_losses = self._calibration_losses(merged), self._calibration_losses(plain)
        z = _paired_z(direct_losses - aligned_losses)
        choice = "aligned" if z > self.guard_z else "direct"
        losses = {"aligned": _finite_mean(aligned_losses), "direct": _finite_mean(direct_losses)}
        entry.update(merge_choice=choice, calibration_loss=losses, guard_z=z)
        if choice == "direct":
            log(WARNING, "aggregate_train: round %s: the %s merge has calibration loss %.4g vs %.4g for the "
                "plain average (gain %.2f standard errors, needs > %g); using the plain average",
                server_round, self.method, losses["aligned"], losses["direct"], z, self.guard_z)
        return (merged if choice == "aligned" else plain).state_dict()

    def _calibration_losses(self, model: nn.Module) -> torch.Tensor:
        """Per-example cross-entropy of ``model`` on the labelled calibration set (float64, CPU)."""
        assert isinstance(self.calibration, torch.Tensor) and self.calibration_labels is not None
        model = model.to(self.device).eval()
        losses = []
        with torch.no_grad():
            for start in range(0, len(self.calibration), self.batch_size):
                x = self.calibration[start:start + self.batch_size].to(self.device)
                y = self.calibration_labels[start:start + self.batch_size].to(self.device)
                losses.append(torch.nn.functional.cross_entropy(model(x), y, reduction="none").double().cpu())
        return torch.cat(losses)

    def _reference_and_statistics(
        self,
        server_round: int,
        updates: list[ClientUpdate],
        models: list[nn.Module],
        entry: dict[str, Any],
    ) -> tuple[int | nn.Module, list[Mapping[str, PairStatistics]] | None]:
        """Pick the reference and gather statistics, dropping replies that break them.

        ``updates`` and ``models`` are pruned in place so that indices stay aligned.
        """
        while True:
            self._require_enough(updates, entry)
            reference = self._pick_reference(server_round, updates, entry)
            if self.method not in _STATISTICS_METHODS:
                return reference, None
            statistics = self._statistics(reference, updates, models, entry)
            if isinstance(reference, int) and isinstance(statistics[reference], StatisticsError):
                # The reference's own features are unusable, so every pair failed with it:
                # drop the reference alone and pick another one.
                failed = [reference]
            else:
                failed = [i for i, stats in enumerate(statistics) if isinstance(stats, StatisticsError)]
            for i in failed:
                self._drop(entry, updates[i].node_id, f"server-side statistics failed: {statistics[i]}")
            for kept in (updates, models, statistics):
                kept[:] = [item for i, item in enumerate(kept) if i not in failed]  # type: ignore[index]
            if not (isinstance(reference, int) and reference in failed):
                self._require_enough(updates, entry)
                if isinstance(reference, int):
                    reference -= sum(i < reference for i in failed)
                return reference, statistics  # type: ignore[return-value]

    def _pick_reference(
        self, server_round: int, updates: list[ClientUpdate], entry: dict[str, Any]
    ) -> int | nn.Module:
        if self.reference == "global":
            entry["reference"] = "global"
            return self._model_from(self._global_arrays(server_round).to_torch_state_dict())
        index = _reference_index(self.reference, updates)
        entry["reference"] = updates[index].node_id
        return index

    def _statistics(
        self,
        reference: int | nn.Module,
        updates: list[ClientUpdate],
        models: list[nn.Module],
        entry: dict[str, Any],
    ) -> list[dict[str, PairStatistics] | StatisticsError]:
        """Statistics of every model against the reference; a StatisticsError marks a failure."""
        use_client = self.requests_client_statistics
        result: list[dict[str, PairStatistics] | StatisticsError | None] = [
            update.statistics if use_client else None for update in updates
        ]
        entry["client_statistics"] = sum(stats is not None for stats in result)
        missing = [i for i, stats in enumerate(result) if stats is None]
        if missing:
            target = reference if isinstance(reference, nn.Module) else models[reference]
            started = time.perf_counter()
            computed = self._server_statistics(target, [models[i] for i in missing])
            entry["stats_seconds"] = time.perf_counter() - started
            for i, stats in zip(missing, computed, strict=True):
                result[i] = stats
        return result  # type: ignore[return-value]

    def _server_statistics(
        self, reference: nn.Module, models: list[nn.Module]
    ) -> list[dict[str, PairStatistics] | StatisticsError]:
        try:
            return list(self._collect(reference, models))
        except StatisticsError:
            pass  # some model gives non-finite features: find which, one model at a time
        results: list[dict[str, PairStatistics] | StatisticsError] = []
        for model in models:
            try:
                results.append(self._collect(reference, [model])[0])
            except StatisticsError as err:
                results.append(err)
        return results

    def _collect(self, reference: nn.Module, models: list[nn.Module]) -> list[dict[str, PairStatistics]]:
        return collect_statistics(reference, models, self.calibration, self.spec,
                                  device=self.device, batch_size=self.batch_size)

    # ------------------------------------------------------------------ helpers

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

    def _check_calibration(self, model: nn.Module) -> None:
        batch = next(as_batches(self.calibration, self.batch_size), None)
        if batch is None:
            raise ValueError("CCAMerge: the calibration data is empty")
        try:
            with torch.no_grad():
                model.eval()(batch.detach().cpu())
        except Exception as err:
            raise ValueError(f"CCAMerge: model_fn()'s model cannot run on the calibration data "
                             f"(batch shape {tuple(batch.shape)}): {err}") from err


def _paired_z(gain: torch.Tensor) -> float:
    """Mean of paired differences over its standard error (+-inf / 0 when the spread is 0; -inf if not finite)."""
    if not torch.isfinite(gain).all():
        return float("-inf")
    mean = gain.mean().item()
    se = gain.std().item() / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
    if se == 0:
        return 0.0 if mean == 0 else float(np.sign(mean)) * float("inf")
    return mean / se


def _finite_mean(losses: torch.Tensor) -> float:
    """Mean loss, inf when any is not finite."""
    mean = losses.mean().item()
    return mean if np.isfinite(mean) else float("inf")


def _checked_labels(labels: torch.Tensor | None, calibration: Any) -> torch.Tensor | None:
    """Calibration labels as an int64 tensor matching the calibration tensor, or None."""
    if labels is None:
        return None
    if not isinstance(calibration, torch.Tensor):
        raise ValueError("CCAMerge: calibration_labels need the calibration inputs as one tensor")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (len(calibration),):
        raise ValueError(f"CCAMerge: calibration_labels of shape {tuple(labels.shape)} do not match "
                         f"{len(calibration)} calibration inputs")
    return labels


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CCAMerge: {name} must be one of {choices}, got {value!r}")


def _log_drop(where: str, node_id: int, reason: str) -> None:
    log(WARNING, "%s: dropped reply from node %s: %s", where, node_id, reason)


def _reference_index(policy: str, updates: list[ClientUpdate]) -> int:
    if policy == "largest":
        return max(range(len(updates)), key=lambda i: updates[i].num_examples)
    return 0


def _flatten(state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.detach().reshape(-1).double() for value in state_dict.values()
                      if value.is_floating_point()])


def _distance_ratios(vectors: list[torch.Tensor], center: torch.Tensor | None) -> list[float]:
    """Distance of each vector from ``center`` (default: coordinate-wise median) / median distance."""
    stacked = torch.stack(vectors).numpy()
    middle = np.median(stacked, axis=0) if center is None else center.numpy()
    distances = np.linalg.norm(stacked - middle, axis=1)
    typical = float(np.median(distances))
    if typical == 0.0:  # most replies sit exactly on the center: any other one is an outlier
        return [0.0 if d == 0.0 else float("inf") for d in distances]
    return [float(d / typical) for d in distances]
