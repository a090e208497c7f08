"""What CCA Merge costs over FedAvg: statistics vs forward passes, aggregation time and memory, bytes.

For each model of ``--models`` (``name:width:K1,K2,...``), in one process, side by side:

* **statistics / forward passes**: the client's statistics (received and trained model over
  the calibration set) against the two forward passes they need, and the server's statistics
  of K models (in the strategy's groups of 8, one reference pass per group) against the K + 1
  forward passes; minimum over ``--repeats``.
* **aggregation**: K "trained" client models (the global model plus a few local SGD steps each,
  on different real images) and their statistics are packed once into Flower replies; every
  strategy of ``--strategies`` is configured for the round and its ``aggregate_train`` called on
  the same replies (minimum over ``--repeats``). Peak memory of one further call: resident-set
  growth above the level before the call, sampled every 2 ms (the replies themselves, Flower's
  buffers, are allocated before). BatchNorm re-estimation is timed apart (``bn_seconds``:
  one pass of the merged model over the calibration set per candidate), so that aggregation
  can be compared without it.
* **bytes** per client: weights vs statistics records.
* the client's own timings from one real ClientApp call (one local epoch, then statistics).

Strategies are run-config strategies (``fedavg``, ``cca``, ``cca:global:server``,
``cca+shrinkage='1'+repair=none`` for plain CCA Merge, ...)::

    python -m simulations.cost --models cnn:1:2,4,8,16,32,64,128,256 vgg11:0.5:2,4,8,16,32 \\
        resnet20:1:2,4,8,16,32 --out results/cost/cost.json
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import ctypes
import gc
import os
import platform
import pstats
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcca.app.federation import calibration_inputs
from fedcca.app.task import TaskConfig
from fedcca.data import Dataset, DeviceLoader, load_dataset
from fedcca.devices import resolve_device
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import (
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PREACTIVATION_FLAG,
    STATISTICS_KEY,
    WEIGHTS_KEY,
    read_train_instruction,
    statistics_to_record,
    train_instruction,
    train_reply,
)
from fedcca.flower.streaming import ReplyTally, stream_replies
from fedcca.merging.repair import preactivation_statistics
from fedcca.models import build_model
from fedcca.spec.tracing import spec_for
from fedcca.statistics import as_batches, collect_statistics
from fedcca.training import TrainingConfig, train
from server.server_app import build_strategy
from simulations import harness

MIB = 2**20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SERVER_GROUP = 8  # CCAMerge's default statistics_group


@dataclass(frozen=True)
class ModelSweep:
    """One architecture of the benchmark and the numbers of clients it is measured at."""

    name: str
    width: float
    clients: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> ModelSweep:
        """``name:width:K1,K2,...``, e.g. ``cnn:1:2,4,8``."""
        name, width, clients = text.split(":")
        return cls(name, float(width), tuple(harness.parse_list(clients, int)))

    @property
    def label(self) -> str:
        """e.g. ``vgg11x0.5``."""
        return f"{self.name}x{self.width:g}"

    def build(self, dataset: Dataset) -> nn.Module:
        """A fresh model for ``dataset``."""
        return build_model(self.name, dataset.num_classes, dataset.in_channels, self.width,
                           image_size=int(dataset.train_images.shape[-1]))


def _seconds(task: Any, repeats: int) -> float:
    """Minimum wall time of ``task()`` over ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        task()
        best = min(best, time.perf_counter() - started)
    return best


def _forward(models: Sequence[nn.Module], calibration: list[torch.Tensor], device: torch.device) -> None:
    with torch.no_grad():
        for model in models:
            model.to(device).eval()
            for batch in calibration:
                model(batch.to(device))


