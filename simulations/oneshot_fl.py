"""One-shot federated learning: one round of long local training, then each server strategy once.

DENSE's protocol (Zhang et al., NeurIPS 2022, Table 1) as far as 2 CPU cores allow: 5
clients on Fashion-MNIST shards (Dirichlet or class-disjoint), all from the server's one
initial model, one round of long local training; public calibration and labelled hold-out
images held out of every client's data. The clients train **once** per (split, seed) through
the product's own ClientApp over an in-process grid; then every strategy's own
``aggregate_train`` (built by the ServerApp's ``build_strategy`` from the run config) merges
the very same replies, so strategies differ only in aggregation. The global model and the
clients' ensemble (average of their probabilities, weighted by examples) are evaluated on
the test split; nothing is chosen on it. Results are written after every (split, seed)
and a rerun skips those already in the JSON::

    python -m simulations.oneshot_fl --splits dirichlet:0.1,dirichlet:0.5 --seeds 0,1,2,3,4 \\
        --out results/oneshot-fl/oneshot-fl.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from scipy import stats

from fedcca.app.federation import (
    derive_seed,
    evaluation_loader,
    load_data,
    make_model,
    seed_everything,
)
from fedcca.app import federation
from fedcca.app.task import TaskConfig
from fedcca.devices import resolve_device
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import (
    CONFIG_KEY,
    LABEL_COUNTS_FLAG,
    LABEL_COUNTS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    WEIGHTS_KEY,
)
from fedcca.merging.selection import holdout_logits
from fedcca.merging.teachers import TeacherSum
from fedcca.training import evaluate
from server.server_app import build_strategy
from simulations.harness import (
    ROOT,
    add_overrides_argument,
    add_runtime_arguments,
    base_run_config,
    markdown_table,
    parse_benchmark_args,
    parse_list,
    parse_strategies,
    project_client_app,
    resumed,
    write_json,
)

logger = logging.getLogger("simulations.oneshot_fl")

DEFAULT_STRATEGIES = ("fedavg,cca:global,cca,feddf+distill-teacher=logits,feddf+distill-teacher=probabilities,"
                      "feddf,cca+distill=true")
"""FedAvg; CCAMerge aligning to the untrained global model (the old default); CCAMerge's default;
FedDF as published (logit teacher), with the probability teacher, and with the teacher chosen
on the hold-out set; CCAMerge + distillation (teacher chosen on the hold-out set)."""

SETTING = {"model": "lenet", "local_epochs": 10, "lr": 0.05, "lr_schedule": "one-cycle", "batch_size": 64,
           "calibration_size": 1000, "holdout_size": 500, "num_server_rounds": 1, "min_nodes": 5}
"""Our protocol: niid_bench's LeNet, 10 local epochs (DENSE: a CNN, 200 local epochs)."""

ENSEMBLES = (("ensemble", "ensemble (probabilities)"), ("ensemble_logits", "ensemble (logits)"),
             ("ensemble_label_counts", "ensemble (label-counts teacher)"),
             ("ensemble_fitted", "ensemble (fitted teacher)"))
"""The clients' ensembles evaluated on the test set (keys of a run; nan where a run predates one)."""

PRESETS: dict[str, dict[str, Any]] = {
    "ours": {},
    # DENSE's protocol (their README and paper): their CNN, whole Dirichlet shards, SGD lr 0.01 with
    # momentum 0.9, batch 256; 200 local epochs there, cut to 20 here for 2 CPU cores. Unlike
    # theirs, our calibration and hold-out images (1,500) are held out of the training split.
    "dense": {"model": "dense-cnn", "local_epochs": 20, "lr": 0.01, "lr_schedule": "constant", "momentum": 0.9,
              "batch_size": 256, "max_examples_per_client": 0},
}
"""``--preset``: run-config overrides on :data:`SETTING` (``--set`` still overrides them)."""

PUBLISHED = {  # DENSE Table 1 (Fashion-MNIST, 5 clients), reprinted by FuseFL (NeurIPS 2024)
    "FedAvg": {0.1: 41.69, 0.3: 82.96, 0.5: 83.72},
    "FedDF": {0.1: 43.58, 0.3: 80.67, 0.5: 84.67},
    "Fed-ADI": {0.1: 48.49, 0.3: 81.15, 0.5: 84.19},
    "DENSE": {0.1: 50.29, 0.3: 83.96, 0.5: 85.94},
    "Ensemble": {0.1: 67.71, 0.3: 87.25, 0.5: 89.42},
    "FuseFL": {0.1: 83.15, 0.3: 89.94, 0.5: 89.47},
}


