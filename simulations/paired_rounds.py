"""Per-round comparison of federated runs kept in different results files of ``simulations.federated``.

A benchmark run with another client option (``--set outlier-exposure=1``) writes its own file;
this reads the runs of one strategy from each file, pairs them by seed and writes, per round, the
mean accuracy of each, the paired differences asked for (mean, SE, two-sided paired t-test p) and
the first round at which each mean curve reaches a target (a strategy's mean accuracy at a round)::

    python -m simulations.paired_rounds \\
        --run "fedavg=results/federated/teachers-c2-E5.json:fedavg" \\
        --run "fedavg+OE=results/federated/outliers-c2-E5-fed.json:fedavg" \\
        --pair "fedavg+OE-fedavg" --target fedavg@6 --rounds 4 --out results/federated/outliers-c2-E5.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from simulations.federated import rounds_to_reach
from simulations.harness import markdown_table


def load_curves(path: Path, strategy: str) -> dict[int, list[float]]:
    """Accuracy per round (index 0: the initial model) of ``strategy``'s runs in ``path``, by seed.

    Raises:
        ValueError: The file holds no run of ``strategy``, or two runs of one seed.
    """
    payload = json.loads(path.read_text())
    curves: dict[int, list[float]] = {}
    for setting in payload.get("settings", []):
        for run in setting.get("runs", []):
            if run.get("strategy") != strategy:
                continue
            if run["seed"] in curves:
                raise ValueError(f"{path}: two runs of {strategy!r} with seed {run['seed']} (one setting per file)")
            curves[int(run["seed"])] = [float(a) for a in run["accuracy"]]
    if not curves:
        raise ValueError(f"{path}: no run of strategy {strategy!r}")
    return curves


def paired(a: dict[int, list[float]], b: dict[int, list[float]], rounds: int) -> list[dict[str, float]]:
    """Per round 1..``rounds``: mean and SE over the seeds both hold of ``a - b``, and the paired t-test p."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"pairing needs two seeds or more in common, got {seeds}")
    out = []
    for r in range(1, rounds + 1):
        x, y = np.array([a[s][r] for s in seeds]), np.array([b[s][r] for s in seeds])
        diff = x - y
        se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        p = float(stats.ttest_rel(x, y).pvalue) if se > 0 else (0.0 if diff.mean() else 1.0)
        out.append({"mean": float(diff.mean()), "se": se, "p": p, "seeds": len(seeds)})
    return out


def _spec(text: str, sep: str, what: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left or not right:
        raise ValueError(f"{what} {text!r}: expected LEFT{sep}RIGHT")
    return left, right


def report(runs: dict[str, dict[int, list[float]]], pairs: Sequence[tuple[str, str]], target: tuple[str, int] | None,
           rounds: int) -> str:
    """Markdown: mean ± std per round of every run, rounds to the target, and the paired differences."""
    goal = None
    if target is not None:
        name, at = target
        goal = float(np.mean([curve[at] for curve in runs[name].values()]))
    rows = []
    for name, curves in runs.items():
        stacked = np.array([curve[:rounds + 1] for curve in curves.values()])
        mean, std = stacked.mean(0), stacked.std(0)
        reached = rounds_to_reach(mean.tolist(), goal) if goal is not None else None
        rows.append([name, len(curves), *(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(mean[1:], std[1:])),
                     "" if goal is None else (reached if reached is not None else f"> {rounds}")])
    headers = ["run", "seeds", *(f"acc@{r}" for r in range(1, rounds + 1)),
               "rounds to target" if goal is None else f"rounds to {100 * goal:.1f}% ({target[0]} @ {target[1]})"]
    lines = [markdown_table(headers, rows), ""]
    if pairs:
        pair_rows = [[f"{a} − {b}", *(f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f} (p={d['p']:.2f})"
                                       for d in paired(runs[a], runs[b], rounds))] for a, b in pairs]
        lines += [markdown_table(["paired difference (points)", *(f"round {r}" for r in range(1, rounds + 1))],
                                 pair_rows), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=FILE:STRATEGY (repeatable)")
    parser.add_argument("--pair", action="append", default=[], help="NAME_A-NAME_B: paired A - B per round")
    parser.add_argument("--target", default=None, help="NAME@ROUND: its mean accuracy at that round")
    parser.add_argument("--rounds", type=int, required=True, help="rounds to compare (every run must have them)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: print only)")
    args = parser.parse_args(argv)
    runs: dict[str, dict[int, list[float]]] = {}
    for text in args.run:
        name, source = _spec(text, "=", "--run")
        path, strategy = _spec(source, ":", "--run")
        runs[name] = load_curves(Path(path), strategy)
        short = [s for s, curve in runs[name].items() if len(curve) <= args.rounds]
        if short:
            raise ValueError(f"--run {name}: seeds {short} have fewer than {args.rounds} rounds")
    pairs = []
    for text in args.pair:
        # names may hold '-': split at the first '-' that leaves two known names
        match = [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == "-"
                 and text[:i] in runs and text[i + 1:] in runs]
        if not match:
            raise ValueError(f"--pair {text!r}: expected NAME_A-NAME_B among {sorted(runs)}")
        pairs.append(match[0])
    target = None
    if args.target is not None:
        name, at = _spec(args.target, "@", "--target")
        if name not in runs:
            raise ValueError(f"--target {args.target!r}: unknown run {name!r}")
        target = (name, int(at))
    command = shlex.join(["python", "-m", "simulations.paired_rounds", *(sys.argv[1:] if argv is None else argv)])
    text = report(runs, pairs, target, args.rounds) + f"\nCommand: `{command}`\n"
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
