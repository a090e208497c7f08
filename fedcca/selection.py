"""Choosing among candidate merges on labelled held-out data, and the named merge recipes.

A :class:`~fedcca.config.MergeSearch` yields candidate configurations; the merger builds
each candidate's model and :func:`choose` keeps one by its per-example cross-entropy on
held-out data that no statistic was fitted on (never test data). The first candidate is the
baseline (e.g. shrinkage 0, the plain average): another replaces it only when the paired
mean loss gain exceeds ``min_z`` standard errors.

:data:`VARIANTS` names the recipes the benchmarks and the CLI compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcca.config import MergeConfig, MergeSearch
from fedcca.devices import resolve_device
from fedcca.statistics import running_on

RELATIVE_RIDGES: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
ABSOLUTE_RIDGES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
TRACE_RIDGES: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, math.inf)
BLENDS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CandidateScore:
    """How one candidate merge did on the held-out data.

    Args:
        label: The candidate's :meth:`MergeConfig.label`.
        loss: Mean cross-entropy.
        accuracy: Fraction classified correctly.
        z: Paired mean loss gain over the baseline (candidate 0) in standard errors.
        chosen: Whether it was kept.
    """

    label: str
    loss: float
    accuracy: float
    z: float
    chosen: bool


def holdout_losses(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                   device: torch.device | str | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy (float64) and correctness (bool) of ``model`` on labelled inputs, on the CPU.

    Runs in eval mode without gradients; the model's device and mode are restored.

    Args:
        model: Classifier producing logits.
        inputs: Inputs ``[N, ...]``.
        labels: Integer labels ``[N]``.
        device: Where to run (None: CUDA if available).
        batch_size: Batch size.
    """
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"holdout: {len(inputs)} inputs and {len(labels)} labels (need equal, positive counts)")
    device = resolve_device(device)
    losses, correct = [], []
    with running_on(model, device, training=False), torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            logits = model(x)
            losses.append(F.cross_entropy(logits, y, reduction="none").double().cpu())
            correct.append((logits.argmax(1) == y).cpu())
    return torch.cat(losses), torch.cat(correct)


def paired_z(gain: torch.Tensor) -> float:
    """Mean of paired differences over its standard error.

    +-inf when the spread is 0 and the mean is not (0 when both are); -inf when a gain is not finite.
    """
    if not torch.isfinite(gain).all():
        return -math.inf
    mean = gain.mean().item()
    se = gain.std().item() / math.sqrt(len(gain)) if len(gain) > 1 else 0.0
    if se == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / se


def choose(models: Sequence[nn.Module], configs: Sequence[MergeConfig], inputs: torch.Tensor, labels: torch.Tensor,
           *, min_z: float = 0.0, device: torch.device | str | None = None,
           batch_size: int = 256) -> tuple[int, list[CandidateScore]]:
    """Index of the candidate to keep, and every candidate's held-out score.

    Candidate 0 is the baseline. Among the others whose paired loss gain over it exceeds
    ``min_z`` standard errors, the lowest mean loss wins; if none qualifies, the baseline.

    Args:
        models: One merged model per candidate.
        configs: Their configurations (for the labels).
        inputs: Held-out inputs.
        labels: Held-out labels.
        min_z: Margin in paired standard errors (0: the lowest mean loss wins).
        device: Where to run.
        batch_size: Batch size.
    """
    if len(models) != len(configs) or not models:
        raise ValueError(f"choose: {len(models)} models for {len(configs)} configurations")
    results = [holdout_losses(model, inputs, labels, device=device, batch_size=batch_size) for model in models]
    base = results[0][0]
    means = [losses.mean().item() if torch.isfinite(losses).all() else math.inf for losses, _ in results]
    zs = [0.0] + [paired_z(base - losses) for losses, _ in results[1:]]
    eligible = [i for i in range(1, len(models)) if zs[i] > min_z]
    index = min(eligible, key=lambda i: means[i]) if eligible else 0
    scores = [CandidateScore(config.label(), means[i], results[i][1].double().mean().item(), zs[i], i == index)
              for i, config in enumerate(configs)]
    return index, scores