def split_overrides(split: str) -> dict[str, Any]:
    """``dirichlet:ALPHA`` or ``class-disjoint`` as run-config overrides."""
    scheme, _, value = split.partition(":")
    if scheme == "dirichlet":
        return {"partitioning": "dirichlet", "alpha": float(value)}
    if scheme in ("class-disjoint", "iid"):
        return {"partitioning": scheme}
    raise ValueError(f"split {split!r}: expected dirichlet:ALPHA, class-disjoint or iid")


def run_setting(split: str, seed: int, specs: list, clients: int, max_examples: int,
                extra: dict[str, Any]) -> dict[str, Any]:
    """Train the clients once; aggregate their replies with every strategy; evaluate on the test split."""
    run_config = base_run_config(**{**SETTING, **split_overrides(split), "seed": seed,
                                    "max_examples_per_client": max_examples, **extra})
    task = TaskConfig.from_run_config(run_config)
    device = resolve_device(None)
    dataset = load_data(task.dataset, task.data_dir)
    model_fn = partial(make_model, task, dataset)
    seed_everything(derive_seed(task.seed))  # the ServerApp's initial model
    arrays = ArrayRecord(model_fn().state_dict())
    grid = InProcessGrid.of_app(project_client_app(), run_config, clients)
    loader = evaluation_loader(task, device)

    trainer = build_strategy(task, model_fn, device)  # any strategy: round 1 sends no statistics request
    seed_everything(derive_seed(task.seed, 1))
    messages = list(trainer.configure_train(1, arrays, ConfigRecord(), grid))
    for message in messages:  # every strategy merges the same replies: ask for what any teacher reads
        message.content[CONFIG_KEY][LABEL_COUNTS_FLAG] = True
    started = time.perf_counter()
    replies = grid.send_and_receive(messages)
    train_seconds = time.perf_counter() - started
    clients_models, weights = [], []
    for reply in replies:
        model = model_fn()
        model.load_state_dict(reply.content[WEIGHTS_KEY].to_torch_state_dict())
        clients_models.append(model)
        weights.append(float(reply.content[METRICS_KEY][NUM_EXAMPLES_KEY]))
    record: dict[str, Any] = {"split": split, "seed": seed, "train_seconds": train_seconds,
                              "num_examples": weights,
                              "ensemble": _ensemble_accuracy(clients_models, weights, loader, device, "probabilities"),
                              "ensemble_logits": _ensemble_accuracy(clients_models, weights, loader, device, "logits"),
                              "clients": [evaluate(m, loader, device=device)[1] for m in clients_models],
                              **_teacher_accuracies(clients_models, weights, replies, task, loader, device),
                              "strategies": {}}
    for spec in specs:
        config = dict(run_config)
        config.update({k.replace("_", "-"): v for k, v in spec.run_config().items()})
        strategy = build_strategy(TaskConfig.from_run_config(config), model_fn, device)
        strategy.configure_train(1, arrays, ConfigRecord(), grid)  # what the strategy would send (not sent)
        seed_everything(derive_seed(task.seed, 1, 7))
        started = time.perf_counter()
        merged, _ = strategy.aggregate_train(1, replies)
        seconds = time.perf_counter() - started
        model = model_fn()
        model.load_state_dict((merged or arrays).to_torch_state_dict())
        loss, accuracy = evaluate(model, loader, device=device)
        entry = {"accuracy": accuracy, "loss": loss, "aggregate_seconds": seconds}
        rounds = getattr(strategy, "rounds", None)
        if rounds:
            last = rounds[-1]
            entry.update(merge_choice=last.merge_choice, reference=last.reference,
                         candidates=[vars(c) for c in last.candidates], distillation=last.distillation)
        record["strategies"][spec.label] = entry
        logger.info("%s seed %d %-40s test %.4f (%s, %.1fs)", split, seed, spec.label, accuracy,
                    entry.get("merge_choice"), seconds)
    return record


