"""CCAMerge vs FedAvg (and FedProx) in federated training, through the product's own round loop.

Every run is ``server.server_app.run_federation`` (the ServerApp's round loop) over an
in-process grid whose nodes call the real ClientApp (``clients/client_app.py``): the
strategies, replies, merges and evaluation are the product's, without a SuperLink or Ray.
For one seed every strategy starts from the same initial model, the same client shards and
the same per-(round, client) training randomness; only the aggregation (and FedProx's
proximal term) differs. The global model is evaluated on the test split after every round.

A strategy is ``fedavg``, ``fedprox`` or ``METHOD[:REFERENCE[:STATS]]`` (CCAMerge's method,
reference and statistics source), each optionally followed by run-config overrides
``+KEY=VALUE``, e.g. ``cca`` (the default search: shrinkage towards FedAvg, with and without
REPAIR, chosen on held-out data), ``cca+shrinkage=1+repair=none`` (plain CCA Merge),
``permute:largest:server``. ``--preset niid-bench`` is Flower's niid_bench setting (10
clients, the LeNet-shaped ``lenet``, SGD lr 0.01 momentum 0.9 weight decay 1e-5, batch 64,
whole shards). Results are written after every run (JSON, a PNG of accuracy and one of the
paired difference to FedAvg per setting, a markdown summary); a rerun with the same
arguments skips the runs already in the JSON::

    python -m simulations.federated --preset niid-bench --partitioning dirichlet --alpha 0.5 \\
        --local-epochs 10 --strategies fedavg,cca --rounds 10 --seeds 0,1,2 \\
        --out results/federated/niid-dirichlet0.5-E10.json
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fedcca.app.task import parse_override
from fedcca.devices import resolve_device
from fedcca.flower.local_grid import InProcessGrid
from server.server_app import run_federation
from simulations.harness import (
    BASELINE,
    ROOT,
    Series,
    add_runtime_arguments,
    apply_runtime,
    base_run_config,
    line_plot,
    markdown_table,
    parse_list,
    parse_strategies,
    project_client_app,
    read_json,
    write_json,
)

PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # Flower's niid_bench baseline (NIID-Bench, Li et al. 2021), Fashion-MNIST.
    "niid-bench": {"model": "lenet", "lr": 0.01, "lr_schedule": "constant", "momentum": 0.9,
                   "weight_decay": 1e-5, "batch_size": 64, "max_examples_per_client": 0},
}
RUNS_DIR = ROOT / "outputs" / "federated-runs"  # each run's history.json and checkpoints


def run_one(run_config: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """One federation through ``run_federation``; accuracy per round (index 0 = initial model) and costs.

    Args:
        run_config: Full run config (as ``flwr run`` would pass it).
        num_clients: Number of nodes; all of them train every round.
    """
    grid = InProcessGrid.of_app(project_client_app(), run_config, num_clients)
    started = time.perf_counter()
    history = run_federation(grid, run_config)
    rounds = history["rounds"]
    return {
        "accuracy": [history["initial"]["accuracy"], *(r["accuracy"] for r in rounds)],
        "loss": [history["initial"]["loss"], *(r["loss"] for r in rounds)],
        "merge_choice": [r.get("merge_choice") for r in rounds],
        "merge_seconds": [r["merge_seconds"] for r in rounds],
        "server_stats_seconds": [r["stats_seconds"] for r in rounds],
        "distill_seconds": [(r.get("distillation") or {}).get("seconds", 0.0) for r in rounds],
        "distill_holdout": [[(r.get("distillation") or {}).get(k) for k in ("holdout_before", "holdout_after")]
                            for r in rounds],
        "client_train_seconds": [r.get("client_train_seconds") for r in rounds],
        "client_stats_seconds": [r.get("client_stats_seconds", 0.0) for r in rounds],
        "bytes_received_mean": [float(np.mean(list(r["bytes_received"].values()))) for r in rounds],
        "skipped_rounds": [r["round"] for r in rounds if r["skipped"]],
        "wall_seconds": time.perf_counter() - started,
    }


def rounds_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First round (>= 1) whose accuracy is at least ``target``; None if never reached.

    Args:
        curve: Accuracy per round, index 0 = initial model.
        target: Accuracy to reach.
    """
    return next((r for r in range(1, len(curve)) if curve[r] >= target - 1e-12), None)


