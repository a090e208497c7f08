"""One client against the rest: poisoning attacks on FedAvg, Krum, FedTrimmedAvg and CCAMerge.

K clients (the product's ClientApp over an in-process grid, Fashion-MNIST Dirichlet shards),
one of them (the highest node id) an attacker that trains honestly and then changes its reply:

* ``scale``: weights x 10^6;
* ``examples``: ``num-examples`` = 10^12;
* ``statistics``: honest weights, forged alignment statistics (means 0, cross moments x 1e-30;
  and, ``statistics-scale``, second and cross moments x 1e-12, which makes CCA scale the weights).

Every strategy runs the same rounds from the same initial model: Flower's FedAvg, Krum
(``num_malicious_nodes=1``) and FedTrimmedAvg (``beta=0.25``), CCAMerge as the ServerApp builds
it (defaults: the reply screen, the weight cap, the aligned-norm bound) and CCAMerge with all
three bounds off (``cca-unbounded``: what main did before). Reported after the last round: test
accuracy and the largest absolute weight of the global model, beside the same strategy's honest
run. Results are written after every run; a rerun skips those already in the JSON::

    python -m simulations.poisoning --clients 3,10 --rounds 3 --out results/poisoning/poisoning.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, Krum, Strategy

from fedcca.app.federation import (
    calibration_inputs,
    derive_seed,
    evaluation_loader,
    holdout_set,
    load_data,
    make_model,
    seed_everything,
)
from fedcca.app.task import TaskConfig
from fedcca.devices import resolve_device
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import METRICS_KEY, NUM_EXAMPLES_KEY, STATISTICS_KEY, WEIGHTS_KEY
from fedcca.flower.strategy import CCAMerge
from fedcca.training import evaluate
from server.server_app import build_strategy
from simulations.harness import (
    ROOT,
    add_overrides_argument,
    add_runtime_arguments,
    apply_runtime,
    base_run_config,
    markdown_table,
    overrides_of,
    parse_list,
    project_client_app,
    read_json,
    write_json,
)

logger = logging.getLogger("simulations.poisoning")

ATTACKS = ("none", "scale", "examples", "statistics", "statistics-scale")
STRATEGIES = ("fedavg", "krum", "trimmedavg", "cca", "cca-unbounded")


def _scale_arrays(record: RecordDict, suffixes: dict[str, float]) -> None:
    for key in list(record):
        for suffix, factor in suffixes.items():
            if key.endswith(suffix):
                array = record[key].numpy()
                record[key] = Array((array * factor).astype(array.dtype))


def attack(name: str) -> Callable[[RecordDict], None]:
    """The change an attacker makes to its honest reply's content."""
    def scale(content: RecordDict) -> None:
        state = content[WEIGHTS_KEY].to_torch_state_dict()
        content[WEIGHTS_KEY] = ArrayRecord({k: v * 1e6 if v.is_floating_point() else v for k, v in state.items()})

    def examples(content: RecordDict) -> None:
        content[METRICS_KEY] = MetricRecord({**dict(content[METRICS_KEY]), NUM_EXAMPLES_KEY: 1e12})

    def statistics(factors: dict[str, float]) -> Callable[[RecordDict], None]:
        def forge(content: RecordDict) -> None:
            if STATISTICS_KEY in content:
                _scale_arrays(content[STATISTICS_KEY], factors)
        return forge

    return {"none": lambda content: None, "scale": scale, "examples": examples,
            "statistics": statistics({"/mean": 0.0, "/cross": 1e-30}),
            "statistics-scale": statistics({"/mean": 0.0, "/comoment": 1e-12, "/cross": 1e-12})}[name]


