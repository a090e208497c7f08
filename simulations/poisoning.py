"""One client against the rest: poisoning attacks on FedAvg, Krum, FedTrimmedAvg and CCAMerge.

K clients (the product's ClientApp over an in-process grid, Fashion-MNIST Dirichlet shards),
one of them (the highest node id) an attacker that trains honestly and then changes its reply:

* ``scale``: weights x 10^6;
* ``bound95``: the update ``w - g`` stretched to 0.95x the screen's bound (10 |g|);
* ``sign-flip``: the update negated (``g - (w - g)``), and ``sign-flip-claim`` also claiming 10^12 examples;
* ``random``: random weights with the honest model's norm;
* ``examples``: ``num-examples`` = 10^12;
* ``statistics``: honest weights, forged alignment statistics (means 0, cross moments x 1e-30;
  ``statistics-scale``: second and cross moments x 1e-12, which makes CCA scale the weights;
  ``statistics-negated``: cross moments negated, which keeps the norm and scrambles the features).

Every strategy runs the same rounds from the same initial model: Flower's FedAvg, FedMedian,
Krum (``num_malicious_nodes=1``) and FedTrimmedAvg (``beta=0.25``); ``cca-bare``: ``CCAMerge(model_fn,
calibration, holdout=...)`` as the README's one line builds it; ``cca``: as the ServerApp builds it;
``cca-median``: with ``average="median"``; ``cca-cap1``: the one line with ``max_weight_ratio=1``;
``cca-unbounded``: screen, weight cap and aligned-norm bound
off. ``--set holdout-size=0`` runs the configuration without a hold-out set. Reported after the last
round: test accuracy and the largest absolute weight of the global model (mean over seeds).
Results are written after every run; a rerun skips those already in the JSON::

    python -m simulations.poisoning --clients 5,3 --seeds 0,1,2 --rounds 3 --out results/poisoning/poisoning.json
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
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

from fedcca.app import federation
from fedcca.app.task import TaskConfig
from fedcca.devices import resolve_device
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import (
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    STATISTICS_KEY,
    WEIGHTS_KEY,
)
from fedcca.flower.strategy import CCAMerge
from fedcca.training import evaluate
from server.server_app import build_strategy
from simulations import harness

logger = logging.getLogger("simulations.poisoning")

ATTACKS = ("none", "scale", "bound95", "sign-flip", "sign-flip-claim", "random", "examples", "statistics",
           "statistics-scale", "statistics-negated")
STRATEGIES = ("fedavg", "fedmedian", "krum", "trimmedavg", "cca-bare", "cca", "cca-median", "cca-unbounded", "cca-cap1")
BOUND = 10.0  # the screen's default max_update_norm


def _scale_arrays(record: RecordDict, suffixes: dict[str, float]) -> None:
    for key in list(record):
        for suffix, factor in suffixes.items():
            if key.endswith(suffix):
                array = record[key].numpy()
                record[key] = Array((array * factor).astype(array.dtype))


def attack(name: str) -> Callable[[RecordDict, dict[str, torch.Tensor]], None]:
    """The change an attacker makes to its honest reply's content, given the global model it received."""
    def updated(change: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> Callable:
        def apply(content: RecordDict, received: dict[str, torch.Tensor]) -> None:
            state = content[WEIGHTS_KEY].to_torch_state_dict()
            floats = [k for k, v in state.items() if v.is_floating_point()]
            update = torch.cat([(state[k] - received[k]).reshape(-1).double() for k in floats])
            g = float(torch.cat([received[k].reshape(-1).double() for k in floats]).norm())
            w = float(torch.cat([state[k].reshape(-1).double() for k in floats]).norm())
            factor = {"update": float(update.norm()), "global": g, "weights": w}
            content[WEIGHTS_KEY] = ArrayRecord({k: change(v, received[k], factor) if k in floats else v
                                                for k, v in state.items()})
        return apply

    def claim(content: RecordDict, received: dict[str, torch.Tensor]) -> None:
        content[METRICS_KEY] = MetricRecord({**dict(content[METRICS_KEY]), NUM_EXAMPLES_KEY: 1e12})

    def statistics(factors: dict[str, float]) -> Callable:
        def forge(content: RecordDict, received: dict[str, torch.Tensor]) -> None:
            if STATISTICS_KEY in content:
                _scale_arrays(content[STATISTICS_KEY], factors)
        return forge

    def random_weights(content: RecordDict, received: dict[str, torch.Tensor]) -> None:
        state = content[WEIGHTS_KEY].to_torch_state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]
        noise = {k: torch.randn(state[k].shape, generator=generator, dtype=torch.float64) for k in floats}
        ratio = float(torch.cat([state[k].reshape(-1).double() for k in floats]).norm()) / float(
            torch.cat([v.reshape(-1) for v in noise.values()]).norm())
        content[WEIGHTS_KEY] = ArrayRecord({k: (noise[k] * ratio).to(v.dtype) if k in floats else v
                                            for k, v in state.items()})

    generator = torch.Generator().manual_seed(12345)
    sign_flip = updated(lambda w, g, n: g - (w - g))
    attacks: dict[str, Callable] = {
        "none": lambda content, received: None,
        "scale": updated(lambda w, g, n: w * 1e6),
        "bound95": updated(lambda w, g, n: g + (w - g) * (0.95 * BOUND * n["global"] / max(n["update"], 1e-12))),
        "sign-flip": sign_flip,
        "sign-flip-claim": lambda content, received: (sign_flip(content, received), claim(content, received)),
        "random": random_weights,
        "examples": claim,
        "statistics": statistics({"/mean": 0.0, "/cross": 1e-30}),
        "statistics-scale": statistics({"/mean": 0.0, "/comoment": 1e-12, "/cross": 1e-12}),
        "statistics-negated": statistics({"/cross": -1.0}),
    }
    return attacks[name]