def statistics_vs_forward(models: Sequence[nn.Module], calibration: torch.Tensor, repeats: int,
                          device: torch.device) -> dict[str, float]:
    """Client (2 models) and server (K models) statistics time over the forward passes they need.

    Args:
        models: ``[global model, client 1, ..., client K]``.
        calibration: The calibration inputs.
        repeats: Timed repetitions (the minimum is kept).
        device: Where the models run.
    """
    batches = list(as_batches(calibration, 256))
    reference, clients = models[0], list(models[1:])
    client_forward = _seconds(lambda: _forward([reference, clients[0]], batches, device), repeats)
    client_stats = _seconds(lambda: collect_statistics(reference, [clients[0]], batches, reference_moments=False,
                                                       device=device), repeats)
    groups = [clients[i:i + SERVER_GROUP] for i in range(0, len(clients), SERVER_GROUP)]
    server_forward = _seconds(lambda: _forward([reference, *clients], batches, device), repeats)
    server_stats = _seconds(lambda: [collect_statistics(reference, group, batches, device=device)
                                     for group in groups], repeats)
    return {"client_forward_seconds": client_forward, "client_statistics_seconds": client_stats,
            "client_ratio": client_stats / client_forward, "server_models": len(clients),
            "server_forward_seconds": server_forward, "server_statistics_seconds": server_stats,
            "server_ratio": server_stats / server_forward}


@dataclass
class Replies:
    """One round's synthetic client replies, shared by every strategy.

    Args:
        global_model: The round's global model.
        clients: The K client models.
        weights: Per client, the reply content without statistics (weights + metrics).
        statistics: Per client, the statistics record (client model vs global model).
        with_preactivation: The same records with the client model's pre-activation moments.
    """

    global_model: nn.Module
    clients: list[nn.Module]
    weights: list[RecordDict]
    statistics: list[ArrayRecord]
    with_preactivation: list[ArrayRecord]


def make_replies(dataset: Dataset, sweep: ModelSweep, num_clients: int, calibration: torch.Tensor, *,
                 local_steps: int, seed: int) -> Replies:
    """Global model, K locally-updated copies and their statistics on the calibration set, as replies.

    Each client takes ``local_steps`` SGD steps (batch 32) from the global model on its own
    random training images, so the models differ as after a short round.
    """
    torch.manual_seed(seed)
    global_model = sweep.build(dataset)
    rng = np.random.default_rng(seed)
    clients, weights, statistics, with_preactivation = [], [], [], []
    spec = spec_for(global_model, calibration[:1])
    for client in range(num_clients):
        indices = np.sort(rng.choice(len(dataset.train_labels), size=32 * local_steps, replace=False))
        loader = DeviceLoader.from_dataset(dataset, indices, batch_size=32, device="cpu", seed=seed + client)
        model = copy.deepcopy(global_model)
        train(model, loader, TrainingConfig(epochs=1), device="cpu")
        stats = collect_statistics(global_model, [model], calibration, device="cpu")[0]
        content = train_reply(model.state_dict(), 100 + client, {"train-loss": 1.0}, stats)
        statistics.append(content.array_records[STATISTICS_KEY])
        with_preactivation.append(statistics_to_record(stats, preactivation_statistics(
            [model], calibration, spec, recompute_bn=False, device="cpu")[0]))
        del content[STATISTICS_KEY]
        weights.append(content)
        clients.append(model)
    return Replies(global_model, clients, weights, statistics, with_preactivation)


def build_strategies(specs: Sequence[harness.StrategySpec], model_fn: Any, num_clients: int,
                     **run_config: Any) -> dict[str, FedAvg]:
    """The strategies exactly as ``server.server_app.build_strategy`` builds them, all K clients per round."""
    strategies: dict[str, FedAvg] = {}
    for spec in specs:
        task = TaskConfig.from_run_config(harness.base_run_config(**run_config, min_nodes=num_clients, **spec.run_config()))
        strategies[spec.label] = build_strategy(task, model_fn, torch.device("cpu"))
    return strategies


class _ReplayClients:
    """The nodes of an :class:`InProcessGrid` answering every instruction with a fresh copy of the
    prepared reply (with statistics when the instruction asks for them), so that replies cost
    their real memory from the moment they are received: all at once with ``send_and_receive``,
    one per pull with a stream."""

    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self._contents: dict[tuple[bool, bool], list[RecordDict]] = {}

    def grid(self) -> InProcessGrid:
        return InProcessGrid({node: self._answer for node in range(1, len(self.replies.weights) + 1)})

    def _answer(self, message: Message, context: Context) -> Message:
        instruction = read_train_instruction(message)
        asked = (instruction.compute_statistics, instruction.send_preactivation)
        if asked not in self._contents:
            records = self.replies.with_preactivation if asked[1] else self.replies.statistics
            self._contents[asked] = [
                RecordDict({**dict(content), STATISTICS_KEY: stats}) if asked[0] else content
                for content, stats in zip(self.replies.weights, records, strict=True)]
        return Message(_fresh_copy(self._contents[asked][message.metadata.dst_node_id - 1]), reply_to=message)


