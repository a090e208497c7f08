"""fedcca ServerApp: federated training with CCA Merge (or FedAvg/FedProx) and server-side evaluation.

Each round the strategy (``strategy`` in the run config: cca | permute | weight-matching | feddf ->
``CCAMerge``, fedavg / fedprox -> Flower's own) trains on the clients and merges their models;
the global model is then evaluated on the test split. Under ``out-dir`` the app keeps
``history.json`` (one :class:`~fedcca.flower.records.RoundRecord` per round), ``checkpoints/round-NNN.pt``
and ``accuracy.png`` (:mod:`server.run_directory`); with ``resume = true`` it continues from
the last round recorded there. Every round's randomness is seeded from ``(seed, round)``, so
a resumed run computes what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from functools import partial
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from torch import nn

from fedcca.app.federation import (
    calibration_inputs,
    check_feasible,
    derive_seed,
    evaluation_loader,
    holdout_set,
    load_data,
    make_model,
    seed_everything,
)
from fedcca.app.task import TaskConfig
from fedcca.data import DeviceLoader
from fedcca.devices import resolve_device
from fedcca.flower.recording import PLOT_FILE, RecordRounds, plot_rounds
from fedcca.flower.strategy import CCAMerge
from fedcca.flower.streaming import stream_replies
from fedcca.training import evaluate
from server.run_directory import RunDirectory

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

    This is the round loop of the product: ``flwr run``, the deployment and the federated
    benchmark (``simulations.federated``) all go through it.

    It is not Flower's ``Strategy.start`` because ``start`` always begins at round 1 and keeps
    its state in memory: resuming after round k needs the loop to start at k + 1 from a
    checkpoint, with every round's randomness seeded from ``(seed, round)`` so that a resumed
    run computes what an uninterrupted one would, and history and checkpoint written after
    every round. The exchange itself is Flower's: the strategy's ``configure_train`` and
    ``aggregate_train`` and the grid's push and pull, for CCAMerge, FedAvg and FedProx alike.

    Args:
        grid: Connection to the SuperNodes.
        run_config: The run config (keys as in ``[tool.flwr.app.config]``).
    """
    task = TaskConfig.from_run_config(run_config)
    outputs = RunDirectory(task.output_dir(run_config)) if task.resume else RunDirectory.fresh(task.output_dir(run_config))
    device = resolve_device(None)
    dataset = load_data(task.dataset, task.data_dir)
    check_feasible(task, dataset)
    model_fn = partial(make_model, task, dataset)
    evaluator = _Evaluator(model_fn, evaluation_loader(task, device), device)

    resumed = outputs.load(run_config, model_fn().state_dict()) if task.resume else None
    if resumed is None:
        seed_everything(derive_seed(task.seed))  # the initial model depends on the seed only
        arrays = ArrayRecord(model_fn().state_dict())
        history = {"run_config": dict(run_config), "initial": evaluator(arrays), "rounds": []}
        log(INFO, "[fedcca] initial model: accuracy %.4f, loss %.4f",
            history["initial"]["accuracy"], history["initial"]["loss"])
    else:
        arrays, history = resumed
        log(INFO, "[fedcca] resuming after round %d from %s", len(history["rounds"]), outputs.path)

    title = f"{task.strategy}: {task.model} on {task.dataset} ({task.partitioning})"
    built = build_strategy(task, model_fn, device)
    strategy = RecordRounds(built if isinstance(built, CCAMerge) else task.screen(built), title=title,
                            num_rounds=task.num_server_rounds)
    history["alignment"] = strategy.alignment()
    strategy.summary()
    for server_round in range(len(history["rounds"]) + 1, task.num_server_rounds + 1):
        arrays = run_round(strategy, grid, server_round, arrays, task)
        record = strategy.finish_round(server_round, evaluator(arrays))
        history["rounds"].append(record.to_json())
        outputs.save(server_round, arrays, history)
        plot_rounds(history["initial"], history["rounds"], outputs.path / PLOT_FILE, title)
    log(INFO, "[fedcca] results in %s", outputs.path)
    return history


def build_strategy(task: TaskConfig, model_fn: Callable[[], nn.Module], device: torch.device | None = None) -> FedAvg:
    """The strategy named by ``task.strategy``; only the aggregation (and FedProx's client term) differs.

    Args:
        task: The run config.
        model_fn: Builds a fresh model of the federated architecture.
        device: Where CCAMerge computes statistics and merges (None: CUDA if present).
    """
    # Evaluation is server-side (the test split), so no evaluate round on the clients: FedAvg's warning
    # about fraction_evaluate = 0 says what this app intends, on every run; it is left out.
    common: dict[str, Any] = {"fraction_train": task.fraction_train, "fraction_evaluate": 0.0,
                              "min_train_nodes": task.min_nodes, "min_available_nodes": task.min_nodes}
    quiet = _DropMessage("fraction_evaluate is set to 0.0")
    FLOWER_LOGGER.addFilter(quiet)
    try:
        if task.strategy == "fedavg":
            return FedAvg(**common)
        if task.strategy == "fedprox":
            return FedProx(proximal_mu=task.proximal_mu, **common)
        return CCAMerge(model_fn, calibration_inputs(task), task.merge_search(), holdout=holdout_set(task),
                        reference=task.reference, stats=task.stats, device=device, average=task.average,
                        distill=task.distill_config(), screen=task.update_screen(), **common)
    finally:
        FLOWER_LOGGER.removeFilter(quiet)


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def run_round(strategy: RecordRounds, grid: Grid, server_round: int, arrays: ArrayRecord,
              task: TaskConfig) -> ArrayRecord:
    """One round of federated training through ``strategy``; returns the new global model.

    The exchange is Flower's (``configure_train``, the grid's ``push_messages`` /
    ``pull_messages``, ``aggregate_train``) with one difference from ``send_and_receive``: the
    replies reach ``aggregate_train`` as they arrive (:func:`fedcca.flower.streaming.stream_replies`,
    same timeout rule), so CCAMerge merges each while the other clients still train and holds
    one at a time; FedAvg and FedProx read them all, as before. The wrapper records it. When the
    strategy produces no model (too few valid replies) the old one is kept.

    Args:
        strategy: FedAvg, FedProx or CCAMerge, wrapped in :class:`RecordRounds`.
        grid: Connection to the SuperNodes.
        server_round: The round number (1-based).
        arrays: The current global model.
        task: The run config (seed, timeout).
    """
    seed_everything(derive_seed(task.seed, server_round))  # node sampling and server-side draws
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = stream_replies(grid, messages, timeout=task.round_timeout)
    new_arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays if new_arrays is None else new_arrays


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
