"""What CCA Merge costs over FedAvg: server aggregation time and memory, client time, bytes sent.

Server: K "trained-ish" client models (the round's global model plus a few local SGD steps
each, on different real images) and their statistics against the global model are packed
once into Flower reply Messages. Every strategy is then configured for the round and its
``aggregate_train`` is called on the same replies, side by side in one process:
``fedavg`` (Flower's FedAvg), ``cca`` (CCAMerge, client statistics, reference = global
model), ``cca:global:server`` (statistics computed by the server on its calibration data)
and ``permute``. FedAvg and the server-statistics variant get the identical Message objects
(weights + metrics); the client-statistics variants get the same plus the statistics
record, which FedAvg would reject. Swept over the number of clients (cnn width 1) and over
the width (fixed K).

Time: the minimum over ``--repeats`` calls of ``time.perf_counter`` around aggregate_train.
Memory, in one further call: peak resident-set growth above the level before the call,
sampled every 2 ms from /proc/self/statm (it counts torch's allocations), and the
``tracemalloc`` peak (Python and numpy allocations only, torch tensors are invisible to it).

Client: one real ClientApp call (``clients/client_app.py``) per width, one local epoch on
its shard, reporting its own ``train-seconds`` and ``stats-seconds``, and the bytes of the
weights and statistics records of its reply::

    OPENBLAS_NUM_THREADS=1 python -m simulations.cost --clients 2,4,8,16,32,64 --widths 1,2,4 --width-clients 8 \
        --out results/cost/cost.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcca.data import Dataset, DeviceLoader, load_dataset
from fedcca.federation import calibration_inputs
from fedcca.local_grid import InProcessGrid
from fedcca.models import build_model
from fedcca.protocol import (
    COMPUTE_STATS_FLAG,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    STATISTICS_KEY,
    WEIGHTS_KEY,
    train_instruction,
    train_reply,
)
from fedcca.statistics import collect_statistics
from fedcca.strategy import CCAMerge
from fedcca.task import TaskConfig
from fedcca.training import TrainingConfig, train
from server.server_app import build_strategy
from simulations.harness import (
    BASELINE,
    StrategySpec,
    add_runtime_arguments,
    apply_runtime,
    base_run_config,
    project_client_app,
    markdown_table,
    parse_list,
    parse_strategies,
    write_json,
)

MIB = 2**20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Replies:
    """One round's synthetic client replies, shared by every strategy.

    Args:
        global_arrays: The round's global model.
        weights: Per client, the reply content without statistics (weights + metrics).
        statistics: Per client, the statistics record (client model vs global model).
    """

    global_arrays: ArrayRecord
    weights: list[RecordDict]
    statistics: list[ArrayRecord]


def make_replies(dataset: Dataset, num_clients: int, width: int, *, local_steps: int,
                 stats_examples: int, seed: int) -> Replies:
    """Global model, K locally-updated copies and their statistics, as reply contents.

    Each client takes ``local_steps`` SGD steps (batch 32) from the global model on its own
    random training images, so the models differ as after a short round. Statistics are
    computed on the first ``stats_examples`` calibration-like training images: their cost
    is the clients', and the server's use of them does not depend on that count.

    Args:
        dataset: Supplies images and labels.
        num_clients: K.
        width: cnn width multiplier.
        local_steps: SGD steps per client.
        stats_examples: Images the client statistics are computed on.
        seed: Seeds the global model and the image draws.
    """
    torch.manual_seed(seed)
    global_model = build_model("cnn", dataset.num_classes, dataset.in_channels, width)
    rng = np.random.default_rng(seed)
    batch = 32
    probe = DeviceLoader.from_dataset(dataset, np.arange(stats_examples), batch_size=stats_examples,
                                      train=False, device="cpu")
    probe_inputs = next(iter(probe))[0]
    weights, statistics = [], []
    for client in range(num_clients):
        indices = np.sort(rng.choice(len(dataset.train_labels), size=batch * local_steps, replace=False))
        loader = DeviceLoader.from_dataset(dataset, indices, batch_size=batch, device="cpu", seed=seed + client)
        model = copy.deepcopy(global_model)
        train(model, loader, TrainingConfig(epochs=1), device="cpu")
        stats = collect_statistics(global_model, [model], probe_inputs, device="cpu")[0]
        content = train_reply(model.state_dict(), 100 + client, {"train-loss": 1.0}, stats)
        statistics.append(content.array_records[STATISTICS_KEY])
        del content[STATISTICS_KEY]
        weights.append(content)
    return Replies(ArrayRecord(global_model.state_dict()), weights, statistics)


def build_strategies(specs: Sequence[StrategySpec], model_fn: Callable[[], nn.Module],
                     calibration: torch.Tensor, num_clients: int, **run_config: Any) -> dict[str, FedAvg]:
    """The strategies exactly as ``server.server_app.build_strategy`` builds them, all K clients per round.

    Args:
        specs: Which strategies (their run-config overrides apply, e.g. ``merge-guard``).
        model_fn: Builds the federated architecture.
        calibration: Server-side calibration inputs (``calibration_inputs`` of the same run config).
        num_clients: K (``min-nodes``: min_train_nodes and min_available_nodes).
        **run_config: Further run-config values (``_`` for ``-``), e.g. ``calibration_size``.
    """
    strategies: dict[str, FedAvg] = {}
    for spec in specs:
        task = TaskConfig.from_run_config(base_run_config(**run_config, min_nodes=num_clients, **spec.run_config()))
        strategies[spec.label] = build_strategy(task, model_fn, torch.device("cpu"))
    return strategies


def reply_messages(strategy: FedAvg, replies: Replies, grid: InProcessGrid,
                   cache: dict[bool, list[RecordDict]]) -> list[Message]:
    """Configure round 1 on ``strategy`` and answer each instruction with the shared content.

    Args:
        strategy: The strategy (its configure_train state is needed by CCAMerge).
        replies: The shared reply contents.
        grid: Supplies the node ids.
        cache: Content lists per "with statistics" flag, built once so that strategies
            share the very same RecordDict objects.
    """
    instructions = list(strategy.configure_train(1, replies.global_arrays, ConfigRecord(), grid))
    with_stats = bool(instructions[0].content[CONFIG_KEY].get(COMPUTE_STATS_FLAG, False))
    if with_stats not in cache:
        cache[with_stats] = [
            RecordDict({**dict(content), STATISTICS_KEY: stats}) if with_stats else content
            for content, stats in zip(replies.weights, replies.statistics, strict=True)]
    return [Message(cache[with_stats][msg.metadata.dst_node_id - 1], reply_to=msg) for msg in instructions]


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


def measure_aggregation(strategies: dict[str, FedAvg], replies: Replies, num_clients: int,
                        repeats: int) -> dict[str, dict[str, Any]]:
    """Time and memory of ``aggregate_train`` of every strategy on the same replies.

    Args:
        strategies: Label -> strategy.
        replies: The shared replies.
        num_clients: K.
        repeats: Timed calls per strategy (the minimum is reported), interleaved across
            strategies so that load from other processes hits all of them alike.
    """
    grid = InProcessGrid({node: project_client_app() for node in range(1, num_clients + 1)})
    cache: dict[bool, list[RecordDict]] = {}
    messages = {label: reply_messages(strategy, replies, grid, cache) for label, strategy in strategies.items()}
    seconds: dict[str, list[float]] = {label: [] for label in strategies}
    for _ in range(repeats):
        for label, strategy in strategies.items():
            started = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, messages[label])
            seconds[label].append(time.perf_counter() - started)
            if arrays is None:
                raise RuntimeError(f"{label}: aggregate_train produced no model for {num_clients} clients")
    result = {}
    for label, strategy in strategies.items():
        _release_freed_memory()
        tracemalloc.start()
        with PeakRSS() as rss:
            strategy.aggregate_train(1, messages[label])
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result[label] = {"seconds": seconds[label], "min_seconds": min(seconds[label]),
                         "rss_peak_growth_mib": rss.peak_mib, "tracemalloc_peak_mib": traced_peak / MIB}
    return result


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS, so RSS growth counts what the next call needs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS growth is then a lower bound
        pass


def client_costs(width: int, client_examples: int, calibration_size: int, holdout_size: int, seed: int,
                 data_dir: str = "") -> dict[str, Any]:
    """One real ClientApp training round with statistics: its own timings and its reply's bytes.

    Args:
        width: cnn width.
        client_examples: Training examples of the client (one epoch).
        calibration_size: Calibration images the statistics are computed on.
        seed: Run seed.
        data_dir: Dataset folder ("" = default).
    """
    run_config = base_run_config(partitioning="iid", local_epochs=1, max_examples_per_client=client_examples,
                                 calibration_size=calibration_size, holdout_size=holdout_size, width=width,
                                 seed=seed, model="cnn",
                                 data_dir=data_dir, out_dir="outputs/unused")
    grid = InProcessGrid.of_app(project_client_app(), run_config, 4)
    torch.manual_seed(seed)
    model = build_model("cnn", width=width)
    instruction = Message(train_instruction(ArrayRecord(model.state_dict()), 1, True), dst_node_id=1,
                          message_type=MessageType.TRAIN)
    calibration_inputs(TaskConfig.from_run_config(run_config))  # load once, outside the timed call
    reply = grid.send_and_receive([instruction])[0]
    if reply.has_error():
        raise RuntimeError(f"ClientApp failed: {reply.error.reason}")
    metrics = reply.content[METRICS_KEY]
    train_seconds, stats_seconds = float(metrics["train-seconds"]), float(metrics["stats-seconds"])
    return {
        "width": width, "num_examples": int(metrics[NUM_EXAMPLES_KEY]), "calibration_size": calibration_size,
        "train_seconds": train_seconds, "stats_seconds": stats_seconds,
        "stats_to_train": stats_seconds / train_seconds,
        "weights_bytes": reply.content[WEIGHTS_KEY].count_bytes(),
        "statistics_bytes": reply.content[STATISTICS_KEY].count_bytes(),
    }


def _server_statistics(strategy: FedAvg) -> bool:
    """Whether ``strategy`` computes alignment statistics itself (forwards every model)."""
    return (isinstance(strategy, CCAMerge) and any(c.needs_statistics for c in strategy.search.candidates())
            and not strategy.requests_client_statistics)


def _ratios(strategies: dict[str, dict[str, Any]]) -> dict[str, float]:
    base = strategies[BASELINE]["min_seconds"]
    return {label: entry["min_seconds"] / base for label, entry in strategies.items() if label != BASELINE}


def aggregation_table(rows: list[dict[str, Any]], labels: Sequence[str]) -> str:
    """Markdown: seconds per strategy and ratio to FedAvg, one row per (K, width)."""
    others = [label for label in labels if label != BASELINE]
    headers = ["K", "width", *[f"{label} s" for label in labels], *[f"{label}/fedavg" for label in others],
               *[f"{label} MiB RSS+/traced" for label in labels]]
    def pick(row: dict[str, Any], label: str, show: Callable[[dict[str, Any]], str]) -> str:
        return show(row["strategies"][label]) if label in row["strategies"] else "-"

    body = [[row["num_clients"], row["width"],
             *[pick(row, label, lambda e: f"{e['min_seconds']:.4g}") for label in labels],
             *[f"{row['ratio_to_fedavg'][label]:.0f}x" if label in row["ratio_to_fedavg"] else "-"
               for label in others],
             *[pick(row, label, lambda e: f"{e['rss_peak_growth_mib']:.1f} / {e['tracemalloc_peak_mib']:.1f}")
               for label in labels]] for row in rows]
    return markdown_table(headers, body)


def client_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: client training vs statistics time and bytes per width."""
    headers = ["width", "examples", "train s", "stats s", "stats/train", "weights KiB", "statistics KiB",
               "statistics/weights"]
    body = [[row["width"], row["num_examples"], row["train_seconds"], row["stats_seconds"],
             row["stats_to_train"], row["weights_bytes"] / 1024, row["statistics_bytes"] / 1024,
             row["statistics_bytes"] / row["weights_bytes"]] for row in rows]
    return markdown_table(headers, body)