def summarise(runs: list[dict[str, Any]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per strategy: accuracy per round over seeds, rounds to the baseline's final, paired differences.

    The baseline is FedAvg when compared, else the first strategy. "rounds_to_baseline_final"
    uses the mean curves; "seed_rounds_to_baseline_final" compares each seed with the
    baseline of the same seed. "paired_difference" is, per round, the mean over seeds of
    (strategy - baseline) accuracy of the same seed, with its standard error;
    "rounds_significantly_below" counts rounds where a two-sided paired t-test at 5% puts the
    difference below 0 (mean + t(0.975, seeds - 1) SE < 0).

    Args:
        runs: Records of :func:`run_one` with "strategy" and "seed" added.
        labels: Strategy labels, in display order.
    """
    baseline = BASELINE if BASELINE in labels else labels[0]
    curves = {label: {run["seed"]: run["accuracy"] for run in runs if run["strategy"] == label} for label in labels}
    base_curves = curves[baseline]
    base_mean = np.mean(list(base_curves.values()), axis=0) if base_curves else None
    summary: dict[str, dict[str, Any]] = {}
    for label in labels:
        if not curves[label]:
            continue
        stacked = np.array(list(curves[label].values()))
        mean = stacked.mean(axis=0)
        entry: dict[str, Any] = {
            "seeds": sorted(curves[label]),
            "mean_accuracy": mean.tolist(),
            "std_accuracy": stacked.std(axis=0).tolist(),
            "min_accuracy": stacked.min(axis=0).tolist(),
            "max_accuracy": stacked.max(axis=0).tolist(),
            "final_accuracy": float(mean[-1]),
            "best_accuracy": float(mean[1:].max()),
            "baseline": baseline,
        }
        paired = [seed for seed in curves[label] if seed in base_curves]
        if base_mean is not None and len(base_mean) == len(mean):
            entry["rounds_to_baseline_final"] = rounds_to_reach(mean, float(base_mean[-1]))
            entry["seed_rounds_to_baseline_final"] = {
                str(seed): rounds_to_reach(curves[label][seed], base_curves[seed][-1]) for seed in paired}
        if paired and label != baseline:
            diff = np.array([np.subtract(curves[label][s], base_curves[s]) for s in paired])
            se = diff.std(axis=0, ddof=1) / math.sqrt(len(paired)) if len(paired) > 1 else np.zeros(diff.shape[1])
            entry["paired_difference"] = {"mean": diff.mean(axis=0).tolist(), "se": se.tolist(),
                                          "seeds": len(paired)}
            critical = float(stats.t.ppf(0.975, len(paired) - 1)) if len(paired) > 1 else math.nan
            entry["paired_difference"]["t_critical"] = critical
            entry["rounds_significantly_below"] = int(((diff.mean(axis=0) + critical * se) < 0)[1:].sum()) \
                if len(paired) > 1 else None
        summary[label] = entry
    return summary


def setting_table(summary: dict[str, dict[str, Any]], rounds: int) -> str:
    """Markdown table of one setting: accuracy at chosen rounds, best, rounds to the baseline's final, paired gain."""
    shown = sorted({1, max(1, rounds // 4), max(1, rounds // 2), rounds})
    baseline = next(iter(summary.values()))["baseline"]
    headers = ["strategy", "seeds", *[f"acc@{r}" for r in shown], "best", f"rounds to {baseline} final",
               f"final - {baseline} (paired)", "rounds signif. below"]
    rows = []
    for label, entry in summary.items():
        cells = [f"{100 * entry['mean_accuracy'][r]:.1f} ± {100 * entry['std_accuracy'][r]:.1f}" for r in shown]
        reached = entry.get("rounds_to_baseline_final")
        diff = entry.get("paired_difference")
        gain = "-" if diff is None else f"{100 * diff['mean'][-1]:+.1f} ± {100 * diff['se'][-1]:.1f}"
        rows.append([label, len(entry["seeds"]), *cells, f"{100 * entry['best_accuracy']:.1f}",
                     "not reached" if reached is None else reached, gain, entry.get("rounds_significantly_below")])
    return markdown_table(headers, rows)


def plot_setting(stem: Path, title: str, summary: dict[str, dict[str, Any]]) -> list[str]:
    """Two PNGs: accuracy per round (mean, band = min..max over seeds) and the paired difference to the baseline."""
    accuracy = [Series(label, range(len(e["mean_accuracy"])), np.multiply(100, e["mean_accuracy"]),
                       np.multiply(100, e["min_accuracy"]), np.multiply(100, e["max_accuracy"]))
                for label, e in summary.items()]
    line_plot(stem.with_name(stem.name + ".png"), accuracy, title=title, xlabel="round", ylabel="test accuracy (%)")
    names = [stem.name + ".png"]
    differences = [Series(label, range(len(e["paired_difference"]["mean"])),
                          np.multiply(100, e["paired_difference"]["mean"]),
                          np.multiply(100, np.subtract(e["paired_difference"]["mean"], e["paired_difference"]["se"])),
                          np.multiply(100, np.add(e["paired_difference"]["mean"], e["paired_difference"]["se"])))
                   for label, e in summary.items() if "paired_difference" in e]
    if differences:
        path = stem.with_name(stem.name + "-difference.png")
        baseline = next(iter(summary.values()))["baseline"]
        line_plot(path, differences, title=f"{title}: minus {baseline}, same seed (band: ±1 SE)", xlabel="round",
                  ylabel="accuracy difference (points)")
        names.append(path.name)
    return names


def _setting_name(args: argparse.Namespace) -> str:
    if args.partitioning == "dirichlet":
        return f"Dirichlet({args.alpha:g})"
    if args.partitioning == "label-quantity":
        return f"#C={args.labels_per_client}"
    return args.partitioning


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="none", help="run-config preset")
    parser.add_argument("--partitioning", default="dirichlet", help="iid | dirichlet | label-quantity | class-disjoint")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--labels-per-client", type=int, default=2, help="label-quantity: labels per client")
    parser.add_argument("--local-epochs", default="1", help="comma-separated; one setting each")
    parser.add_argument("--strategies", default="fedavg,cca", help="comma-separated (see the module docstring)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train-subset", type=int, default=0,
                        help="training images in total: each client trains on at most train-subset // num-clients "
                             "examples of its shard (0: whole shards, or the preset's choice)")
    parser.add_argument("--calibration-size", type=int, default=500)
    parser.add_argument("--holdout-size", type=int, default=500)
    parser.add_argument("--test-examples", type=int, default=0, help="first N test images (0: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any run-config key, e.g. --set lr=0.02 (repeatable; after the preset)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where each run's own outputs go")
    parser.add_argument("--baseline-from", type=Path, default=None, metavar="JSON",
                        help="reuse the FedAvg runs of this earlier results file (same setting, seeds and run "
                             "config but CCAMerge's keys, which FedAvg does not read) instead of running FedAvg")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite tables and plots from the runs already in --out")
    add_runtime_arguments(parser, Path("results/federated/federated.json"))
    return parser


def _common_config(args: argparse.Namespace) -> dict[str, Any]:
    common: dict[str, Any] = dict(PRESETS[args.preset])
    common.update(partitioning=args.partitioning, alpha=args.alpha, labels_per_client=args.labels_per_client,
                  num_server_rounds=args.rounds, min_nodes=args.num_clients,
                  calibration_size=args.calibration_size, holdout_size=args.holdout_size,
                  max_test_examples=args.test_examples, data_dir=args.data_dir)
    if args.train_subset:
        common["max_examples_per_client"] = args.train_subset // args.num_clients
    for item in args.overrides:
        key, value = parse_override(item)
        common[key.replace("-", "_")] = value
    return common


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison described by the command line; write JSON, PNGs and markdown; return the JSON."""
    args = _parser().parse_args(argv)
    blas_threads = apply_runtime(args)
    logging.getLogger("flwr").setLevel(logging.INFO)  # the ServerApp's per-round progress lines
    specs = parse_strategies(args.strategies)
    labels = [spec.label for spec in specs]
    seeds = parse_list(args.seeds, int)
    common = _common_config(args)
    config = {**common, "preset": args.preset, "num_clients": args.num_clients, "seeds": seeds,
              "strategies": labels, "threads": args.threads, "device": str(resolve_device(None)),
              "platform": platform.platform(), "openblas_threads": blas_threads}
    previous = read_json(args.out)
    earlier = [run for setting in (previous or {}).get("settings", []) for run in setting["runs"]
               if len(run["accuracy"]) == args.rounds + 1]
    if args.baseline_from is not None:
        have = {(run["local_epochs"], run["strategy"], run["seed"]) for run in earlier}
        earlier += [run for run in baseline_runs(args.baseline_from, args, config)
                    if (run["local_epochs"], run["strategy"], run["seed"]) not in have]
    done = {(run["local_epochs"], run["strategy"], run["seed"]): run for run in earlier}
    payload: dict[str, Any] = {
        "command": "python -m simulations.federated " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config, "settings": []}
    if previous is not None and args.report_only:
        payload.update(command=previous["command"], config=previous["config"])
        if "earlier_commands" in previous:
            payload["earlier_commands"] = previous["earlier_commands"]
    elif previous is not None:
        payload["earlier_commands"] = [*previous.get("earlier_commands", []), previous["command"]]
    if args.baseline_from is not None:
        payload["baseline_from"] = {"file": str(args.baseline_from), "command": read_json(args.baseline_from)["command"]}
    report = []
    for epochs in parse_list(args.local_epochs, int):
        # Runs of this setting from an earlier invocation (other strategies or seeds) are kept.
        setting = {"partitioning": args.partitioning, "alpha": args.alpha,
                   "labels_per_client": args.labels_per_client, "local_epochs": epochs,
                   "runs": [run for key, run in done.items() if key[0] == epochs
                            and not (key[1] in labels and key[2] in seeds)]}
        shown = list(dict.fromkeys([*labels, *(run["strategy"] for run in setting["runs"])]))
        payload["settings"].append(setting)
        title = f"{_setting_name(args)}, {args.num_clients} clients, E={epochs}"
        for seed in seeds:
            for spec in specs:
                key = (epochs, spec.label, seed)
                if key in done:
                    setting["runs"].append(done[key])
                    continue
                if args.report_only:
                    continue
                out_dir = args.runs_dir / args.out.stem / f"{spec.label}-E{epochs}-s{seed}"
                run_config = base_run_config(**common, **spec.run_config(), local_epochs=epochs, seed=seed,
                                             out_dir=str(out_dir))
                record = {"strategy": spec.label, "seed": seed, "local_epochs": epochs,
                          **run_one(run_config, args.num_clients)}
                setting["runs"].append(record)
                print(f"[{title}] {spec.label} seed {seed}: accuracy "
                      + " ".join(f"{100 * a:.1f}" for a in record["accuracy"])
                      + f" ({record['wall_seconds']:.0f} s)", flush=True)
                _finish_setting(setting, shown, args, title)
                write_json(args.out, payload)  # after every run: a killed benchmark keeps what it finished
        setting["runs"].sort(key=lambda run: (run["seed"], shown.index(run["strategy"])))
        _finish_setting(setting, shown, args, title)
        write_json(args.out, payload)
        report.append(f"### {title} (test accuracy %, mean ± std over seeds {sorted({r['seed'] for r in setting['runs']})})\n\n"
                      + setting_table(setting["summary"], args.rounds))
    text = "\n\n".join(report) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    return payload


# FedAvg's runs depend on these keys only (CCAMerge's own keys, e.g. the weight cap, it never reads)
_BASELINE_KEYS = ("model", "lr", "lr_schedule", "momentum", "weight_decay", "batch_size", "max_examples_per_client",
                  "partitioning", "alpha", "labels_per_client", "num_server_rounds", "min_nodes", "calibration_size",
                  "holdout_size", "max_test_examples", "num_clients")


def baseline_runs(path: Path, args: argparse.Namespace, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The FedAvg runs of the results file ``path`` that belong to this command's setting.

    Raises:
        SystemExit: The file is missing, or its run config differs from this command's in a key FedAvg reads.
    """
    earlier = read_json(path)
    if earlier is None:
        raise SystemExit(f"--baseline-from: {path} does not exist")
    differ = [key for key in _BASELINE_KEYS if earlier["config"].get(key) != config.get(key)]
    if differ:
        raise SystemExit(f"--baseline-from: {path} ran another setting ({', '.join(differ)} differ)")
    return [run for setting in earlier["settings"] for run in setting["runs"]
            if run["strategy"] == BASELINE and len(run["accuracy"]) == args.rounds + 1
            and all(setting[key] == getattr(args, key) for key in ("partitioning", "alpha", "labels_per_client"))]


def _finish_setting(setting: dict[str, Any], labels: Sequence[str], args: argparse.Namespace, title: str) -> None:
    setting["summary"] = summarise(setting["runs"], labels)
    several = len(parse_list(args.local_epochs, int)) > 1  # one plot per setting; else named as --out
    stem = args.out.with_name(f"{args.out.stem}-E{setting['local_epochs']}" if several else args.out.stem)
    setting["plots"] = plot_setting(stem, title, setting["summary"])


if __name__ == "__main__":
    main()
