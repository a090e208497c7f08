"""Issue 8 ablation: where and why CCA Merge loses or wins against permutation alignment.

Example::

    python -m simulations.ablation --num-models 2,8 --seeds 0,1,2 --epochs 2 --train-subset 6000 \\
        --out results/ablation/ablation.json

Part 1 (table): every variant of ``--variants`` (names of :data:`fedcca.merging.selection.VARIANTS`)
merged at each K, test accuracy mean +- std over seeds, plus ensemble and base-average.
Hyper-parameters are chosen on the held-out calibration half only.
Part 2 (diagnostics, model 1 against reference model 0 of each seed, calibration data only):

* canonical correlations per point, and the matched-permutation correlations;
* feature-variance spread (near-dead features, share of variance < 1% of the mean);
* the nonlinearity error of each transform ``||relu(T z) - T relu(z)|| / ||T relu(z)||`` at
  each point (``z``: model 1's pre-activations; zero for positive scaled permutations);
* the held-out accuracy of model 1 aligned but NOT averaged (how much a transform breaks the
  function before averaging);
* merged pre-activation statistics vs the endpoints' average (variance collapse, mean offset)
  for permute and cca-trace at every K;
* held-out accuracy vs the number of calibration images used for the statistics.

Writes JSON, a PNG of the table and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcca.flower.records import jsonable
from fedcca.merging.config import MergeConfig, MergeSearch
from fedcca.merging.merger import merge_with_result
from fedcca.merging.repair import preactivation_spec, preactivation_statistics
from fedcca.merging.selection import VARIANTS, get_variant, score
from fedcca.methods.cca import canonical_correlations, cca_transform
from fedcca.methods.permute import permute_transform
from fedcca.spec.alignment import Transform, apply_transforms
from fedcca.spec.tracing import spec_for
from simulations.harness import parse_list, write_json
from simulations.oneshot import (
    Group,
    add_common_arguments,
    group_statistics,
    load_group,
    markdown_table,
    parse_common,
    plot,
    prepare,
    run_grid,
    summarise,
    zoo_spec,
)

logger = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("direct", "permute", "weight-matching", "cca", "cca-trace", "cca-procrustes", "cca-relative",
                    "cca-paper", "blend", "permute-mean", "cca-mean", "permute-repair", "weight-matching-repair",
                    "cca-repair", "cca-trace-repair")
CALIBRATION_SIZES = (25, 100, 250, 500)


def _fixed_transforms(stats: dict, ridge: float) -> dict[str, dict[str, Transform]]:
    """The transforms compared by the diagnostics, at one point each (fixed hyper-parameters)."""
    out: dict[str, dict[str, Transform]] = {"permute": {}, "cca-relative": {}, "cca-paper": {}, "cca-trace": {}}
    for point, pair in stats.items():
        out["permute"][point] = permute_transform(pair, point=point)
        out["cca-relative"][point] = cca_transform(pair, 0.1, ridge_mode="relative", point=point)
        out["cca-paper"][point] = cca_transform(pair, ridge, ridge_mode="absolute", point=point)
        out["cca-trace"][point] = cca_transform(pair, ridge, ridge_mode="trace", point=point)
    return out


def correlation_profile(stats: dict) -> dict[str, dict[str, float]]:
    """Per point: canonical-correlation summary, matched-permutation correlation, variance spread."""
    profile = {}
    for point, pair in stats.items():
        rho = canonical_correlations(pair, 1e-6, point=point).numpy()
        c_aa, c_bb, c_ab = (c.double() for c in pair.covariances())
        std_a, std_b = c_aa.diagonal().clamp_min(1e-30).sqrt(), c_bb.diagonal().clamp_min(1e-30).sqrt()
        perm = permute_transform(pair, point=point).matrix
        rows, cols = perm.nonzero(as_tuple=True)
        matched = (c_ab[rows, cols] / (std_a[rows] * std_b[cols])).numpy()
        var_b = c_bb.diagonal().numpy()
        profile[point] = {
            "features": int(len(rho)),
            "cancorr_mean": float(rho.mean()), "cancorr_median": float(np.median(rho)),
            "cancorr_frac_above_0.9": float((rho > 0.9).mean()), "cancorr_frac_below_0.5": float((rho < 0.5).mean()),
            "perm_corr_mean": float(matched.mean()), "perm_corr_frac_above_0.9": float((matched > 0.9).mean()),
            "near_dead_frac": float((var_b < 0.01 * var_b.mean()).mean()),
        }
    return profile


@torch.no_grad()
def nonlinearity_error(model: nn.Module, transforms: dict[str, Transform], inputs: torch.Tensor) -> dict[str, float]:
    """``||relu(T z) - T relu(z)|| / ||T relu(z)||`` per point, ``z`` the model's pre-activations.

    Each point in isolation with the model's own inputs: what applying ``T`` to the producing
    layer changes in the ReLU output, before any averaging.
    """
    spec = spec_for(model)
    pre_spec, producers = preactivation_spec(spec, model)
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[producers[p.name]].register_forward_hook(
        lambda _m, _i, out, name=p.name: captured.__setitem__(name, out.detach())) for p in pre_spec.points]
    try:
        model.eval()(inputs)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    for name, z in captured.items():
        z = z.movedim(1, -1).reshape(-1, z.shape[1]).double()
        t = transforms[name].matrix
        ideal = torch.relu(z) @ t.T
        errors[name] = float((torch.relu(z @ t.T) - ideal).norm() / ideal.norm().clamp_min(1e-30))
    return errors


def aligned_alone(group: Group, transforms: dict[str, Transform]) -> float:
    """Held-out accuracy of model 1 with ``transforms`` applied to its weights, not averaged."""
    model = group.models[1]
    clone = copy.deepcopy(model)
    clone.load_state_dict(apply_transforms(model.state_dict(), spec_for(model), transforms))
    return score(clone, *group.holdout, device="cpu")[1]


def collapse(group: Group, variant: str | MergeSearch) -> dict[str, dict[str, float]]:
    """Merged vs target pre-activation statistics per point for one variant (no repair).

    ``std_ratio``: mean over channels of merged std / endpoints' average std (in reference
    coordinates); ``mean_offset``: mean |merged mean - target mean| / target std.
    """
    report = merge_with_result(group.models, group.fit, get_variant(variant), holdout=group.holdout, device="cpu",
                               keep_transforms=True)
    targets = preactivation_statistics(group.models, group.fit)
    mine = preactivation_statistics([report.model], group.fit)[0]
    transforms = [report.transforms[f"models[{k}]"] for k in range(len(group.models))]
    out = {}
    for point, (mean_m, cov_m) in mine.items():
        means, stds = [], []
        for stats, ts in zip(targets, transforms):
            mean, cov = stats[point]
            t = ts.get(point)
            if t is not None:
                mean, cov = t.matrix @ mean, t.matrix @ cov @ t.matrix.T
            means.append(mean)
            stds.append(cov.diagonal().clamp_min(0).sqrt())
        target_mean, target_std = torch.stack(means).mean(0), torch.stack(stds).mean(0).clamp_min(1e-12)
        std_m = cov_m.diagonal().clamp_min(0).sqrt()
        out[point] = {"std_ratio": float((std_m / target_std).mean()),
                      "mean_offset": float(((mean_m - target_mean).abs() / target_std).mean())}
    return out


def calibration_sweep(group: Group, sizes: Sequence[int], ridge: float) -> dict[str, dict[int, float]]:
    """Held-out accuracy of permute and cca-trace (fixed ridge) vs calibration images used."""
    recipes = {"permute": MergeConfig("permute"), "cca-trace": MergeConfig("cca", ridge=ridge),
               "permute-repair": MergeConfig("permute", repair="affine"),
               "cca-trace-repair": MergeConfig("cca", ridge=ridge, repair="affine")}
    out: dict[str, dict[int, float]] = {name: {} for name in recipes}
    for size in sizes:
        fit = group.fit[:size]
        for name, recipe in recipes.items():
            merged = merge_with_result(group.models, fit, recipe, device="cpu").model
            out[name][size] = score(merged, *group.holdout, device="cpu")[1]
    return out


def diagnose(group: Group, ridge: float, sizes: Sequence[int]) -> dict:
    """All pair diagnostics of one seed (model 1 against reference model 0)."""
    pair = Group(group.models[:2], group.keys[:2], group.fit, group.holdout)
    stats = group_statistics(pair)[1]
    assert stats is not None
    transforms = _fixed_transforms(stats, ridge)
    return {
        "correlations": correlation_profile(stats),
        "nonlinearity_error": {name: nonlinearity_error(pair.models[1], ts, pair.fit) for name, ts in transforms.items()},
        "aligned_alone_holdout": {"unaligned": score(pair.models[1], *pair.holdout, device="cpu")[1],
                                  **{name: aligned_alone(pair, ts) for name, ts in transforms.items()}},
        "calibration_sweep": calibration_sweep(pair, sizes, ridge),
    }


def ridge_curve(per_seed: dict[tuple[str, int], list[dict]], variant: str) -> dict[str, dict[str, float]]:
    """``{K: {ridge: held-out accuracy averaged over seeds}}`` from a selecting variant's scores.

    Held-out calibration data only (never test data): this is how the library default ridge
    is chosen.
    """
    curve: dict[str, dict[str, list[float]]] = {}
    for (name, k), runs in per_seed.items():
        if name != variant:
            continue
        for run in runs:
            for row in run.get("holdout_scores", []):
                curve.setdefault(str(k), {}).setdefault(str(row["ridge"]), []).append(row["accuracy"])
    return {k: {g: float(np.mean(v)) for g, v in per_k.items()} for k, per_k in curve.items()}


def ridge_curve_markdown(curve: dict[str, dict[str, float]]) -> str:
    """K as rows, ridges as columns, held-out accuracy in percent."""
    ridges = list(next(iter(curve.values())))
    lines = ["| K | " + " | ".join(f"g={g}" for g in ridges) + " |", "|---" * (len(ridges) + 1) + "|"]
    for k, per_k in curve.items():
        lines.append(f"| {k} | " + " | ".join(f"{100 * per_k[g]:.1f}" for g in ridges) + " |")
    mean = {g: float(np.mean([per_k[g] for per_k in curve.values()])) for g in ridges}
    lines.append("| mean | " + " | ".join(f"{100 * mean[g]:.1f}" for g in ridges) + " |")
    return "\n".join(lines)


def _mean_over_seeds(items: list[dict]) -> dict:
    """Element-wise mean of nested dicts of numbers (same structure)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_over_seeds([it[k] for it in items]) for k in first}
    return float(np.mean(items))