def plot_costs(path: Path, payload: dict[str, Any], labels: Sequence[str]) -> None:
    """Three panels: aggregation time vs K, vs width, and client seconds and bytes per width."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, sweep, key, xlabel in ((axes[0], "clients", "num_clients", "clients K (cnn width 1)"),
                                   (axes[1], "width", "width", f"cnn width (K={payload['config']['width_clients']})")):
        rows = [row for row in payload["aggregation"] if row["sweep"] == sweep]
        for label in labels:
            shown = [row for row in rows if label in row["strategies"]]
            ax.plot([row[key] for row in shown], [row["strategies"][label]["min_seconds"] for row in shown],
                    marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="aggregate_train seconds",
               title="server aggregation time")
        ax.set_xticks([row[key] for row in rows], [str(row[key]) for row in rows])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured values
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    client = payload["client"]
    positions = np.arange(len(client))
    axes[2].bar(positions - 0.2, [row["train_seconds"] for row in client], 0.4, label="local training (1 epoch)")
    axes[2].bar(positions + 0.2, [row["stats_seconds"] for row in client], 0.4, label="statistics")
    axes[2].set_xticks(positions, [f"width {row['width']}\n{row['weights_bytes'] / MIB:.2f} MiB weights\n"
                                   f"{row['statistics_bytes'] / MIB:.2f} MiB stats" for row in client])
    axes[2].set(ylabel="client seconds", title="client: training vs statistics")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--clients", default="2,4,8,16,32,64", help="K values of the client sweep (width 1)")
    parser.add_argument("--widths", default="1,2,4", help="cnn widths of the width sweep")
    parser.add_argument("--width-clients", type=int, default=8, help="K of the width sweep")
    parser.add_argument("--strategies", default="fedavg,cca,cca:global:server,permute",
                        help="fedavg (required, the baseline) and METHOD[:REFERENCE[:STATS]]")
    parser.add_argument("--max-server-stats-clients", type=int, default=8,
                        help="measure server-statistics strategies only up to this K (they forward "
                             "every model over the calibration set: minutes at K=64 on 2 cores)")
    parser.add_argument("--calibration-size", type=int, default=500, help="server and client calibration")
    parser.add_argument("--holdout-size", type=int, default=500, help="held-out examples CCAMerge chooses its merge on")
    parser.add_argument("--stats-examples", type=int, default=100,
                        help="images the synthetic replies' statistics are computed on")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--client-examples", type=int, default=500, help="client shard for the client timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser, Path("results/cost/cost.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the cost measurements described by the command line; write JSON and PNG; return the JSON."""
    args = _parser().parse_args(argv)
    blas_threads = apply_runtime(args)
    specs = parse_strategies(args.strategies)
    labels = [spec.label for spec in specs]
    if BASELINE not in labels:
        raise ValueError(f"--strategies must include {BASELINE!r} (the baseline of the ratios)")
    dataset = load_dataset("fashion-mnist", args.data_dir or None)
    data_config = {"calibration_size": args.calibration_size, "holdout_size": args.holdout_size, "seed": args.seed,
                   "data_dir": args.data_dir, "model": "cnn"}
    calibration = calibration_inputs(TaskConfig.from_run_config(base_run_config(**data_config)))
    sweeps = [("clients", k, 1) for k in parse_list(args.clients, int)]
    sweeps += [("width", args.width_clients, w) for w in parse_list(args.widths, int)]
    payload: dict[str, Any] = {
        "command": "python -m simulations.cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
                   "strategies": labels, "platform": platform.platform(), "device": "cpu",
                   "openblas_threads": blas_threads,
                   "time": "min over repeats of aggregate_train wall time",
                   "memory": "rss_peak_growth_mib: peak RSS above the level before the call (after gc and "
                             "malloc_trim), sampled every 2 ms from /proc/self/statm; tracemalloc_peak_mib: Python/numpy "
                             "allocations only"},
        "aggregation": [], "client": [],
    }
    for sweep, num_clients, width in sweeps:
        replies = make_replies(dataset, num_clients, width, local_steps=args.local_steps,
                               stats_examples=args.stats_examples, seed=args.seed)
        model_fn = partial(build_model, "cnn", dataset.num_classes, dataset.in_channels, width)
        strategies = build_strategies(specs, model_fn, calibration, num_clients, **data_config)
        if num_clients > args.max_server_stats_clients:
            strategies = {label: strategy for label, strategy in strategies.items()
                          if not _server_statistics(strategy)}
        measured = measure_aggregation(strategies, replies, num_clients, args.repeats)
        row = {"sweep": sweep, "num_clients": num_clients, "width": width, "strategies": measured,
               "ratio_to_fedavg": _ratios(measured),
               "bytes_per_client": {"weights": replies.weights[0][WEIGHTS_KEY].count_bytes(),
                                    "statistics": replies.statistics[0].count_bytes()}}
        payload["aggregation"].append(row)
        print(f"[{sweep}] K={num_clients} width={width}: " + ", ".join(
            f"{label} {entry['min_seconds']:.3f}s" for label, entry in measured.items()), flush=True)
    for width in parse_list(args.widths, int):
        payload["client"].append(client_costs(width, args.client_examples, args.calibration_size,
                                              args.holdout_size, args.seed, args.data_dir))
    payload["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    plot = args.out.with_suffix(".png")
    plot_costs(plot, payload, labels)
    payload["plot"] = plot.name
    write_json(args.out, payload)
    print("\n### Server aggregation (min seconds over repeats; ratio to FedAvg; peak RSS growth)\n")
    print(aggregation_table(payload["aggregation"], labels))
    print(f"\n### Client: one local epoch vs statistics ({args.calibration_size} calibration images), bytes sent\n")
    print(client_table(payload["client"]))
    return payload


if __name__ == "__main__":
    main()
