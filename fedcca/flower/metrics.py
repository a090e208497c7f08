"""Averaging the clients' metrics over a round's replies (tolerant of mixed ClientApps)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedcca.flower.protocol import InvalidReplyError, validate_evaluate_reply

MAX_METRIC = 1e12
"""Largest metric magnitude averaged (a loss or a time is far below it)."""


def average_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted average of every metric over the replies that report it.

    Equal to FedAvg's ``aggregate_metricrecords`` when all replies carry the same keys;
    unlike it, replies of different ClientApps (the fedcca one and a FedAvg-style one)
    may report different metrics. A list metric whose length differs from the first
    reply's, or a value that is not finite or beyond 1e12 in size (one client's NaN or 1e308
    ``train-loss`` would own the mean), is left out of the average for that reply (logged).

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
            if not (np.isfinite(value_array).all() and (np.abs(value_array) <= MAX_METRIC).all()):
                log(WARNING, "Metric '%s' = %s is not finite or beyond %g: not averaged for this reply", key,
                    value, MAX_METRIC)
                continue
            if key in sums and sums[key].shape != value_array.shape:
                log(WARNING, "Metric '%s' has shape %s, others %s: not averaged for this reply",
                    key, value_array.shape, sums[key].shape)
                continue
            sums[key] = sums.get(key, 0.0) + weight * value_array
            totals[key] = totals.get(key, 0.0) + weight
    return MetricRecord({key: (sums[key] / totals[key]).tolist() for key in sums})


def valid_evaluate_replies(replies: Iterable[Message], weighted_by_key: str) -> list[RecordDict]:
    """The contents of the evaluation replies with a usable weight; each other one is logged with its reason."""
    valid: list[RecordDict] = []
    for msg in replies:
        try:
            validate_evaluate_reply(msg, weighted_by_key)
        except InvalidReplyError as err:
            log(WARNING, "aggregate_evaluate: dropped reply from node %s: %s", msg.metadata.src_node_id, err)
            continue
        valid.append(msg.content)
    return valid
