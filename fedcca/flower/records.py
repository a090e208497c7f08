"""What happened in one federated round: a typed record written to ``history.json``.

The ServerApp's round loop fills the exchange fields (messages sent, replies, bytes, wall
times) for any strategy; ``CCAMerge`` fills the aggregation fields (dropped replies and why,
the reference, statistics, the merge chosen and how every candidate scored).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import DEBUG, INFO
from typing import Any

from flwr.common.logger import log

from fedcca.merging.selection import CandidateScore


@dataclass
class RoundRecord:
    """One round of federated training.

    Args:
        round: The server round (1-based).
        num_sent: Train instructions sent.
        num_replies: Replies received (errors included).
        num_valid: Replies merged.
        dropped: Node id -> why its reply was not merged (one reason each).
        capped: Node id -> the ``num-examples`` it claimed, for replies whose merge weight was capped.
        skipped: No model came out of the round; the global model was kept.
        skip_reason: Why, when skipped.
        reference: "global", or the node id of the reference reply.
        client_statistics: Replies whose alignment statistics the client sent.
        stats_seconds: Server time spent computing alignment statistics.
        check_seconds: Server time spent spot-checking the statistics clients sent
            (:meth:`fedcca.flower.round_statistics.RoundStatistics.checked`).
        merge_seconds: Server time of the merge (statistics included).
        aggregate_seconds: Server time of the whole aggregation (validation included; time
            spent waiting for streamed replies excluded).
        train_seconds_wall: Wall time from sending the instructions to the end of the replies (the
            last one in, or the timeout).
        finish_seconds: Wall time from the end of the replies (the last one in, or the timeout) to
            the new global model; with streamed replies most of the merge happened before.
        bytes_sent: Payload bytes of the train instructions.
        bytes_received: Node id -> payload bytes of its reply (0: no reply).
        statistics_bytes: Node id -> bytes of the statistics it sent.
        merge_choice: The merge configuration kept (``MergeConfig.label``).
        candidates: Held-out scores of every candidate merge (when there was a choice).
        dead_features: Node id -> ``{point: features exactly 0 on the calibration data}``.
        preactivation_refused: Node id -> why the pre-activation moments it sent were not used (the
            server measured its model instead; :data:`fedcca.flower.round_statistics.MAX_PREACTIVATION_RATIO`).
        norm_growth: Node id -> the largest factor alignment changed its weights' norm by (up or
            down, over the candidates; see ``max_norm_growth``).
        guard: What the collapse guard did (:mod:`fedcca.flower.guard`): ``{"action": "rollback" | "keep" |
            "probation", "reason": ...}`` with the held-out accuracies it compared; None when it let the choice stand.
        distillation: What server-side distillation did (:meth:`fedcca.merging.distillation.DistillResult.to_json`), if on.
        metrics: Anything else the loop records (client metric means, evaluation).
    """

    round: int
    num_sent: int = 0
    num_replies: int = 0
    num_valid: int = 0
    dropped: dict[int, str] = field(default_factory=dict)
    capped: dict[int, float] = field(default_factory=dict)
    skipped: bool = False
    skip_reason: str | None = None
    reference: str | int | None = None
    client_statistics: int = 0
    stats_seconds: float = 0.0
    check_seconds: float = 0.0
    merge_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    train_seconds_wall: float = 0.0
    finish_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: dict[int, int] = field(default_factory=dict)
    statistics_bytes: dict[int, int] = field(default_factory=dict)
    merge_choice: str | None = None
    candidates: list[CandidateScore] = field(default_factory=list)
    dead_features: dict[int, dict[str, int]] = field(default_factory=dict)
    preactivation_refused: dict[int, str] = field(default_factory=dict)
    norm_growth: dict[int, float] = field(default_factory=dict)
    guard: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_dropped(self) -> int:
        """Replies (or missing replies) not merged."""
        return len(self.dropped)

    def drop(self, node_id: int, reason: str) -> None:
        """Record that ``node_id``'s reply is not merged, and why (the first reason wins)."""
        self.dropped.setdefault(node_id, reason)

    def dead_summary(self) -> dict[str, str]:
        """Point -> dead features per client, as ``"min-max"`` over the round's clients (for one log line)."""
        counts: dict[str, list[int]] = {}
        for per_point in self.dead_features.values():
            for point, count in per_point.items():
                counts.setdefault(point, []).append(count)
        clients = len(self.dead_features)
        return {point: (f"{min(c)}-{max(c)}" if min(c) != max(c) else str(c[0])) if len(c) == clients
                else f"0-{max(c)}" for point, c in counts.items()}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: node ids as strings, non-finite floats as strings, metrics inline."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "metrics"}
        data["candidates"] = [dataclasses.asdict(score) for score in self.candidates]
        data["num_dropped"] = self.num_dropped
        data.update(self.metrics)
        return jsonable(data)


def jsonable(value: Any) -> Any:
    """``value`` made standard JSON: dict keys made strings, tuples made lists and inf/NaN written as strings."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def log_round(record: RoundRecord) -> None:
    """One INFO line per round: what was merged and chosen; details at DEBUG."""
    dead = record.dead_summary()
    log(INFO, "aggregate_train: round %s merged %d replies (%d dropped) -> %s%s", record.round, record.num_valid,
        record.num_dropped, record.merge_choice,
        "; dead features per client on the calibration set: " + ", ".join(f"{p} {n}" for p, n in dead.items())
        if dead else "")
    for score in record.candidates:
        log(DEBUG, "  candidate %-22s held-out acc %.4f (z %.2f), loss %.4f, calibrated loss %.4f (z %.2f)%s",
            score.label, score.accuracy, score.z, score.loss, score.calibrated_loss, score.z_loss,
            " (chosen)" if score.chosen else "")
