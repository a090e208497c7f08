"""CCAMerge vs FedAvg (and Permute merge) in federated training, accuracy per round.

Every run drives the real strategies (``server.server_app.build_strategy``: Flower's
``FedAvg`` or ``CCAMerge``) through Flower's Message API with ``strategy.start(grid=...)``
on an in-process Grid that calls our real ClientApp (``clients/client_app.py``) per node,
so the product is what is measured; there is no Ray start-up. For one seed every
strategy starts from the same initial model, the same client shards and the same
per-(round, client) training randomness; only the aggregation differs. The global model
is evaluated on the test split after every round.

A strategy is named ``fedavg`` or ``METHOD[:REFERENCE[:STATS]][+KEY=VALUE...]`` (CCAMerge's
``method``, ``reference`` and ``stats``, then any run-config overrides), e.g. ``cca`` =
``cca:global:client``, ``permute``, ``cca:largest:server``, ``cca+merge-guard=false``,
``cca+repair=affine+ridge-mode=absolute``. Writes JSON, one PNG per local-epochs setting and prints a
markdown table per setting::

    OPENBLAS_NUM_THREADS=1 python -m simulations.federated --partitioning dirichlet --alpha 0.1 --local-epochs 1,5 \
        --strategies fedavg,cca,permute --rounds 6 --num-clients 4 --seeds 0,1 \
        --train-subset 1600 --out results/federated/dirichlet-0.1.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from clients.task import (
    TaskConfig,
    calibration_inputs,
    derive_seed,
    evaluation_loader,
    load_data,
    make_model,
    seed_everything,
)
from fedcca.devices import resolve_device
from fedcca.strategy import CCAMerge
from fedcca.training import evaluate
from server.server_app import build_strategy
from simulations.harness import (
    BASELINE,
    InProcessGrid,
    add_runtime_arguments,
    base_run_config,
    markdown_table,
    parse_benchmark,
    parse_list,
    write_json,
)

def run_federation(run_config: dict[str, Any], num_clients: int, rounds: int) -> dict[str, Any]:
    """Train one federation in process; return accuracy/loss per round (round 0 = initial model).

    Args:
        run_config: Full run config (as ``flwr run`` would pass it).
        num_clients: Number of nodes; all of them train every round.
        rounds: Number of server rounds.
    """
    task = TaskConfig.from_run_config(run_config)
    device = resolve_device(None)
    dataset = load_data(task.dataset, task.data_dir)
    model_fn = partial(make_model, task, dataset)
    calibration = calibration_inputs(task) if task.merge_method else None
    strategy = build_strategy(task, model_fn, calibration, device)
    # As the ServerApp does: the initial model (and node sampling) depend on the seed only.
    seed_everything(derive_seed(task.seed))
    initial = ArrayRecord(model_fn().state_dict())
    loader, model = evaluation_loader(task, device), model_fn()

    def evaluate_global(_: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, loader, device=device)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    started = time.perf_counter()
    result = strategy.start(grid=InProcessGrid(run_config, num_clients), initial_arrays=initial,
                            num_rounds=rounds, timeout=task.round_timeout, evaluate_fn=evaluate_global)
    wall = time.perf_counter() - started
    evaluated = result.evaluate_metrics_serverapp
    train = result.train_metrics_clientapp
    record: dict[str, Any] = {
        "accuracy": [float(evaluated[r]["accuracy"]) for r in range(rounds + 1)],
        "loss": [float(evaluated[r]["loss"]) for r in range(rounds + 1)],
        "client_train_seconds": [float(train[r]["train-seconds"]) if r in train else None
                                 for r in range(1, rounds + 1)],
        "client_stats_seconds": [float(train[r]["stats-seconds"]) if r in train else None
                                 for r in range(1, rounds + 1)],
        "wall_seconds": wall,
    }
    if isinstance(strategy, CCAMerge):
        record["merge_seconds"] = [entry["merge_seconds"] for entry in strategy.round_log]
        record["server_stats_seconds"] = [entry["stats_seconds"] for entry in strategy.round_log]
        record["skipped_rounds"] = [entry["round"] for entry in strategy.round_log if entry["skipped"]]
    return record


def rounds_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First round (>= 1) whose accuracy is at least ``target``; None if never reached.

    Args:
        curve: Accuracy per round, index 0 = initial model.
        target: Accuracy to reach.
    """
    return next((r for r in range(1, len(curve)) if curve[r] >= target - 1e-12), None)


