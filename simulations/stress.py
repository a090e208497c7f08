"""Rounds under stress: CCAMerge's defaults against FedAvg where label skew makes training fragile.

Every run is the product's round loop over the real ClientApp (:func:`simulations.federated.run_one`),
10 clients, all trained every round, the app's defaults otherwise. A setting is a split
(#C=1, #C=2, Dirichlet(0.05), Dirichlet(0.1)), a learning rate and a number of local epochs;
per setting and strategy the table reports the last round's test accuracy, the worst round,
**collapses** (a round at chance, i.e. below 15%, while FedAvg's same round of the same seed is
not; beside it, how many FedAvg runs are ever at chance after round 1, the collapses counted in the
seeds where FedAvg never is, and the count mirrored: FedAvg's rounds at chance where the strategy's are
not, the noise floor of the count), diverged clients (replies whose local training diverged), honest replies the screen
dropped in round 1, and the collapse guard's actions. Runs are written after each one and a
rerun skips those done, so the benchmark can be stopped and resumed::

    python -m simulations.stress --splits C2,C1,D0.05,D0.1 --lrs 0.05,0.01,0.1 --epochs 2,1,5 \\
        --seeds 0,1,2 --strategies fedavg,cca --out results/stress/stress.json

Settings run in the order given (splits, then learning rates, then epochs, then seeds), so
the most telling ones can go first when the machine's time is short.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from simulations.federated import run_one
from simulations.harness import (
    ROOT,
    add_runtime_arguments,
    apply_runtime,
    base_run_config,
    markdown_table,
    parse_list,
    parse_strategies,
    read_json,
    write_json,
)

SPLITS: dict[str, dict[str, Any]] = {
    "C1": {"partitioning": "label-quantity", "labels_per_client": 1},
    "C2": {"partitioning": "label-quantity", "labels_per_client": 2},
    "D0.05": {"partitioning": "dirichlet", "alpha": 0.05},
    "D0.1": {"partitioning": "dirichlet", "alpha": 0.1},
}
CHANCE = 0.15
"""A round at or below this test accuracy (10 classes) is at chance."""
RUNS_DIR = ROOT / "outputs" / "stress-runs"


def _key(run: dict[str, Any]) -> tuple:
    return run["split"], run["lr"], run["local_epochs"], run["seed"], run["strategy"]


def summarise(runs: list[dict[str, Any]], baseline: str = "fedavg") -> list[dict[str, Any]]:
    """One row per (split, lr, epochs, strategy): means over seeds, collapses, divergences, drops, paired test."""
    rows = []
    settings = sorted({(r["split"], r["lr"], r["local_epochs"]) for r in runs})
    for split, lr, epochs in settings:
        mine = [r for r in runs if (r["split"], r["lr"], r["local_epochs"]) == (split, lr, epochs)]
        base = {r["seed"]: r for r in mine if r["strategy"] == baseline}
        for strategy in sorted({r["strategy"] for r in mine}, key=lambda s: (s != baseline, s)):
            ours = [r for r in mine if r["strategy"] == strategy]
            last = [r["accuracy"][-1] for r in ours]
            paired = [(r["accuracy"][-1], base[r["seed"]]["accuracy"][-1]) for r in ours if r["seed"] in base]
            diff = [a - b for a, b in paired]
            p = float(stats.ttest_rel(*zip(*paired)).pvalue) if len(paired) >= 2 and np.std(diff) > 0 else math.nan
            collapses = _collapses(ours, base)
            # the same count with the roles swapped: where FedAvg is itself at chance now and then, a round at
            # chance beside a FedAvg round above it says as much about FedAvg's noise as about the strategy
            mirrored = _collapses([base[r["seed"]] for r in ours if r["seed"] in base], {r["seed"]: r for r in ours})
            healthy = {seed: run for seed, run in base.items() if min(run["accuracy"][1:]) > CHANCE}
            rows.append({
                "split": split, "lr": lr, "local_epochs": epochs, "strategy": strategy, "seeds": len(ours),
                "last": float(np.mean(last)), "worst": float(np.mean([min(r["accuracy"][1:]) for r in ours])),
                "diff_last": float(np.mean(diff)) if diff else math.nan, "p": p, "collapses": collapses,
                "collapses_fedavg_healthy": _collapses([r for r in ours if r["seed"] in healthy], healthy),
                "fedavg_collapses_mirrored": mirrored,
                "fedavg_runs_at_chance": len(base) - len(healthy),
                "diverged": sum(r["diverged"] for r in ours), "round1_screened": sum(r["round1_screened"] for r in ours),
                "guard": sum(len(r["guard"]) for r in ours)})
    return rows


def _collapses(runs: list[dict[str, Any]], base: dict[int, dict[str, Any]]) -> int:
    """Rounds (after the first model) at chance in ``runs`` while the same round of ``base``'s run of the same
    seed is not."""
    return sum(1 for r in runs for i, acc in enumerate(r["accuracy"][1:], 1)
               if acc <= CHANCE and r["seed"] in base and base[r["seed"]]["accuracy"][i] > CHANCE)


def table(rows: list[dict[str, Any]]) -> str:
    """The summary as markdown (accuracy in %)."""
    return markdown_table(
        ["split", "lr", "E", "strategy", "seeds", "last round %", "worst round %", "last - FedAvg (pts)", "p (paired t)",
         "collapses", "FedAvg runs ever at chance", "collapses where FedAvg never is", "FedAvg's collapses, mirrored",
         "diverged clients", "round-1 screened", "guard actions"],
        [[r["split"], r["lr"], r["local_epochs"], r["strategy"], r["seeds"], 100 * r["last"], 100 * r["worst"],
          100 * r["diff_last"], r["p"], r["collapses"], r.get("fedavg_runs_at_chance", ""),
          r.get("collapses_fedavg_healthy", ""), r.get("fedavg_collapses_mirrored", ""), r["diverged"],
          r["round1_screened"], r["guard"]]
         for r in rows])


def _one(split: str, lr: float, epochs: int, seed: int, spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    out_dir = args.runs_dir / args.out.stem / f"{split}-lr{lr:g}-E{epochs}-{spec.label}-s{seed}"
    config = base_run_config(**SPLITS[split], lr=lr, local_epochs=epochs, seed=seed, num_server_rounds=args.rounds,
                             min_nodes=2, data_dir=args.data_dir, out_dir=str(out_dir), **spec.run_config())
    shutil.rmtree(out_dir, ignore_errors=True)  # this benchmark's own folder: the run's files are read below
    result = run_one(config, args.num_clients)
    rounds = read_json(out_dir / "history.json")["rounds"]  # type: ignore[index]
    reasons = [list(r["dropped"].values()) for r in rounds]
    return {"split": split, "lr": lr, "local_epochs": epochs, "seed": seed, "strategy": spec.label,
            "accuracy": result["accuracy"], "merge_choice": result["merge_choice"],
            "diverged": sum("local training diverged" in reason or "TrainingDivergedError" in reason
                            for per_round in reasons for reason in per_round),
            "round1_screened": sum("screen bound" in reason for reason in reasons[0]) if reasons else 0,
            "guard": [r["guard"] for r in rounds if (r.get("guard") or {}).get("action") in ("rollback", "keep",
                                                                                              "probation")],
            "wall_seconds": result["wall_seconds"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the settings on the command line that are not in ``--out`` yet; write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--splits", default="C2,C1,D0.05,D0.1", help=f"comma-separated among {list(SPLITS)}")
    parser.add_argument("--lrs", default="0.05,0.01,0.1")
    parser.add_argument("--epochs", default="2,1,5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="fedavg,cca", help="as simulations.federated --strategies")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    add_runtime_arguments(parser, Path("results/stress/stress.json"))
    args = parser.parse_args(argv)
    apply_runtime(args)
    specs = parse_strategies(args.strategies)
    payload = read_json(args.out) or {"runs": []}
    done = {_key(run) for run in payload["runs"]}
    command = "python -m simulations.stress " + " ".join(argv if argv is not None else sys.argv[1:])
    payload.setdefault("commands", [])
    if command not in payload["commands"]:
        payload["commands"].append(command)
    for split, lr, epochs, seed in itertools.product(parse_list(args.splits), parse_list(args.lrs, float),
                                                     parse_list(args.epochs, int), parse_list(args.seeds, int)):
        for spec in specs:
            if (split, lr, epochs, seed, spec.label) in done:
                continue
            run = _one(split, lr, epochs, seed, spec, args)
            payload["runs"].append(run)
            print(f"[stress] {split} lr {lr:g} E {epochs} seed {seed} {spec.label}: "
                  + " ".join(f"{100 * a:.1f}" for a in run["accuracy"]) + f" diverged {run['diverged']}"
                  f" screened {run['round1_screened']} guard {len(run['guard'])} ({run['wall_seconds']:.0f} s)",
                  flush=True)
            payload["summary"] = summarise(payload["runs"])
            write_json(args.out, payload)
            args.out.with_suffix(".md").write_text(table(payload["summary"]) + "\n")
    payload["summary"] = summarise(payload["runs"])
    write_json(args.out, payload)
    args.out.with_suffix(".md").write_text(table(payload["summary"]) + "\n")
    print(table(payload["summary"]), flush=True)
    return payload


if __name__ == "__main__":
    main()
