"""One-shot merging benchmark: K independently initialised models merged once, all-to-one.

Example::

    python -m simulations.oneshot --dataset fashion-mnist --model cnn --width 1 \\
        --num-models 2,4,8 --epochs 2 --split same --methods direct,permute,weight-matching,cca \\
        --seeds 0,1,2 --train-subset 6000 --calibration-size 1000 --out results/oneshot/same.json

Models come from :mod:`simulations.zoo` (trained once, cached under ``outputs/zoo``). The
calibration set (held out of the training split) is cut in two class-mixed halves: the
*fit* half feeds statistics, repair and BatchNorm; the labelled *held-out* half only chooses
hyper-parameters (e.g. the CCA ridge). The test split is used for the reported accuracies
only. Methods are names of :data:`fedcca.merging.selection.VARIANTS`; the references ``ensemble``
(mean of the K models' logits) and ``base-average`` (mean accuracy of the K models) are
always reported. Writes ``{"rows": [...], "config": {...}}`` and a PNG beside the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcca.data import Dataset, DeviceLoader, load_dataset, normalize
from fedcca.flower.records import jsonable
from fedcca.merging.merger import merge_with_result
from fedcca.merging.selection import VARIANTS, get_variant
from fedcca.methods.cca import DEFAULT_RIDGES
from fedcca.plotting import atomic_write
from fedcca.spec.tracing import spec_for
from fedcca.statistics import PairStatistics, collect_statistics
from simulations.harness import (
    Series,
    add_runtime_arguments,
    apply_runtime,
    line_plot,
    mean_std,
    parse_list,
    write_json,
)
from simulations.harness import markdown_table as table
from simulations.zoo import ZOO_DIR, ZooSpec, load_or_train, zoo_data

logger = logging.getLogger(__name__)
REFERENCES = ("ensemble", "base-average")
RESULT_CACHE = Path(__file__).resolve().parents[1] / "outputs" / "oneshot-cache.json"


@dataclass
class Group:
    """K trained models of one seed with the data to merge and evaluate them.

    Args:
        models: The K models (model 0 is the reference).
        keys: Their zoo keys (identify cached test logits).
        fit: Calibration inputs used for statistics, repair and BatchNorm.
        holdout: Labelled calibration inputs used only for hyper-parameter selection.
    """

    models: list[nn.Module]
    keys: list[str]
    fit: torch.Tensor
    holdout: tuple[torch.Tensor, torch.Tensor]


class Evaluator:
    """Test-split accuracy, with each zoo model's test logits computed once.

    Args:
        dataset: The dataset whose test split is used.
        test_subset: Evaluate on the first N test examples (0 = all).
    """

    def __init__(self, dataset: Dataset, test_subset: int = 0) -> None:
        indices = None if not test_subset else np.arange(min(test_subset, len(dataset.test_labels)))
        self.loader = DeviceLoader.from_dataset(dataset, indices, 1000, train=False, device="cpu")
        self.labels = torch.cat([y for _, y in self.loader])
        self._logits: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def logits(self, model: nn.Module, key: str | None = None) -> torch.Tensor:
        """Test logits of ``model`` (cached under ``key`` when given)."""
        if key is not None and key in self._logits:
            return self._logits[key]
        model.eval()
        out = torch.cat([model(x) for x, _ in self.loader])
        if key is not None:
            self._logits[key] = out
        return out

    def accuracy(self, logits: torch.Tensor) -> float:
        """Fraction of test examples whose arg-max logit is the label."""
        return float((logits.argmax(1) == self.labels).double().mean())


def split_calibration(dataset: Dataset, calibration: np.ndarray, seed: int,
                      holdout_fraction: float = 0.5) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Cut the calibration set into a fit part and a labelled held-out part (random, by seed).

    Args:
        dataset: The dataset.
        calibration: Calibration indices into the training split.
        seed: Seed of the cut.
        holdout_fraction: Share of the calibration examples held out for selection.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    order = np.random.default_rng(20_000 + seed).permutation(calibration)
    cut = len(order) - int(round(holdout_fraction * len(order)))
    images = normalize(dataset.train_images[torch.as_tensor(order)], dataset)
    return images[:cut], (images[cut:], dataset.train_labels[torch.as_tensor(order[cut:])])


def load_group(dataset: Dataset, spec: ZooSpec, num_models: int, holdout_fraction: float = 0.5,
               zoo_dir: Path = ZOO_DIR) -> Group:
    """Train or load the first ``num_models`` models of ``spec`` and cut its calibration set.

    Args:
        dataset: The dataset.
        spec: Zoo settings (its ``num_models`` is replaced by ``num_models``).
        num_models: K.
        holdout_fraction: Share of the calibration set held out for selection.
        zoo_dir: Checkpoint folder.
    """
    spec = dataclasses.replace(spec, num_models=num_models)
    data = zoo_data(dataset, spec)
    models = [load_or_train(dataset, spec, k, data, zoo_dir)[0] for k in range(num_models)]
    fit, holdout = split_calibration(dataset, data.calibration, spec.seed, holdout_fraction)
    return Group(models, [spec.key(k) for k in range(num_models)], fit, holdout)


def reference_rows(group: Group, evaluator: Evaluator) -> dict[str, float]:
    """Accuracies of the ensemble (mean logits) and the mean of the individual accuracies."""
    logits = [evaluator.logits(m, key) for m, key in zip(group.models, group.keys)]
    return {"ensemble": evaluator.accuracy(torch.stack(logits).mean(0)),
            "base-average": float(np.mean([evaluator.accuracy(z) for z in logits]))}


def group_statistics(group: Group) -> list[dict[str, PairStatistics] | None]:
    """Statistics of every model against model 0 on the fit data (None for model 0)."""
    spec = spec_for(group.models[0])
    stats = collect_statistics(group.models[0], group.models[1:], group.fit, spec, device="cpu")
    return [None, *stats]


def _cache_key(group: Group, method: str, evaluator: Evaluator) -> str:
    """Identifies one merge result: the models, the calibration cut, the method (with the library's
    default ridges, which ``ridges=(None,)`` stands for) and the test set. Code changes are not
    part of the key: clear the cache after changing the merging code."""
    variant = get_variant(method)
    return json.dumps([group.keys, int(group.fit.shape[0]), int(group.holdout[0].shape[0]),
                       float(group.fit.double().sum()), str(dataclasses.asdict(variant)), DEFAULT_RIDGES,
                       int(len(evaluator.labels))], sort_keys=True)


def run_method(group: Group, method: str, evaluator: Evaluator,
               statistics: Sequence[dict[str, PairStatistics] | None] | None = None,
               cache: Path | None = RESULT_CACHE) -> dict:
    """Merge the group with ``method`` (a :data:`VARIANTS` name) and measure test accuracy.

    Results are memoised in ``cache`` (a JSON file under outputs/, keyed by the models, the
    calibration cut, the variant's full settings and the test-set size) so that the one-shot
    and ablation scripts share runs; ``cache=None`` always recomputes.

    Returns:
        ``{"accuracy", "chosen" (the searched fields' chosen values), "holdout_scores", "seconds"}``.
    """
    key = _cache_key(group, method, evaluator)
    stored = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if key in stored:
        return stored[key]
    start = time.perf_counter()
    search = get_variant(method)
    report = merge_with_result(group.models, group.fit, search, holdout=group.holdout, statistics=statistics,
                               device="cpu")
    seconds = time.perf_counter() - start
    names = [name for name, _ in search.grid]
    chosen = {name: getattr(report.config, name) for name in names}
    scores = [{**dataclasses.asdict(score), **{name: getattr(candidate, name) for name in names}}
              for score, candidate in zip(report.scores, search.candidates())]
    result = {"accuracy": evaluator.accuracy(evaluator.logits(report.model)), "chosen": jsonable(chosen),
              "holdout_scores": [jsonable(score) for score in scores], "seconds": seconds}
    if cache is not None:
        stored = json.loads(cache.read_text()) if cache.exists() else {}  # re-read: another run may have written
        stored[key] = result
        atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(stored)))
    return result


def summarise(per_seed: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """Rows ``{method, num_models, accuracy_mean, accuracy_std, accuracies, ...}`` (std: sample std)."""
    rows = []
    for (method, k), runs in per_seed.items():
        accs = [r["accuracy"] for r in runs]
        row = {"method": method, "num_models": k, "accuracy_mean": float(np.mean(accs)),
               "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
               "accuracies": accs, "seeds": [r["seed"] for r in runs]}
        if "chosen" in runs[0]:
            row["chosen"] = [r["chosen"] for r in runs]
            row["merge_seconds_mean"] = float(np.mean([r["seconds"] for r in runs]))
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy vs number of models, one line per method (mean +- std over seeds)."""
    series = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["num_models"])
        mean = np.array([100 * r["accuracy_mean"] for r in mine])
        std = np.array([100 * r["accuracy_std"] for r in mine])
        series.append(Series(method, [r["num_models"] for r in mine], mean, mean - std, mean + std,
                             dashed=method in REFERENCES))
    line_plot(path, series, title=title, xlabel="number of models K", ylabel="test accuracy (%)", log2_x=True,
              bands=False)


def markdown_table(rows: list[dict]) -> str:
    """Methods as rows, K as columns, cells ``mean ± std`` in percent."""
    ks = sorted({r["num_models"] for r in rows})
    cell = {(r["method"], r["num_models"]): r for r in rows}
    body = [[m, *(mean_std(cell[m, k]["accuracies"]) if (m, k) in cell else "–" for k in ks)]
            for m in dict.fromkeys(r["method"] for r in rows)]
    return table(["method", *(f"K={k}" for k in ks)], body)


def _width(text: str) -> int | float:
    """A width multiplier; integral values stay ints so zoo checkpoint names do not change."""
    value = float(text)
    return int(value) if value.is_integer() else value


def add_common_arguments(p: argparse.ArgumentParser, *, num_models: str, out: str) -> None:
    """Options shared by the one-shot and ablation scripts (data, models, calibration, output)."""
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=_width, default=1, help="width multiplier (e.g. 0.25)")
    p.add_argument("--num-models", default=num_models, help="comma-separated K values")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--split", default="same", help="same | iid | 80-20 | dirichlet | class-disjoint")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-subset", type=int, default=6000, help="training examples drawn (0 = all)")
    p.add_argument("--calibration-size", type=int, default=1000)
    p.add_argument("--holdout-fraction", type=float, default=0.5, help="share of calibration held out for selection")
    p.add_argument("--test-subset", type=int, default=0, help="first N test examples (0 = all)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--zoo-dir", default=str(ZOO_DIR), help="checkpoint folder")
    p.add_argument("--cache", default=str(RESULT_CACHE), help="merge-result cache ('' = none)")
    add_runtime_arguments(p, Path(out))