def score(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
          device: torch.device | str | None = None, batch_size: int = 256) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on labelled inputs (eval mode, no grad).

    Args:
        model: Classifier producing logits.
        inputs: Inputs ``[N, ...]``.
        labels: Integer labels ``[N]``.
        device: Where to run.
        batch_size: Batch size.
    """
    losses, correct = holdout_losses(model, inputs, labels, device=device, batch_size=batch_size)
    return losses.mean().item(), correct.double().mean().item()


def _named(description: str, base: MergeConfig, **grid: tuple) -> MergeSearch:
    return MergeSearch(base, tuple(grid.items()), description=description)


VARIANTS: dict[str, MergeSearch] = {
    "direct": _named("no alignment (FedAvg of the weights)", MergeConfig("direct")),
    "permute": _named("correlation permutation, rescaled", MergeConfig("permute")),
    "weight-matching": _named("Git Re-Basin weight matching", MergeConfig("weight-matching")),
    "cca": _named("CCA, library default (trace ridge, fixed g)", MergeConfig("cca")),
    "cca-trace": _named("CCA, trace ridge g mean(var) I, g chosen on held-out calibration", MergeConfig("cca"),
                        ridge=TRACE_RIDGES),
    "cca-procrustes": _named("CCA, trace ridge g -> inf (scaled orthogonal Procrustes)",
                             MergeConfig("cca", ridge=math.inf)),
    "cca-keep-dead": _named("cca without zeroing dead units first", MergeConfig("cca", zero_dead=False)),
    "permute-keep-dead": _named("permute without zeroing dead units first", MergeConfig("permute", zero_dead=False)),
    "cca-relative": _named("CCA, per-feature relative ridge g diag(C), g chosen on held-out calibration",
                           MergeConfig("cca", ridge_mode="relative"), ridge=RELATIVE_RIDGES),
    "cca-paper": _named("CCA as in the paper (absolute ridge g I), g chosen on held-out calibration",
                        MergeConfig("cca", ridge_mode="absolute"), ridge=ABSOLUTE_RIDGES),
    "blend": _named("(1-l) P + l cca(default ridge), l chosen on held-out calibration", MergeConfig("blend"),
                    blend=BLENDS),
    "permute-mean": _named("permute + pre-activation mean correction", MergeConfig("permute", repair="mean")),
    "cca-mean": _named("cca + pre-activation mean correction", MergeConfig("cca", repair="mean")),
    "permute-repair": _named("permute + REPAIR (mean and std)", MergeConfig("permute", repair="affine")),
    "weight-matching-repair": _named("weight matching + REPAIR", MergeConfig("weight-matching", repair="affine")),
    "cca-repair": _named("cca + REPAIR (mean and std)", MergeConfig("cca", repair="affine")),
    "cca-trace-repair": _named("cca-trace + REPAIR, g chosen on held-out calibration",
                               MergeConfig("cca", repair="affine"), ridge=TRACE_RIDGES),
    "cca-unfolded": _named("cca with BatchNorm vectors transformed as they are (no folding; the paper's way)",
                           MergeConfig("cca", fold_bn=False)),
    "cca-unfolded-repair": _named("cca-unfolded + REPAIR", MergeConfig("cca", fold_bn=False, repair="affine")),
    "zipit": _named("ZipIt! (all models zipped jointly, no partial zipping)", MergeConfig("zipit")),
    "zipit-repair": _named("ZipIt! + REPAIR", MergeConfig("zipit", repair="affine")),
}
"""Named merge recipes (see :class:`~fedcca.config.MergeSearch`); ``"cca-paper"`` is the paper's transform."""


def get_variant(name: str | MergeSearch) -> MergeSearch:
    """The recipe called ``name`` (or ``name`` itself when it is a search); ValueError listing the names."""
    if isinstance(name, MergeSearch):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown merge variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]