def summarise(runs: list[dict[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean/std accuracy per round over seeds and rounds to reach the baseline's final.

    The baseline is FedAvg when compared, else the first strategy. "rounds_to_baseline_final"
    uses the mean curves; "seed_rounds_to_baseline_final" compares each seed with the
    baseline of the same seed.

    Args:
        runs: Records of :func:`run_federation` with "strategy" and "seed" added.
        labels: Strategy labels, in display order.
    """
    baseline = BASELINE if BASELINE in labels else labels[0]
    curves = {label: {run["seed"]: run["accuracy"] for run in runs if run["strategy"] == label}
              for label in labels}
    base_mean = np.mean(list(curves[baseline].values()), axis=0)
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        stacked = np.array(list(curves[label].values()))
        mean = stacked.mean(axis=0)
        summary[label] = {
            "mean_accuracy": mean.tolist(),
            "std_accuracy": stacked.std(axis=0).tolist(),
            "final_accuracy": float(mean[-1]),
            "best_accuracy": float(mean[1:].max()),
            "baseline": baseline,
            "rounds_to_baseline_final": rounds_to_reach(mean, float(base_mean[-1])),
            "seed_rounds_to_baseline_final": {
                str(seed): rounds_to_reach(curve, curves[baseline][seed][-1])
                for seed, curve in curves[label].items() if seed in curves[baseline]},
        }
    return summary


def setting_table(summary: dict[str, dict[str, Any]], rounds: int) -> str:
    """Markdown table of one setting: mean ± std accuracy at equal rounds, rounds to the baseline."""
    shown = sorted({1, max(1, rounds // 2), rounds})
    headers = ["strategy", *[f"acc@{r}" for r in shown], "best",
               f"rounds to {next(iter(summary.values()))['baseline']} final"]
    rows = []
    for label, entry in summary.items():
        cells = [f"{100 * entry['mean_accuracy'][r]:.1f} ± {100 * entry['std_accuracy'][r]:.1f}" for r in shown]
        reached = entry["rounds_to_baseline_final"]
        rows.append([label, *cells, f"{100 * entry['best_accuracy']:.1f}",
                     "not reached" if reached is None else reached])
    return markdown_table(headers, rows)


def plot_setting(path: Path, title: str, runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> None:
    """Accuracy per round, one line per strategy (mean over seeds, band = min..max).

    Args:
        path: PNG to write.
        title: Plot title.
        runs: The setting's runs.
        summary: :func:`summarise` of them.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, entry in summary.items():
        stacked = np.array([run["accuracy"] for run in runs if run["strategy"] == label])
        rounds = np.arange(stacked.shape[1])
        line, = axes.plot(rounds, 100 * np.array(entry["mean_accuracy"]), marker="o", label=label)
        axes.fill_between(rounds, 100 * stacked.min(axis=0), 100 * stacked.max(axis=0),
                          color=line.get_color(), alpha=0.15)
    axes.set(xlabel="round", ylabel="test accuracy (%)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _setting_name(args: argparse.Namespace) -> str:
    if args.partitioning == "dirichlet":
        return f"dirichlet alpha={args.alpha:g}"
    return args.partitioning


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--partitioning", default="dirichlet", help="iid | dirichlet | class-disjoint")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--local-epochs", default="1,5", help="comma-separated, one plot each")
    parser.add_argument("--strategies", default="fedavg,cca,permute",
                        help="comma-separated: fedavg | METHOD[:REFERENCE[:STATS]]")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--num-clients", type=int, default=4)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--train-subset", type=int, default=1600,
                        help="training images in total: each client trains on at most "
                             "train-subset // num-clients examples of its shard (0: whole shards)")
    parser.add_argument("--calibration-size", type=int, default=500)
    parser.add_argument("--test-examples", type=int, default=2000, help="first N test images (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width", type=int, default=1)
    add_runtime_arguments(parser, Path("results/federated/dirichlet-0.1.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison described by the command line; write JSON and PNGs; return the JSON."""
    args, specs, blas_threads = parse_benchmark(_parser(), argv)
    labels = [spec.label for spec in specs]
    seeds = parse_list(args.seeds, int)
    per_client = args.train_subset // args.num_clients if args.train_subset else 0
    common = {
        "partitioning": args.partitioning, "alpha": args.alpha, "num_server_rounds": args.rounds,
        "min_nodes": args.num_clients, "max_examples_per_client": per_client,
        "calibration_size": args.calibration_size, "max_test_examples": args.test_examples,
        "batch_size": args.batch_size, "lr": args.lr, "model": args.model, "width": args.width,
        "data_dir": args.data_dir, "out_dir": "outputs/unused",
    }
    payload: dict[str, Any] = {
        "command": "python -m simulations.federated " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {**common, "num_clients": args.num_clients, "seeds": seeds, "strategies": labels,
                   "threads": args.threads, "device": str(resolve_device(None)),
                   "platform": platform.platform(), "openblas_threads": blas_threads},
        "settings": [],
    }
    for epochs in parse_list(args.local_epochs, int):
        runs = []
        for seed in seeds:
            for spec in specs:
                config = base_run_config(**common, local_epochs=epochs, seed=seed, **spec.run_config())
                record = run_federation(config, args.num_clients, args.rounds)
                runs.append({"strategy": spec.label, "seed": seed, **record})
                print(f"[{_setting_name(args)}, E={epochs}] {spec.label} seed {seed}: accuracy "
                      + " ".join(f"{100 * a:.1f}" for a in record["accuracy"])
                      + f" ({record['wall_seconds']:.0f} s)", flush=True)
        summary = summarise(runs, labels)
        title = f"{_setting_name(args)}, {args.num_clients} clients, {epochs} local epoch(s)"
        plot = args.out.with_name(f"{args.out.stem}-E{epochs}.png")
        plot_setting(plot, title, runs, summary)
        payload["settings"].append({"partitioning": args.partitioning, "alpha": args.alpha,
                                    "local_epochs": epochs, "plot": plot.name, "summary": summary,
                                    "runs": runs})
        print(f"\n### {title} (test accuracy %, mean ± std over seeds {seeds})\n")
        print(setting_table(summary, args.rounds) + "\n", flush=True)
        write_json(args.out, payload)  # after every setting: a killed run keeps what it finished
    return payload


if __name__ == "__main__":
    main()
