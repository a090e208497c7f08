"""fedcca ServerApp: federated training with CCA Merge (or FedAvg) and server-side evaluation.

Each round the strategy (``strategy`` in the run config: cca | permute | weight-matching ->
``CCAMerge(method=...)``, fedavg -> Flower's ``FedAvg``) trains on the clients and merges
their models; the global model is then evaluated on the test split. Under ``out-dir`` the
app keeps ``history.json`` (one entry per round), ``checkpoints/round-NNN.pt`` (the global
model after each round) and ``accuracy.png``; with ``resume = true`` it continues from the
last round recorded there. Every round's randomness is seeded from ``(seed, round)``, so a
resumed run computes what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from functools import partial
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from clients.task import (
    TaskConfig,
    calibration_inputs,
    calibration_labels,
    derive_seed,
    load_data,
    make_model,
    seed_everything,
    evaluation_loader,
)
from fedcca.data import DeviceLoader
from fedcca.devices import resolve_device
from fedcca.protocol import record_bytes
from fedcca.strategy import CCAMerge
from fedcca.training import evaluate

HISTORY_FILE = "history.json"
PLOT_FILE = "accuracy.png"
CHECKPOINT_DIR = "checkpoints"
# Keys that may change between a run and its resumption without changing the results.
RESUMABLE_KEYS = frozenset({"num-server-rounds", "resume", "round-timeout", "out-dir"})
# Client metric -> history key (weighted means over the round's replies); "stats_seconds"
# in the history is the server's own statistics time.
CLIENT_METRICS = {"train-loss": "train_loss", "train-seconds": "client_train_seconds",
                  "stats-seconds": "client_stats_seconds"}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by ``context.run_config`` on ``grid``.

    Args:
        grid: Connection to the SuperNodes (simulated or deployed).
        context: Supplies the run config (``[tool.flwr.app.config]`` plus overrides).
    """
    run_federation(grid, dict(context.run_config))


def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Train for the configured rounds, writing history, checkpoints and plot; return the history.

    Args:
        grid: Connection to the SuperNodes.
        run_config: The run config (keys as in ``[tool.flwr.app.config]``).
    """
    task = TaskConfig.from_run_config(run_config)
    outputs = RunDirectory(task.output_dir(run_config))
    device = resolve_device(None)
    dataset = load_data(task.dataset, task.data_dir)
    model_fn = partial(make_model, task, dataset)
    evaluator = _Evaluator(model_fn, evaluation_loader(task, device), device)

    resumed = outputs.load(run_config) if task.resume else None
    if resumed is None:
        seed_everything(derive_seed(task.seed))  # the initial model depends on the seed only
        arrays = ArrayRecord(model_fn().state_dict())
        history = {"run_config": dict(run_config), "initial": evaluator(arrays), "rounds": []}
        log(INFO, "[fedcca] initial model: accuracy %.4f, loss %.4f",
            history["initial"]["accuracy"], history["initial"]["loss"])
    else:
        arrays, history = resumed
        log(INFO, "[fedcca] resuming after round %d from %s", len(history["rounds"]), outputs.path)

    strategy = build_strategy(task, model_fn, calibration_inputs(task) if task.merge_method else None, device)
    strategy.summary()
    for server_round in range(len(history["rounds"]) + 1, task.num_server_rounds + 1):
        arrays, entry = run_round(strategy, grid, server_round, arrays, task)
        entry.update(evaluator(arrays))
        history["rounds"].append(entry)
        outputs.save(server_round, arrays, history)
        log(INFO, "[fedcca] round %d/%d: accuracy %.4f, loss %.4f, merge %.2fs, %d/%d replies%s",
            server_round, task.num_server_rounds, entry["accuracy"], entry["loss"],
            entry["merge_seconds"], entry["num_replies"], entry["num_sent"],
            " (skipped: global model kept)" if entry["skipped"] else "")
    outputs.plot(history, task.strategy)
    log(INFO, "[fedcca] results in %s", outputs.path)
    return history


def build_strategy(
    task: TaskConfig,
    model_fn: Callable[[], nn.Module],
    calibration: torch.Tensor | None,
    device: torch.device | None = None,
) -> FedAvg:
    """The strategy named by ``task.strategy``; only the averaging step differs.

    Args:
        task: The run config.
        model_fn: Builds a fresh model of the federated architecture.
        calibration: Public calibration inputs (needed by CCAMerge, unused by FedAvg).
        device: Where CCAMerge computes statistics and merges (None: CUDA if present).
    """
    # Evaluation is server-side (the test split), so no evaluate round on the clients.
    common: dict[str, Any] = {"fraction_train": task.fraction_train, "fraction_evaluate": 0.0,
                              "min_train_nodes": task.min_nodes, "min_available_nodes": task.min_nodes}
    if task.merge_method is None:
        return FedAvg(**common)
    if calibration is None:
        raise ValueError(f"strategy {task.strategy!r} needs calibration inputs")
    labels = calibration_labels(task) if task.merge_guard else None
    return CCAMerge(model_fn, calibration, method=task.merge_method, reference=task.reference,
                    stats=task.stats, ridge=task.ridge_or_default, ridge_mode=task.ridge_mode,
                    repair=task.repair, zero_dead=task.zero_dead,
                    balance=task.balance, device=device,
                    calibration_labels=labels, **common)


def run_round(
    strategy: FedAvg, grid: Grid, server_round: int, arrays: ArrayRecord, task: TaskConfig
) -> tuple[ArrayRecord, dict[str, Any]]:
    """One round of federated training; returns the new global model and the round's record.

    Replies are aggregated in node-id order, so the result does not depend on arrival order.
    When the strategy produces no model (too few valid replies) the old one is kept.

    Args:
        strategy: FedAvg or CCAMerge.
        grid: Connection to the SuperNodes.
        server_round: The round number (1-based).
        arrays: The current global model.
        task: The run config (seed, timeout).
    """
    seed_everything(derive_seed(task.seed, server_round))  # node sampling and server-side draws
    started = time.perf_counter()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = sorted(grid.send_and_receive(messages, timeout=task.round_timeout),
                     key=lambda reply: reply.metadata.src_node_id)
    aggregate_started = time.perf_counter()
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    entry: dict[str, Any] = {
        "round": server_round,
        "num_sent": len(messages),
        "num_replies": len(replies),
        "skipped": new_arrays is None,
        "merge_seconds": time.perf_counter() - aggregate_started,
        "stats_seconds": 0.0,  # server-side statistics: FedAvg computes none
        "bytes_sent": sum(record_bytes(message) for message in messages),
        "bytes_received": {str(reply.metadata.src_node_id): record_bytes(reply) for reply in replies},
        "train_seconds_wall": aggregate_started - started,
    }
    entry.update(_client_metrics(metrics))
    if isinstance(strategy, CCAMerge) and strategy.round_log and strategy.round_log[-1]["round"] == server_round:
        entry.update(_jsonable(strategy.round_log[-1]))  # its own merge/statistics timings, drops
    return (arrays if new_arrays is None else new_arrays), entry


def _client_metrics(metrics: MetricRecord | None) -> dict[str, float]:
    if metrics is None:
        return {}
    return {name: float(metrics[key]) for key, name in CLIENT_METRICS.items()  # type: ignore[arg-type]
            if key in metrics}


def _jsonable(value: Any) -> Any:
    """``value`` with dict keys made strings (node ids are ints) and tuples made lists."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