def _fresh_copy(content: RecordDict) -> RecordDict:
    """``content`` with its own copy of every array's bytes (``copy.deepcopy`` shares immutable ``bytes``),
    as a reply received from the network holds."""
    copied = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            record = ArrayRecord({key: Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                                             data=bytes(bytearray(array.data))) for key, array in record.items()})
        else:
            record = copy.deepcopy(record)
        copied[name] = record
    return copied


def _instructions(strategy: FedAvg, replies: Replies, grid: InProcessGrid, server_round: int) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(replies.global_model.state_dict()), ConfigRecord(),
                                         grid))


class PeakRSS:
    """Context manager sampling the resident set size; ``peak_mib`` = peak growth above the start."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._start = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as file:
            return int(file.read().split()[1]) * PAGE_BYTES

    def _sample(self) -> None:
        peak = self._start
        while not self._stop.wait(self.interval):
            peak = max(peak, self._rss())
        self.peak_mib = (max(peak, self._rss()) - self._start) / MIB

    def __enter__(self) -> PeakRSS:
        self._start = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _BatchNormTimer:
    """Adds up the time spent re-estimating BatchNorm inside a merge (patched in for one measurement)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def profile_aggregation(strategy: FedAvg, replies: Replies, server_round: int = 2,
                        top: int = 15) -> list[dict[str, Any]]:
    """Where one ``aggregate_train`` spends its time: the ``top`` fedcca functions by cumulative time
    (rows as :func:`profile_call`)."""
    clients = _ReplayClients(replies)
    grid = clients.grid()
    received = grid.send_and_receive(_instructions(strategy, replies, grid, server_round))
    return profile_call(lambda: strategy.aggregate_train(server_round, received), top)


