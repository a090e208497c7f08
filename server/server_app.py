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
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
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
from fedcca.flower.records import RoundRecord
from fedcca.flower.strategy import CCAMerge
from fedcca.flower.wrapper import StrategyWrapper
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

    ``flwr run``, the deployment and the federated benchmark (``simulations.federated``) all go
    through it. The loop is Flower's ``Strategy.start``, run by :class:`RecordRounds` (replies
    streamed as they arrive; a resumed run continues at round k + 1 with ``first_round``); every
    round's randomness is seeded from ``(seed, round)`` (:class:`_SeededRounds`), so a resumed run
    computes what an uninterrupted one would, and the checkpoint and ``history.json`` are written
    after every round by one writer (:class:`~server.run_directory.RunDirectory`).

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
    strategy = RecordRounds(_SeededRounds(built if isinstance(built, CCAMerge) else task.screen(built), task.seed),
                            title=title)
    history["alignment"] = strategy.alignment()

    def saved(record: RoundRecord, arrays: ArrayRecord) -> None:
        history["rounds"].append(record.to_json())
        outputs.save(record.round, arrays, history)
        plot_rounds(history["initial"], history["rounds"], outputs.path / PLOT_FILE, title)

    done = len(history["rounds"])
    if done < task.num_server_rounds:
        strategy.start(grid, arrays, task.num_server_rounds - done, task.round_timeout,
                       evaluate_fn=lambda rnd, model: MetricRecord(history["initial"] if rnd == 0 else evaluator(model)),
                       first_round=done + 1,
                       on_round=saved)
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
                        reference=task.reference, stats=task.stats, alignment=task.alignment, device=device,
                        average=task.average, max_weight_ratio=task.max_weight_ratio,
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


class _SeededRounds(StrategyWrapper):
    """Seeds every round's randomness (node sampling, server-side draws) from ``(seed, round)`` before the
    wrapped strategy configures it: a resumed run samples what an uninterrupted one would."""

    def __init__(self, strategy: Strategy, seed: int) -> None:
        super().__init__(strategy)
        self.seed = seed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Seed, then the wrapped strategy's instructions."""
        seed_everything(derive_seed(self.seed, server_round))
        return self.strategy.configure_train(server_round, arrays, config, grid)


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