class _Evaluator:
    """Evaluates an ``ArrayRecord`` of the federated architecture on the test loader."""

    def __init__(self, model_fn: Callable[[], nn.Module], loader: DeviceLoader, device: torch.device) -> None:
        self.model = model_fn()
        self.loader = loader
        self.device = device

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        started = time.perf_counter()
        self.model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(self.model, self.loader, device=self.device)
        return {"accuracy": accuracy, "loss": loss, "eval_seconds": time.perf_counter() - started}


class RunDirectory:
    """The files of one run under ``out-dir``: history, per-round checkpoints and the plot.

    Every file is written to a temporary name and moved into place with ``os.replace``,
    so a run killed mid-write leaves the previous version intact.

    Args:
        path: The output folder (created on first save).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def history_path(self) -> Path:
        """``history.json`` of the run."""
        return self.path / HISTORY_FILE

    def checkpoint_path(self, server_round: int) -> Path:
        """The checkpoint of the global model after ``server_round``."""
        return self.path / CHECKPOINT_DIR / f"round-{server_round:03d}.pt"

    def save(self, server_round: int, arrays: ArrayRecord, history: Mapping[str, Any]) -> None:
        """Write the checkpoint of ``server_round``, then the history that records it.

        In this order, a history entry always has its checkpoint on disk.
        """
        checkpoint = self.checkpoint_path(server_round)
        _atomic_write(checkpoint, lambda tmp: torch.save(
            {"round": server_round, "state_dict": arrays.to_torch_state_dict()}, tmp))
        _atomic_write(self.history_path, lambda tmp: tmp.write_text(json.dumps(history, indent=2)))

    def load(self, run_config: Mapping[str, Any]) -> tuple[ArrayRecord, dict[str, Any]] | None:
        """The global model and history after the last recorded round, or None to start afresh.

        Args:
            run_config: This run's config; it must match the recorded one except for
                :data:`RESUMABLE_KEYS`.

        Raises:
            ValueError: The recorded run used a different config, or its checkpoint is missing.
        """
        if not self.history_path.is_file():
            log(INFO, "[fedcca] resume: no %s yet, starting from round 1", self.history_path)
            return None
        history = json.loads(self.history_path.read_text())
        _check_same_config(history["run_config"], run_config, self.history_path)
        done = len(history["rounds"])
        if [entry["round"] for entry in history["rounds"]] != list(range(1, done + 1)):
            raise ValueError(f"{self.history_path}: rounds are not 1..{done}; cannot resume")
        if done == 0:
            return None
        checkpoint = torch.load(self.checkpoint_path(done), map_location="cpu", weights_only=True)
        if checkpoint["round"] != done:
            raise ValueError(f"{self.checkpoint_path(done)} holds round {checkpoint['round']}, expected {done}")
        history["run_config"] = dict(run_config)
        return ArrayRecord(checkpoint["state_dict"]), history

    def plot(self, history: Mapping[str, Any], title: str) -> None:
        """Write ``accuracy.png``: test accuracy of the global model per round (0 = initial)."""
        # Figure + Agg canvas directly: no pyplot global state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
        from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

        rounds = [0] + [entry["round"] for entry in history["rounds"]]
        accuracy = [history["initial"]["accuracy"]] + [entry["accuracy"] for entry in history["rounds"]]
        figure = Figure(figsize=(5, 3.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(rounds, [100 * a for a in accuracy], marker="o")
        axes.set(xlabel="round", ylabel="test accuracy (%)", title=title)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        _atomic_write(self.path / PLOT_FILE, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def _check_same_config(recorded: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    keys = (set(recorded) | set(current)) - RESUMABLE_KEYS
    differing = sorted(key for key in keys if recorded.get(key) != current.get(key))
    if differing:
        details = ", ".join(f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in differing)
        raise ValueError(f"cannot resume from {where}: the run config differs ({details})")


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