def attacker_app(honest: Callable[[Message, Context], Message], name: str) -> Callable[[Message, Context], Message]:
    """The project's ClientApp, with ``attack(name)`` applied to its train replies."""
    change = attack(name)

    def app(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if reply.has_error() or message.metadata.message_type != "train":
            return reply
        content = reply.content
        change(content)
        return Message(content, reply_to=message)

    return app


def build(name: str, task: TaskConfig, model_fn: Callable[[], torch.nn.Module], clients: int) -> Strategy:
    """The strategy ``name`` for ``clients`` nodes (CCAMerge wrapped as the ServerApp wraps it)."""
    # a round goes on without one reply: the attacker's, when a strategy drops it
    common: dict[str, Any] = {"fraction_evaluate": 0.0, "min_train_nodes": task.min_nodes,
                              "min_available_nodes": task.min_nodes}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "krum":
        return Krum(num_malicious_nodes=1, **common)
    if name == "trimmedavg":
        return FedTrimmedAvg(beta=0.25, **common)
    if name == "cca":
        return task.screen(build_strategy(task, model_fn, torch.device("cpu")))
    return CCAMerge(model_fn, calibration_inputs(task), task.merge_search(), holdout=holdout_set(task),
                    reference=task.reference, stats=task.stats, device="cpu", distill=task.distill_config(),
                    max_weight_ratio=math.inf, max_norm_growth=None, **common)


def run(clients: int, attack_name: str, strategy_name: str, rounds: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """One federation; returns accuracy and the largest absolute weight after each round."""
    run_config = base_run_config(**{**overrides, "min_nodes": max(2, clients - 1), "num_server_rounds": rounds})
    task = TaskConfig.from_run_config(run_config)
    dataset = load_data(task.dataset, task.data_dir)
    model_fn = partial(make_model, task, dataset)
    honest = project_client_app()
    grid = InProcessGrid.of_app(honest, run_config, clients)
    grid.nodes[clients] = attacker_app(honest, attack_name)  # node ids are 1..K: the last one attacks
    loader = evaluation_loader(task, resolve_device(None))
    seed_everything(derive_seed(task.seed))
    arrays = ArrayRecord(model_fn().state_dict())
    strategy = build(strategy_name, task, model_fn, clients)
    history, started = [], time.perf_counter()
    for server_round in range(1, rounds + 1):
        seed_everything(derive_seed(task.seed, server_round))
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        new, _ = strategy.aggregate_train(server_round, list(grid.send_and_receive(messages)))
        arrays = arrays if new is None else new
        model = model_fn()
        state = arrays.to_torch_state_dict()
        model.load_state_dict(state)
        largest = max(float(v.abs().max()) for v in state.values() if v.is_floating_point())
        loss, accuracy = evaluate(model, loader) if np.isfinite(largest) else (float("nan"), float("nan"))
        history.append({"round": server_round, "accuracy": accuracy, "loss": loss, "largest_weight": largest,
                        "skipped": new is None})
    logger.info("K=%d %-16s %-14s accuracy %.4f, largest weight %.3g (%.0f s)", clients, attack_name, strategy_name,
                history[-1]["accuracy"], history[-1]["largest_weight"], time.perf_counter() - started)
    return {"clients": clients, "attack": attack_name, "strategy": strategy_name, "rounds": history}


def report(payload: dict[str, Any], path: Path) -> None:
    """A markdown table: accuracy % and largest |w| after the last round, per K, attack and strategy."""
    runs = {(r["clients"], r["attack"], r["strategy"]): r["rounds"][-1] for r in payload["runs"]}
    rows = []
    for clients in sorted({key[0] for key in runs}):
        for attack_name in ATTACKS:
            row = [clients, attack_name]
            for strategy in payload["strategies"]:
                last = runs.get((clients, attack_name, strategy))
                row.append("-" if last is None else f"{100 * last['accuracy']:.1f} ({last['largest_weight']:.3g})")
            rows.append(row)
    lines = [f"# One attacker among K clients, after {payload['rounds']} rounds", "",
             f"Setting: {payload['setting']}. Cell: test accuracy % (largest absolute weight of the global model). "
             "`cca`: CCAMerge as the ServerApp builds it (reply screen, weight cap, aligned-norm bound); "
             "`cca-unbounded`: the three bounds off.", "",
             markdown_table(["K", "attack", *payload["strategies"]], rows)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="3,10")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=3)
    add_overrides_argument(parser)
    add_runtime_arguments(parser, ROOT / "results" / "poisoning" / "poisoning.json")
    args = parser.parse_args(argv)
    apply_runtime(args)
    logger.setLevel(logging.INFO)
    overrides = overrides_of(args)
    strategies = parse_list(args.strategies)
    payload = read_json(args.out) or {}
    runs = [r for r in payload.get("runs", []) if r["strategy"] in strategies and len(r["rounds"]) == args.rounds]
    done = {(r["clients"], r["attack"], r["strategy"]) for r in runs}
    for clients in parse_list(args.clients, int):
        for attack_name in parse_list(args.attacks):
            for strategy in strategies:
                if (clients, attack_name, strategy) in done:
                    continue
                runs.append(run(clients, attack_name, strategy, args.rounds, overrides))
                payload = {"rounds": args.rounds, "strategies": strategies, "setting": overrides, "runs": runs}
                write_json(args.out, payload)
                report(payload, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