def zoo_spec(args: argparse.Namespace, seed: int) -> ZooSpec:
    """The zoo settings of one seed from parsed common arguments."""
    return ZooSpec(args.dataset, args.model, args.width, args.epochs, args.split, max(args.num_models),
                   args.train_subset, args.calibration_size, seed, args.lr, args.batch_size, args.alpha)


def run_grid(args: argparse.Namespace, dataset: Dataset, evaluator: Evaluator, methods: Sequence[str],
             after_group: Callable[[int, int, Group], None] | None = None) -> dict[tuple[str, int], list[dict]]:
    """Every seed x K x method of the parsed common arguments, plus the reference rows.

    Args:
        args: Parsed :func:`add_common_arguments` options.
        dataset: The loaded dataset.
        evaluator: Test-split evaluator.
        methods: :data:`VARIANTS` names.
        after_group: Called as ``after_group(seed, K, group)`` after each group's methods.

    Returns:
        ``{(method, K): [per-seed result with "seed" and "accuracy"]}``.
    """
    per_seed: dict[tuple[str, int], list[dict]] = {}
    cache = Path(args.cache) if args.cache else None
    for seed in args.seeds:
        spec = zoo_spec(args, seed)
        for k in args.num_models:
            group = load_group(dataset, spec, k, args.holdout_fraction, Path(args.zoo_dir))
            for name, acc in reference_rows(group, evaluator).items():
                per_seed.setdefault((name, k), []).append({"accuracy": acc, "seed": seed})
            stats = group_statistics(group)
            for method in methods:
                result = run_method(group, method, evaluator, stats, cache)
                per_seed.setdefault((method, k), []).append({**result, "seed": seed})
                logger.info("seed %d K=%d %s: %.4f %s", seed, k, method, result["accuracy"], result["chosen"])
            if after_group is not None:
                after_group(seed, k, group)
    return per_seed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, num_models="2,4,8", out="results/oneshot/results.json")
    p.add_argument("--methods", default="direct,permute,weight-matching,cca",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    return parse_common(p, argv, "methods")


def parse_common(p: argparse.ArgumentParser, argv: Sequence[str] | None, names: str) -> argparse.Namespace:
    """Parse, split the comma lists (K, seeds and the variant list ``names``), check variant names."""
    args = p.parse_args(argv)
    args.num_models, args.seeds = parse_list(args.num_models, int), parse_list(args.seeds, int)
    setattr(args, names, parse_list(getattr(args, names)))
    unknown = [m for m in getattr(args, names) if m not in VARIANTS]
    if unknown:
        p.error(f"unknown {names} {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def prepare(args: argparse.Namespace) -> tuple[Dataset, Evaluator]:
    """Apply the runtime options; load the dataset and its test-split evaluator."""
    apply_runtime(args)
    dataset = load_dataset(args.dataset, args.data_dir or None)
    return dataset, Evaluator(dataset, args.test_subset)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write JSON + PNG, print a markdown table; returns the JSON object."""
    args = parse_args(argv)
    dataset, evaluator = prepare(args)
    per_seed = run_grid(args, dataset, evaluator, args.methods)
    rows = summarise(per_seed)
    result = {"rows": rows, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    out = Path(args.out)
    write_json(out, result)
    title = (f"{args.dataset} {args.model}x{args.width}, split {args.split}, {args.epochs} ep, "
             f"{args.train_subset or 'all'} train, seeds {args.seeds}")
    plot(rows, out.with_suffix(".png"), title)
    text = f"{title}\n\ntest accuracy %, mean ± std over seeds\n\n{markdown_table(rows)}\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