def diagnostics_markdown(diag: dict) -> str:
    """Markdown tables of the seed-averaged diagnostics."""
    lines = ["| point | features | cancorr mean | cancorr >0.9 | cancorr <0.5 | perm corr mean | near-dead |",
             "|---|---|---|---|---|---|---|"]
    for point, p in diag["correlations"].items():
        lines.append(f"| {point} | {p['features']:.0f} | {p['cancorr_mean']:.3f} | {p['cancorr_frac_above_0.9']:.2f} | "
                     f"{p['cancorr_frac_below_0.5']:.2f} | {p['perm_corr_mean']:.3f} | {p['near_dead_frac']:.2f} |")
    points = list(diag["correlations"])
    lines += ["", "| transform | " + " | ".join(f"relu error {p}" for p in points) + " | aligned-alone holdout acc |",
              "|---" * (len(points) + 2) + "|"]
    for name, errs in diag["nonlinearity_error"].items():
        lines.append(f"| {name} | " + " | ".join(f"{errs[p]:.3f}" for p in points)
                     + f" | {100 * diag['aligned_alone_holdout'][name]:.1f} |")
    lines.append("| (unaligned model 1) | " + " | ".join("0" for _ in points)
                 + f" | {100 * diag['aligned_alone_holdout']['unaligned']:.1f} |")
    sweep = diag["calibration_sweep"]
    sizes = list(next(iter(sweep.values())))
    lines += ["", "| method | " + " | ".join(f"{s} calib imgs" for s in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name, accs in sweep.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * accs[s]:.1f}" for s in sizes) + " |")
    if "collapse" in diag:
        lines += ["", "| K | variant | point | merged std / target std | mean offset / target std |", "|---|---|---|---|---|"]
        for k, per_variant in diag["collapse"].items():
            for name, per_point in per_variant.items():
                for point, c in per_point.items():
                    lines.append(f"| {k} | {name} | {point} | {c['std_ratio']:.3f} | {c['mean_offset']:.3f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, num_models="2,8", out="results/ablation/ablation.json")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--diag-ridge", type=float, default=1.0, help="ridge of cca-paper/cca-trace in the diagnostics")
    p.add_argument("--calibration-sizes", default=",".join(map(str, CALIBRATION_SIZES)))
    p.add_argument("--skip-diagnostics", action="store_true")
    args = parse_common(p, argv, "variants")
    args.calibration_sizes = parse_list(args.calibration_sizes, int)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the ablation, write JSON + PNG, print markdown; returns the JSON object."""
    args = parse_args(argv)
    dataset, evaluator = prepare(args)
    collapses: dict[int, dict] = {}

    def measure_collapse(seed: int, k: int, group: Group) -> None:
        if not args.skip_diagnostics:
            collapses.setdefault(seed, {})[str(k)] = {
                "permute": collapse(group, "permute"),
                "cca-trace": collapse(group, MergeSearch(MergeConfig("cca", ridge=args.diag_ridge)))}

    per_seed = run_grid(args, dataset, evaluator, args.variants, measure_collapse)
    diagnostics = []
    for seed in [] if args.skip_diagnostics else args.seeds:
        group = load_group(dataset, zoo_spec(args, seed), 2, args.holdout_fraction, Path(args.zoo_dir))
        diagnostics.append({"collapse": collapses[seed], **diagnose(group, args.diag_ridge, args.calibration_sizes)})
    rows = summarise(per_seed)
    result: dict = {"rows": rows, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "variants": {v: jsonable(dataclasses.asdict(VARIANTS[v])) for v in args.variants},
                    "ridge_curve": ridge_curve(per_seed, "cca-trace")}
    if diagnostics:
        result["diagnostics_per_seed"] = diagnostics
        result["diagnostics_mean"] = _mean_over_seeds(diagnostics)
    out = Path(args.out)
    write_json(out, result)
    plot(rows, out.with_suffix(".png"), f"ablation: {args.dataset} {args.model}x{args.width}, split {args.split}")
    text = "## Variants (test accuracy %, mean ± std over seeds " + str(args.seeds) + ")\n\n" + markdown_table(rows)
    text += "\n\n" + "\n".join(f"- `{v}`: {VARIANTS[v].description}" for v in args.variants)
    if result["ridge_curve"]:
        text += "\n\n## Held-out accuracy of cca-trace per ridge g (mean over seeds; chooses the default)\n\n"
        text += ridge_curve_markdown(result["ridge_curve"])
    if diagnostics:
        text += "\n\n## Diagnostics (seed mean, model 1 vs reference model 0)\n\n" + diagnostics_markdown(
            result["diagnostics_mean"])
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