def _ensemble_accuracy(models: list, weights: list[float], loader: Any, device: torch.device, kind: str) -> float:
    """Test accuracy of the examples-weighted average of the clients' probabilities (or logits)."""
    correct = total = 0
    for model in models:
        model.to(device).eval()
    with torch.no_grad():
        for x, y in loader:
            probs = sum(w * (torch.softmax(m(x), 1) if kind == "probabilities" else m(x))
                        for m, w in zip(models, weights))
            correct += (probs.argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def _teacher_accuracies(models: list, weights: list[float], replies: list, task: TaskConfig, loader: Any,
                        device: torch.device) -> dict[str, float]:
    """Test accuracy of the "label-counts" and "fitted" teachers (:mod:`fedcca.merging.teachers`) used as
    ensembles on the test images: what a student distilled toward them could at best reach."""
    x, y = (torch.cat(parts) for parts in zip(*loader))
    holdout = federation.holdout_set(task)
    teacher = TeacherSum(("label-counts", "fitted"), (1.0,), holdout_labels=holdout[1])
    for model, weight, reply in zip(models, weights, replies):
        counts = torch.tensor(list(reply.content[METRICS_KEY][LABEL_COUNTS_KEY]), dtype=torch.float64)
        teacher.add(holdout_logits(model, x, device=device), weight, label_counts=counts,
                    holdout_logits=holdout_logits(model, holdout[0], device=device))
    return {f"ensemble_{name.replace('-', '_')}": float((teacher.targets(name, 1.0).argmax(1) == y.cpu()).double().mean())
            for name in ("label-counts", "fitted")}


def summarise(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per split and strategy: mean, std, paired differences to FedAvg and to the probability ensemble
    (mean, SE, p), share of the ensemble."""
    out: dict[str, Any] = {}
    for split in dict.fromkeys(run["split"] for run in runs):
        group = [run for run in runs if run["split"] == split]
        ensemble = np.array([run["ensemble"] for run in group])
        entry: dict[str, Any] = {"seeds": [run["seed"] for run in group]}
        for key, _ in ENSEMBLES:
            values = np.array([run.get(key, math.nan) for run in group])
            entry[key] = [float(values.mean()), float(values.std())]
        base = np.array([run["strategies"]["fedavg"]["accuracy"] for run in group]) \
            if all("fedavg" in run["strategies"] for run in group) else None
        for label in labels:
            if not all(label in run["strategies"] for run in group):
                continue
            acc = np.array([run["strategies"][label]["accuracy"] for run in group])
            row: dict[str, Any] = {"mean": float(acc.mean()), "std": float(acc.std()),
                                   "of_ensemble": float((acc / ensemble).mean())}
            if base is not None and label != "fedavg" and len(acc) > 1:
                row["vs_fedavg"] = _paired(acc, base)
            if len(acc) > 1:
                row["vs_ensemble"] = _paired(acc, ensemble)
            entry[label] = row
        out[split] = entry
    return out


def _paired(acc: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Paired difference over seeds: mean, standard error, two-sided paired t-test p."""
    diff = acc - base
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    p = float(stats.ttest_rel(acc, base).pvalue) if se > 0 else (0.0 if diff.mean() else 1.0)
    return {"mean": float(diff.mean()), "se": float(se), "p": p}


def wide_table(payload: dict[str, Any]) -> str:
    """One row per strategy, one column group per split: test % (mean ± std), Δ vs FedAvg, share of the ensemble."""
    summary = payload["summary"]
    splits = list(summary)
    headers = ["strategy"] + [f"{split} {what}" for split in splits for what in ("test %", "Δ vs FedAvg", "of ens.")]
    rows = []
    for key, name in ENSEMBLES:
        rows.append([name] + [cell for split in splits
                              for cell in (f"{100 * summary[split][key][0]:.1f} ± {100 * summary[split][key][1]:.1f}",
                                           "", "")])
    for label in payload["strategies"]:
        row = [label]
        for split in splits:
            entry = summary[split].get(label)
            if entry is None:
                row += ["", "", ""]
                continue
            delta = entry.get("vs_fedavg")
            row += [f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}",
                    f"{100 * delta['mean']:+.1f} ± {100 * delta['se']:.1f} (p={delta['p']:.2f})" if delta else "",
                    f"{100 * entry['of_ensemble']:.0f}%"]
        rows.append(row)
    seeds = ", ".join(f"{split}: {len(summary[split]['seeds'])}" for split in splits)
    return markdown_table(headers, rows) + f"\n\nSeeds per split: {seeds}.\n"


def report(payload: dict[str, Any], path: Path) -> None:
    """Markdown: our table (mean ± std over seeds, paired difference to FedAvg) and the published one."""
    labels = payload["strategies"]
    summary = payload["summary"]
    lines = [f"# One-shot federated learning, Fashion-MNIST, {payload['clients']} clients", "",
             f"Ours: {payload['setting']}. Test accuracy %, mean ± std over seeds; "
             "Δ: paired difference to FedAvg or to the probability ensemble (mean ± SE, paired t-test p); "
             "of ensemble: share of the "
             "probability-average ensemble's accuracy, mean over seeds.", ""]
    rows = []
    for split, entry in summary.items():
        for key, name in ENSEMBLES:
            rows.append([split, name, f"{100 * entry[key][0]:.1f} ± {100 * entry[key][1]:.1f}", "", "", "",
                         len(entry["seeds"])])
        for label in labels:
            if label not in entry:
                continue
            row = entry[label]
            rows.append([split, label, f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}",
                         *(f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f} (p={d['p']:.3f})" if d else ""
                           for d in (row.get("vs_fedavg"), row.get("vs_ensemble"))),
                         f"{100 * row['of_ensemble']:.0f}%", len(entry["seeds"])])
    lines.append(markdown_table(["split", "strategy", "test %", "Δ vs FedAvg", "Δ vs ensemble", "of ensemble",
                                 "seeds"], rows))
    lines += ["", "The same, one column group per split:", "", wide_table(payload)]
    lines += ["", "Published (DENSE, Table 1; a CNN, 200 local epochs, 5 clients; Dir(0.1) / (0.3) / (0.5)):", ""]
    lines.append(markdown_table(["method", "Dir(0.1)", "Dir(0.3)", "Dir(0.5)"],
                                [[name, *(values[a] for a in (0.1, 0.3, 0.5))] for name, values in PUBLISHED.items()]))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", default="dirichlet:0.1,dirichlet:0.3,dirichlet:0.5,class-disjoint")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="ours",
                        help="ours (LeNet, 10 local epochs, shards capped) or dense (DENSE's protocol, cut: PRESETS)")
    parser.add_argument("--max-examples-per-client", type=int, default=None,
                        help="cap on each client's shard (0: whole shards; default 4000, which keeps 5 clients "
                             "within 20,000 images; the dense preset: 0)")
    add_overrides_argument(parser)
    add_runtime_arguments(parser, ROOT / "results" / "oneshot-fl" / "oneshot-fl.json")
    args, extra = parse_benchmark_args(parser, argv, logger)
    preset = dict(PRESETS[args.preset])
    if args.max_examples_per_client is None:
        args.max_examples_per_client = preset.get("max_examples_per_client", 4000)
    preset.pop("max_examples_per_client", None)
    extra = {**preset, **extra}
    specs = parse_strategies(args.strategies)
    labels = [spec.label for spec in specs]
    setting = {**SETTING, "max_examples_per_client": args.max_examples_per_client, **extra}
    payload = resumed(args.out, setting)
    runs = [run for run in payload.get("runs", [])
            if all(label in run["strategies"] for label in labels)]
    done = {(run["split"], run["seed"]) for run in runs}
    for split in parse_list(args.splits):
        for seed in parse_list(args.seeds, int):
            if (split, seed) in done:
                continue
            runs.append(run_setting(split, seed, specs, args.clients, args.max_examples_per_client, extra))
            payload = {"clients": args.clients, "setting": setting, "strategies": labels, "runs": runs,
                       "summary": summarise(runs, labels)}
            write_json(args.out, payload)
            report(payload, args.out.with_suffix(".md"))
    if runs:
        payload = {"clients": args.clients, "setting": setting, "strategies": labels, "runs": runs,
                   "summary": summarise(runs, labels)}
        write_json(args.out, payload)
        report(payload, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