def attacker_app(honest: Callable[[Message, Context], Message], name: str) -> Callable[[Message, Context], Message]:
    """The project's ClientApp, with ``attack(name)`` applied to its train replies."""
    change = attack(name)

    def app(message: Message, context: Context) -> Message:
        reply = honest(message, context)
        if reply.has_error() or message.metadata.message_type != "train":
            return reply
        content = reply.content
        change(content, message.content[WEIGHTS_KEY].to_torch_state_dict())
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
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "cca":  # as the ServerApp builds it (it screens its own replies)
        return build_strategy(task, model_fn, torch.device("cpu"))
    if name == "cca-bare":  # the README's one line: every bound at its default
        return CCAMerge(model_fn, federation.calibration_inputs(task), holdout=federation.holdout_set(task), device="cpu", **common)
    if name == "cca-cap1":  # the one line with no reply weighing more than the round's median claim
        return CCAMerge(model_fn, federation.calibration_inputs(task), holdout=federation.holdout_set(task), device="cpu",
                        max_weight_ratio=1.0, **common)
    if name == "cca-median":
        return CCAMerge(model_fn, federation.calibration_inputs(task), task.merge_search(), holdout=federation.holdout_set(task),
                        reference=task.reference, stats=task.stats, device="cpu", average="median",
                        screen=task.update_screen(), **common)
    return CCAMerge(model_fn, federation.calibration_inputs(task), task.merge_search(), holdout=federation.holdout_set(task),
                    reference=task.reference, stats=task.stats, device="cpu", distill=task.distill_config(),
                    max_weight_ratio=math.inf, max_norm_growth=None, screen=None, **common)


def run(clients: int, attack_name: str, strategy_name: str, rounds: int, overrides: dict[str, Any],
        seed: int = 0) -> dict[str, Any]:
    """One federation; returns accuracy and the largest absolute weight after each round."""
    run_config = harness.base_run_config(**{**overrides, "min_nodes": max(2, clients - 1), "num_server_rounds": rounds,
                                    "seed": seed})
    task = TaskConfig.from_run_config(run_config)
    dataset = federation.load_data(task.dataset, task.data_dir)
    model_fn = partial(federation.make_model, task, dataset)
    honest = harness.project_client_app()
    grid = InProcessGrid.of_app(honest, run_config, clients)
    grid.nodes[clients] = attacker_app(honest, attack_name)  # node ids are 1..K: the last one attacks
    loader = federation.evaluation_loader(task, resolve_device(None))
    federation.seed_everything(federation.derive_seed(task.seed))
    arrays = ArrayRecord(model_fn().state_dict())
    strategy = build(strategy_name, task, model_fn, clients)
    history, started = [], time.perf_counter()
    for server_round in range(1, rounds + 1):
        federation.seed_everything(federation.derive_seed(task.seed, server_round))
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
    return {"clients": clients, "attack": attack_name, "strategy": strategy_name, "seed": seed, "rounds": history}


def report(payload: dict[str, Any], path: Path) -> None:
    """A markdown table: mean accuracy % over seeds (and the largest |w|) after the last round, per K, attack and
    strategy."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in payload["runs"]:
        cells.setdefault((r["clients"], r["attack"], r["strategy"]), []).append(r["rounds"][-1])
    rows = []
    for clients in sorted({key[0] for key in cells}):
        for attack_name in ATTACKS:
            if not any((clients, attack_name, s) in cells for s in payload["strategies"]):
                continue
            row = [clients, attack_name]
            for strategy in payload["strategies"]:
                last = cells.get((clients, attack_name, strategy))
                row.append("-" if last is None else
                           f"{100 * np.mean([x['accuracy'] for x in last]):.1f} ({len(last)}; "
                           f"{max(x['largest_weight'] for x in last):.3g})")
            rows.append(row)
    lines = [f"# One attacker among K clients, after {payload['rounds']} rounds", "",
             f"Setting: {payload['setting']}. Cell: test accuracy %, mean over seeds (seeds; largest absolute weight "
             "of the global model). `cca-bare`: `CCAMerge(model_fn, calibration, holdout=...)` as the README builds "
             "it; `cca`: as the ServerApp builds it; `cca-median`: `average=\"median\"`; `cca-cap1`: `max_weight_ratio=1`; "
             "`cca-unbounded`: screen, "
             "weight cap and aligned-norm bound off.", "",
             harness.markdown_table(["K", "attack", *payload["strategies"]], rows)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="5,3")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=3)
    harness.add_overrides_argument(parser)
    harness.add_runtime_arguments(parser, harness.ROOT / "results" / "poisoning" / "poisoning.json")
    args, overrides = harness.parse_benchmark_args(parser, argv, logger)
    strategies = harness.parse_list(args.strategies)
    payload = harness.resumed(args.out, overrides)
    runs = [r for r in payload.get("runs", []) if len(r["rounds"]) == args.rounds]  # other strategies' kept
    strategies = list(dict.fromkeys([*payload.get("strategies", []), *strategies]))
    done = {(r["clients"], r["attack"], r["strategy"], r.get("seed", 0)) for r in runs}
    for seed in harness.parse_list(args.seeds, int):
        for clients in harness.parse_list(args.clients, int):
            for attack_name in harness.parse_list(args.attacks):
                for strategy in harness.parse_list(args.strategies):
                    if (clients, attack_name, strategy, seed) in done:
                        continue
                    runs.append(run(clients, attack_name, strategy, args.rounds, overrides, seed))
                    payload = {"rounds": args.rounds, "strategies": strategies, "setting": overrides, "runs": runs}
                    harness.write_json(args.out, payload)
                    report(payload, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