def profile_call(call: Callable[[], Any], top: int = 15) -> list[dict[str, Any]]:
    """Where one ``call()`` spends its time: the ``top`` fedcca functions by cumulative time.

    Each row: ``function`` (module path and name), ``calls``, ``seconds`` (cumulative, profiler
    overhead included), ``share`` of the whole call.
    """
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    call()
    profiler.disable()
    total = time.perf_counter() - started
    package = str(Path(__file__).resolve().parents[1] / "fedcca")
    rows = []
    for (filename, _, name), (_, calls, _, cumulative, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        if filename.startswith(package) and name != "aggregate_train":
            module = Path(filename).relative_to(Path(package).parent).with_suffix("").as_posix().replace("/", ".")
            rows.append({"function": f"{module}.{name}", "calls": calls, "seconds": cumulative,
                         "share": cumulative / total})
    return sorted(rows, key=lambda row: -row["seconds"])[:top]


def measure_aggregation(strategies: dict[str, FedAvg], replies: Replies, repeats: int,
                        server_round: int = 2) -> dict[str, dict[str, Any]]:
    """Time, BatchNorm time and memory of ``aggregate_train`` of every strategy on the same replies.

    Two ways of receiving the round's replies: all at once (``send_and_receive``: every reply
    held, then ``aggregate_train``) and streamed (:func:`fedcca.flower.streaming.stream_replies`:
    replies handed over as pulled). ``seconds``: all-at-once aggregation; ``stream_seconds``: the
    streamed aggregation's own time (waiting for pulls excluded); ``finish_seconds``: from the
    last streamed reply to the new model. Peak memory of each way counts the replies received.
    """
    clients = _ReplayClients(replies)
    seconds: dict[str, list[float]] = {label: [] for label in strategies}
    streamed: dict[str, list[float]] = {label: [] for label in strategies}
    finish: dict[str, list[float]] = {label: [] for label in strategies}
    for _ in range(repeats):  # interleaved: load from other processes hits every strategy alike
        for label, strategy in strategies.items():
            grid = clients.grid()
            received = grid.send_and_receive(_instructions(strategy, replies, grid, server_round))
            started = time.perf_counter()
            arrays, _ = strategy.aggregate_train(server_round, received)
            seconds[label].append(time.perf_counter() - started)
            del received
            if arrays is None:
                raise RuntimeError(f"{label}: aggregate_train produced no model for {len(replies.weights)} clients")
            grid = clients.grid()
            tally = ReplyTally(stream_replies(grid, _instructions(strategy, replies, grid, server_round)))
            started = time.perf_counter()
            strategy.aggregate_train(server_round, tally)
            ended = time.perf_counter()
            streamed[label].append(ended - started - tally.waited)
            finish[label].append(ended - (tally.ended or started))
    result = {}
    for label, strategy in strategies.items():
        _release_freed_memory()
        timer = _BatchNormTimer()
        grid = clients.grid()
        instructions = _instructions(strategy, replies, grid, server_round)
        with _patched_batchnorm(timer), PeakRSS() as rss:
            strategy.aggregate_train(server_round, grid.send_and_receive(instructions))
        _release_freed_memory()
        grid = clients.grid()
        instructions = _instructions(strategy, replies, grid, server_round)
        with PeakRSS() as stream_rss:
            strategy.aggregate_train(server_round, stream_replies(grid, instructions))
        result[label] = {"seconds": seconds[label], "min_seconds": min(seconds[label]),
                         "stream_seconds": min(streamed[label]), "finish_seconds": min(finish[label]),
                         "bn_seconds": timer.seconds, "rss_peak_growth_mib": rss.peak_mib,
                         "stream_rss_peak_growth_mib": stream_rss.peak_mib}
    return result


class _patched_batchnorm:  # pylint: disable=invalid-name
    """Wrap the merge's BatchNorm re-estimates (``recompute_batchnorm``, ``refit_batchnorm``) in ``timer``."""

    def __init__(self, timer: _BatchNormTimer) -> None:
        import fedcca.merging.merger  # pylint: disable=import-outside-toplevel

        self.targets = [(fedcca.merging.merger, name) for name in ("recompute_batchnorm", "refit_batchnorm")]
        self.saved = [getattr(module, name) for module, name in self.targets]
        self.timer = timer

    def __enter__(self) -> None:
        for (module, name), function in zip(self.targets, self.saved):
            setattr(module, name, self.timer.wrap(function))

    def __exit__(self, *exc: object) -> None:
        for (module, name), function in zip(self.targets, self.saved):
            setattr(module, name, function)


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS growth counts what the next call needs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS growth is then an upper bound
        pass


def client_costs(sweep: ModelSweep, client_examples: int, data_config: dict[str, Any]) -> dict[str, Any]:
    """One real ClientApp training round with statistics and pre-activation moments (what the default
    search asks for): its own timings and its reply's bytes."""
    run_config = harness.base_run_config(**data_config, partitioning="iid", local_epochs=1,
                                 max_examples_per_client=client_examples, model=sweep.name, width=sweep.width,
                                 out_dir="outputs/unused")
    grid = InProcessGrid.of_app(harness.project_client_app(), run_config, 4)
    task = TaskConfig.from_run_config(run_config)
    calibration_inputs(task)  # load once, outside the timed call
    torch.manual_seed(0)
    model = sweep.build(load_dataset(task.dataset, task.data_dir or None))
    instruction = Message(train_instruction(ArrayRecord(model.state_dict()), 2, True, **{PREACTIVATION_FLAG: True}),
                          dst_node_id=1,
                          message_type=MessageType.TRAIN)
    reply = grid.send_and_receive([instruction])[0]
    if reply.has_error():
        raise RuntimeError(f"ClientApp failed: {reply.error.reason}")
    metrics = reply.content[METRICS_KEY]
    return {"num_examples": int(metrics[NUM_EXAMPLES_KEY]), "train_seconds": float(metrics["train-seconds"]),
            "stats_seconds": float(metrics["stats-seconds"]),
            "weights_bytes": reply.content[WEIGHTS_KEY].count_bytes(),
            "statistics_bytes": reply.content[STATISTICS_KEY].count_bytes()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["cnn:1:2,8,32"], help="name:width:K1,K2,...")
    parser.add_argument("--strategies", default="fedavg,cca+shrinkage='1'+repair=none,cca,cca:global:server",
                        help="fedavg (the baseline, required) and run-config strategies")
    parser.add_argument("--max-server-stats-clients", type=int, default=64,
                        help="measure server-statistics strategies only up to this K")
    parser.add_argument("--calibration-size", type=int, default=500)
    parser.add_argument("--holdout-size", type=int, default=500)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--client-examples", type=int, default=500, help="client shard for the client timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--round", type=int, default=2,
                        help="the round configured: 2 (default) is the steady state (the global model as reference, "
                             "client statistics); 1 aligns to the largest reply with server-side statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also profile one aggregate_train per strategy and K (fedcca functions by cumulative time)")
    harness.add_runtime_arguments(parser, Path("results/cost/cost.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the cost measurements described by the command line; write JSON, PNG and markdown."""
    args = _parser().parse_args(argv)
    blas_threads = harness.apply_runtime(args)
    specs = harness.parse_strategies(args.strategies)
    labels = [spec.label for spec in specs]
    if harness.BASELINE not in labels:
        raise ValueError(f"--strategies must include {harness.BASELINE!r} (the baseline of the ratios)")
    sweeps = [ModelSweep.parse(text) for text in args.models]
    dataset = load_dataset("fashion-mnist", args.data_dir or None)
    data_config = {"calibration_size": args.calibration_size, "holdout_size": args.holdout_size,
                   "seed": args.seed, "data_dir": args.data_dir}
    calibration = calibration_inputs(TaskConfig.from_run_config(harness.base_run_config(**data_config)))
    device = resolve_device(None)
    payload: dict[str, Any] = {
        "command": "python -m simulations.cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "strategies": labels, "platform": platform.platform(), "device": str(device),
                   "openblas_threads": blas_threads, "torch_threads": torch.get_num_threads(),
                   "time": "min over repeats of aggregate_train wall time",
                   "memory": "peak RSS above the level before the call (after gc and malloc_trim), 2 ms samples"},
        "models": []}
    for sweep in sweeps:
        entry: dict[str, Any] = {"model": sweep.label, "aggregation": []}
        payload["models"].append(entry)
        model_fn = partial(sweep.build, dataset)
        for num_clients in sweep.clients:
            replies = make_replies(dataset, sweep, num_clients, calibration, local_steps=args.local_steps,
                                   seed=args.seed)
            if "statistics" not in entry:  # once per model, at its smallest K (8 models at most)
                few = [replies.global_model, *replies.clients[:SERVER_GROUP]]
                entry["statistics"] = statistics_vs_forward(few, calibration, args.repeats, device)
                entry["bytes_per_client"] = {"weights": replies.weights[0][WEIGHTS_KEY].count_bytes(),
                                             "statistics": replies.statistics[0].count_bytes(),
                                             "with_preactivation": replies.with_preactivation[0].count_bytes()}
            strategies = build_strategies(specs, model_fn, num_clients, **data_config, model=sweep.name,
                                          width=sweep.width)
            if num_clients > args.max_server_stats_clients:
                strategies = {label: s for label, s in strategies.items() if ":server" not in label}
            measured = measure_aggregation(strategies, replies, args.repeats, args.round)
            if args.profile:
                for label, strategy in strategies.items():
                    if label != harness.BASELINE:
                        measured[label]["profile"] = profile_aggregation(strategy, replies, args.round)
            base = measured[harness.BASELINE]["min_seconds"]
            entry["aggregation"].append({"num_clients": num_clients, "strategies": measured,
                                         "ratio_to_fedavg": {label: m["min_seconds"] / base for label, m in
                                                             measured.items() if label != harness.BASELINE}})
            print(f"[{sweep.label}] K={num_clients}: " + ", ".join(
                f"{label} {m['min_seconds']:.3f}s ({m['rss_peak_growth_mib']:.0f} MiB)"
                for label, m in measured.items()), flush=True)
            del replies
            harness.write_json(args.out, payload)
        entry["client"] = client_costs(sweep, args.client_examples, data_config)
        harness.write_json(args.out, payload)
    _report(payload, labels, args.out)
    return payload


def _report(payload: dict[str, Any], labels: Sequence[str], out: Path) -> None:
    """Markdown tables and one PNG (aggregation seconds and peak memory vs K per model)."""
    text = ["### Statistics vs the forward passes they need; bytes per client\n",
            harness.markdown_table(["model", "client stats / 2 forwards", "server stats / (K+1) forwards (K=8)",
                            "weights KiB", "statistics KiB", "+ pre-activation KiB", "statistics / weights",
                            "client train s",
                            "client stats s"],
                           [[e["model"], f"{e['statistics']['client_ratio']:.2f}", f"{e['statistics']['server_ratio']:.2f}",
                             f"{e['bytes_per_client']['weights'] / 1024:.0f}",
                             f"{e['bytes_per_client']['statistics'] / 1024:.0f}",
                             f"{e['bytes_per_client'].get('with_preactivation', 0) / 1024:.0f}",
                             f"{e['bytes_per_client']['statistics'] / e['bytes_per_client']['weights']:.2f}",
                             f"{e['client']['train_seconds']:.2f}", f"{e['client']['stats_seconds']:.2f}"]
                            for e in payload["models"]])]
    series = []
    round_ = payload["config"].get("round", 1)
    for entry in payload["models"]:
        rows = entry["aggregation"]
        text.append(f"\n### {entry['model']}, round {round_}: aggregate_train seconds with all replies at once "
                    f"(BatchNorm re-estimate), ratio to FedAvg; streamed: own seconds / last reply to model\n")
        body = []
        for row in rows:
            cells = [row["num_clients"]]
            for label in labels:
                m = row["strategies"].get(label)
                cells.append("-" if m is None else f"{m['min_seconds']:.3g} ({m['bn_seconds']:.2g})")
            cells += [f"{row['ratio_to_fedavg'][label]:.1f}x" if label in row["ratio_to_fedavg"] else "-"
                      for label in labels if label != harness.BASELINE]
            cells += ["-" if label not in row["strategies"] else
                      f"{row['strategies'][label].get('stream_seconds', float('nan')):.3g} / "
                      f"{row['strategies'][label].get('finish_seconds', float('nan')):.3g}" for label in labels]
            body.append(cells)
        text.append(harness.markdown_table(["K", *(f"{label} s" for label in labels),
                                    *(f"{label}/fedavg" for label in labels if label != harness.BASELINE),
                                    *(f"{label} streamed s" for label in labels)], body))
        text.append(f"\n### {entry['model']}, round {round_}: peak memory growth (MiB) counting the replies received, "
                    "all at once / streamed\n")
        text.append(harness.markdown_table(["K", *labels], [
            [row["num_clients"], *("-" if label not in row["strategies"] else
                                   f"{row['strategies'][label]['rss_peak_growth_mib']:.0f} / "
                                   f"{row['strategies'][label].get('stream_rss_peak_growth_mib', float('nan')):.0f}"
                                   for label in labels)] for row in rows]))
        for row in rows:
            for label, m in row["strategies"].items():
                if m.get("profile"):
                    text.append(f"\n### {entry['model']}, K = {row['num_clients']}: where {label}'s aggregate_train "
                                "spends its time (fedcca functions, cumulative, under the profiler)\n")
                    text.append(harness.markdown_table(["function", "calls", "seconds", "share"], [
                        [p["function"], p["calls"], f"{p['seconds']:.3g}", f"{p['share']:.0%}"] for p in m["profile"]]))
        for label in labels:
            shown = [row for row in rows if label in row["strategies"]]
            series.append(harness.Series(f"{entry['model']} {label}", [row["num_clients"] for row in shown],
                                 [row["strategies"][label]["min_seconds"] for row in shown]))
    harness.line_plot(out.with_suffix(".png"), series, title="server aggregate_train time", xlabel="clients K",
              ylabel="seconds", log2_x=True)
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    main()
