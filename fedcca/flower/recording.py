"""Round records, progress and run files for any Flower strategy, as a wrapper.

:class:`RecordRounds` wraps a strategy (FedAvg, FedProx, CCAMerge or a user's own) the way
Flower's differential-privacy wrappers do: it forwards every call and, around them, keeps a
:class:`~fedcca.flower.records.RoundRecord` per round (messages and bytes sent and received,
wall times, client metrics, the evaluation). A strategy that knows more about its own
aggregation (CCAMerge: dropped replies and why, the reference, the merge chosen) exposes it
through ``round_record(server_round)``; its record is then the one completed here.

With Flower's own loop (``strategy.start(..., evaluate_fn=...)``) the wrapper also logs one
progress line per round (accuracy, merge choice, elapsed time and ETA) and, given ``out_dir``,
rewrites ``history.json`` and ``accuracy.png`` after every round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedcca.flower.protocol import record_bytes
from fedcca.flower.records import RoundRecord, jsonable
from fedcca.flower.streaming import ReplyTally, StreamingGrid
from fedcca.flower.wrapper import StrategyWrapper, find_attribute
from fedcca.plotting import atomic_write, figure, save

HISTORY_FILE = "history.json"
PLOT_FILE = "accuracy.png"


class RecordRounds(StrategyWrapper):
    """Wrap ``strategy``: one :class:`RoundRecord` per round, progress lines, history and plot.

    Args:
        strategy: The strategy whose rounds are recorded (any Flower ``Strategy``).
        out_dir: Where ``history.json`` and ``accuracy.png`` are rewritten after every round
            of :meth:`start` (None: no files). A folder that already holds a run's history is not
            overwritten: :meth:`start` writes to ``out_dir-2`` (``-3``, ...) instead, logged, and sets
            :attr:`out_dir` to it.
        title: The plot's title (default: the wrapped strategy's class name).
        metric: The evaluation metric plotted and logged (``evaluate_fn``'s key).
        num_rounds: The last round, for the ETA (:meth:`start` sets it).
    """

    def __init__(self, strategy: Strategy, out_dir: str | Path | None = None, *, title: str | None = None,
                 metric: str = "accuracy", num_rounds: int | None = None) -> None:
        super().__init__(strategy)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.title = title or type(strategy).__name__
        self.metric = metric
        self.rounds: list[RoundRecord] = []
        self.initial: dict[str, float] | None = None
        self._sent: tuple[int, int, int, float] | None = None  # round, messages, bytes, time sent
        self._total_rounds = num_rounds
        self._started = time.perf_counter()
        self._offset = 0  # added to Flower's round numbers while start(first_round=...) runs

    # ------------------------------------------------------------------ Flower's loop

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *,
              first_round: int = 1,
              on_round: Callable[[RoundRecord, ArrayRecord], None] | None = None) -> Result:
        """Flower's ``Strategy.start`` with every round recorded and replies handed over as they arrive
        (:class:`~fedcca.flower.streaming.StreamingGrid`); the other arguments as there.

        Args:
            first_round: The number of the first round (a resumed run continues at ``k + 1``): the
                wrapped strategy, ``evaluate_fn`` and the records see rounds ``first_round`` to
                ``first_round + num_rounds - 1`` (Flower's own log lines count from 1); the initial
                evaluation (round 0) runs only when ``first_round`` is 1.
            on_round: Called after each round's evaluation with its record and the global model (e.g. to
                write a checkpoint).
        """
        if first_round < 1:
            raise ValueError(f"RecordRounds: first_round must be >= 1, got {first_round}")
        self._offset = first_round - 1
        self._total_rounds, self._started = self._offset + num_rounds, time.perf_counter()
        if self.out_dir is not None:
            self.out_dir = _fresh_out_dir(self.out_dir)

        def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and self._offset:
                return None  # a resumed run: its initial model was evaluated when it started
            server_round = flower_round + self._offset if flower_round else 0
            metrics = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            values = {} if metrics is None else {key: float(value) for key, value in metrics.items()
                                                  if isinstance(value, (int, float))}
            if server_round == 0:
                self.initial = values
            else:
                record = self.finish_round(server_round, values)
                if on_round is not None:
                    on_round(record, arrays)
            return metrics

        try:
            result = super().start(StreamingGrid(grid), initial_arrays, num_rounds, timeout, train_config,
                                   evaluate_config, evaluate)
        finally:
            self._offset = 0
        if not result.arrays:  # no round produced a model: the initial one stands (Flower leaves it empty)
            result.arrays = initial_arrays
        return result

    def finish_round(self, server_round: int, metrics: Mapping[str, float]) -> RoundRecord:
        """Add the evaluation of round ``server_round``; log progress and rewrite the run files.

        Args:
            server_round: The round just aggregated.
            metrics: Its evaluation (e.g. ``{"accuracy": ..., "loss": ...}``).
        """
        record = self.round(server_round)
        record.metrics.update(metrics)
        self._log_progress(record)
        if self.out_dir is not None:
            self.write(self.out_dir)
        return record

    def round(self, server_round: int) -> RoundRecord:
        """The record of ``server_round``; KeyError when that round was not aggregated."""
        for record in reversed(self.rounds):
            if record.round == server_round:
                return record
        raise KeyError(f"no record of round {server_round}")

    def alignment(self) -> dict[str, Any] | None:
        """The wrapped strategy's ``alignment_report()`` (what is aligned, what was left out), or None."""
        report = getattr(self.strategy, "alignment_report", None)
        return report() if callable(report) else None

    def history(self) -> dict[str, Any]:
        """``{"strategy", "alignment", "initial", "rounds"}``, JSON-ready."""
        return {"strategy": self.title, "alignment": self.alignment(), "initial": self.initial,
                "rounds": [r.to_json() for r in self.rounds]}

    def write(self, out_dir: Path) -> None:
        """Write ``history.json`` and (when rounds were evaluated) ``accuracy.png`` into ``out_dir``."""
        text = json.dumps(jsonable(self.history()), indent=1)
        atomic_write(out_dir / HISTORY_FILE, lambda tmp: tmp.write_text(text))
        plot_rounds(self.initial, [r.to_json() for r in self.rounds], out_dir / PLOT_FILE, self.title, self.metric)

    # ------------------------------------------------------------------ the wrapped calls

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's instructions; their number and bytes are recorded."""
        server_round += self._offset
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = (server_round, len(messages), sum(record_bytes(m) for m in messages), time.perf_counter())
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of the replies, read as the wrapped strategy reads them.

        A list is handed on in node-id order; any other iterable (a stream of replies as they
        arrive, :func:`~fedcca.flower.streaming.stream_replies`) in arrival order, lazily.
        """
        server_round += self._offset
        if isinstance(replies, (list, tuple)):
            replies = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
        tally = ReplyTally(replies)
        started = time.perf_counter()
        # A strategy that does not declare it reads a stream once gets a list (Flower's adaptive-clipping
        # wrapper reads the replies twice).
        given: Iterable[Message] = tally if getattr(self.strategy, "accepts_stream", False) else list(tally)
        arrays, metrics = self.strategy.aggregate_train(server_round, given)
        ended = time.perf_counter()
        seconds = ended - started - tally.waited
        own = find_attribute(self.strategy, "round_record")  # also inside Flower's DP wrappers
        record = own(server_round) if callable(own) else None
        if record is None:
            screened = getattr(self.strategy, "screened_out", None)  # a ScreenReplies inside
            # the clients' own error replies (e.g. diverged training), then what a screen inside dropped
            dropped = {**tally.error_reasons, **(screened(server_round) if callable(screened) else {})}
            record = RoundRecord(server_round, num_replies=tally.count, dropped=dropped,
                                 num_valid=tally.count - len(dropped),
                                 skipped=arrays is None, merge_seconds=seconds,
                                 bytes_received=dict(tally.bytes_received))
        record.aggregate_seconds = seconds
        record.finish_seconds = ended - (tally.ended if tally.ended is not None else started)
        if self._sent is not None and self._sent[0] == server_round:
            _, record.num_sent, record.bytes_sent, sent_at = self._sent
            record.train_seconds_wall = (tally.ended if tally.ended is not None else started) - sent_at
        if metrics is not None:
            # the clients' metrics (weighted means), e.g. "train-loss" -> "client_train_loss"
            record.metrics.update({"client_" + key.replace("-", "_"): float(value) for key, value in metrics.items()
                                   if isinstance(value, (int, float))})
        self.rounds.append(record)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's evaluation instructions (its round number)."""
        return self.strategy.configure_evaluate(server_round + self._offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's aggregation of the evaluation replies (its round number)."""
        return self.strategy.aggregate_evaluate(server_round + self._offset, replies)

    def summary(self) -> None:
        """The wrapped strategy's summary, and where the run files go."""
        self.strategy.summary()
        if self.out_dir is not None:
            log(INFO, "\t├──> Round records: %s (history.json, accuracy.png)", self.out_dir)

    # ------------------------------------------------------------------ helpers

    def _log_progress(self, record: RoundRecord) -> None:
        total = self._total_rounds or record.round
        done = record.round - self.rounds[0].round + 1  # rounds aggregated by this process (a resumed run starts later)
        elapsed = time.perf_counter() - self._started
        eta = elapsed / max(done, 1) * max(total - record.round, 0)
        value, loss = record.metrics.get(self.metric), record.metrics.get("loss")
        shown = ("n/a" if value is None else f"{value:.4f}") + ("" if loss is None else f", loss {loss:.4f}")
        choice = "skipped: global model kept" if record.skipped else (record.merge_choice or "average")
        log(INFO, "[fedcca] round %d/%d: %s %s, merge %s (%.1fs), %d/%d replies | elapsed %s, ETA %s", record.round,
            total, self.metric, shown, choice, record.aggregate_seconds, record.num_valid, record.num_sent,
            clock(elapsed), clock(eta))


def plot_rounds(initial: Mapping[str, float] | None, rounds: list[Mapping[str, Any]], path: Path, title: str,
                metric: str = "accuracy") -> None:
    """Write ``metric`` of the global model per round (0 = initial) to ``path``; nothing without values.

    Args:
        initial: The initial model's evaluation (or None).
        rounds: Round records as JSON (``RoundRecord.to_json``).
        path: The PNG.
        title: The plot's title.
        metric: The key plotted (a fraction, shown in %).
    """
    points = [(0, initial[metric])] if initial and metric in initial else []
    points += [(entry["round"], entry[metric]) for entry in rounds if isinstance(entry.get(metric), (int, float))]
    if not points:
        return
    fig, axes = figure(5, 3.5)
    axes.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o")
    axes.set(xlabel="round", ylabel=f"test {metric} (%)", title=title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    save(fig, path, dpi=120)


def clock(seconds: float) -> str:
    """``m:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def _fresh_out_dir(out_dir: Path) -> Path:
    """Before round 1: ``out_dir`` if it holds no earlier run's history, else the first free ``out_dir-2``,
    ``out_dir-3``, ... (logged): a run never overwrites another. ValueError when a file is in the way."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"RecordRounds: out_dir {out_dir}: {folder} is a file, not a folder")
    candidate, index = out_dir, 1
    while (candidate / HISTORY_FILE).exists():
        index += 1
        candidate = out_dir.with_name(f"{out_dir.name}-{index}")
    if candidate != out_dir:
        log(WARNING, "[fedcca] %s holds an earlier run's history: writing this run's files to %s", out_dir, candidate)
    return candidate
