"""Choosing among candidate merges on labelled held-out data, and the named merge recipes.

A :class:`~fedcca.merging.config.MergeSearch` yields candidate configurations; the merger builds
each candidate's model and :func:`choose` keeps one by its accuracy on held-out data that no
statistic was fitted on (never test data), with a calibrated loss (cross-fitted temperature
scaling) as the second criterion. The first candidate is the baseline (e.g. shrinkage 0, the
plain average): another replaces it only when it is better by more than ``min_z`` paired
standard errors.

:data:`VARIANTS` names the recipes the benchmarks and the CLI compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import optimize
from torch import nn

from fedcca.devices import resolve_device
from fedcca.merging.config import MergeConfig, MergeSearch
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
        loss: Mean cross-entropy of its logits as they are.
        accuracy: Fraction classified correctly.
        z: Paired accuracy gain over the baseline (candidate 0) in standard errors.
        calibrated_loss: Mean cross-entropy after temperature scaling, cross-fitted (the
            temperature of each half of the held-out data is fitted on the other half).
        temperature: The temperature fitted on all the held-out data (for the record).
        z_loss: Paired calibrated-loss gain over the baseline in standard errors.
        chosen: Whether it was kept.
    """

    label: str
    loss: float
    accuracy: float
    z: float
    chosen: bool
    calibrated_loss: float = math.nan
    temperature: float = 1.0
    z_loss: float = 0.0


def holdout_logits(model: nn.Module, inputs: torch.Tensor, *, device: torch.device | str | None = None,
                   batch_size: int = 256) -> torch.Tensor:
    """``model``'s logits on ``inputs`` (float64, on the CPU), in eval mode without gradients.

    The model's device and mode are restored.

    Args:
        model: Classifier producing logits.
        inputs: Inputs ``[N, ...]``.
        device: Where to run (None: CUDA if available).
        batch_size: Batch size.
    """
    device = resolve_device(device)
    parts = []
    with running_on(model, device, training=False), torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            parts.append(model(inputs[start:start + batch_size].to(device)).double().cpu())
    return torch.cat(parts)


def holdout_losses(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                   device: torch.device | str | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy (float64) and correctness (bool) of ``model`` on labelled inputs, on the CPU.

    Args:
        model: Classifier producing logits.
        inputs: Inputs ``[N, ...]``.
        labels: Integer labels ``[N]``.
        device: Where to run (None: CUDA if available).
        batch_size: Batch size.
    """
    _check_labelled(inputs, labels)
    logits = holdout_logits(model, inputs, device=device, batch_size=batch_size)
    labels = labels.cpu().long()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(1) == labels


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``t`` minimising the mean cross-entropy of ``logits / t`` (searched in [0.05, 20]).

    Args:
        logits: ``[N, C]`` float64 logits.
        labels: ``[N]`` integer labels.
    """
    if not torch.isfinite(logits).all():
        return 1.0

    def loss(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    found = optimize.minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                                     options={"xatol": 1e-3})
    return math.exp(float(found.x))


def calibrated_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy after temperature scaling, cross-fitted over two halves.

    Examples at even positions are scored with the temperature fitted on the odd ones, and
    the other way round, so no example's loss comes from a temperature fitted on it.

    Args:
        logits: ``[N, C]`` float64 logits (N >= 2).
        labels: ``[N]`` integer labels.
    """
    losses = torch.empty(len(labels), dtype=torch.float64)
    folds = torch.arange(len(labels)) % 2
    for fold in (0, 1):
        scored, fitted = folds == fold, folds != fold
        if not fitted.any():  # a single example: nothing to fit on
            losses[scored] = F.cross_entropy(logits[scored], labels[scored], reduction="none")
            continue
        temperature = fit_temperature(logits[fitted], labels[fitted])
        losses[scored] = F.cross_entropy(logits[scored] / temperature, labels[scored], reduction="none")
    return losses


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

    Candidate 0 is the baseline. Another candidate *qualifies* when its paired accuracy gain
    over the baseline exceeds ``min_z`` standard errors, or when its calibrated loss (after a
    cross-fitted temperature, so that confidence is not what is compared) is lower by more
    than ``min_z`` standard errors while its accuracy is not lower. Among the qualified, the
    most accurate wins (ties: the lower calibrated loss); if none qualifies, the baseline.
    Ranking by raw cross-entropy is not used: a better-calibrated plain average would beat an
    aligned merge that is 10 points more accurate (CHANGELOG.md, 0.1.0).

    Args:
        models: One merged model per candidate.
        configs: Their configurations (for the labels).
        inputs: Held-out inputs.
        labels: Held-out labels.
        min_z: Margin in paired standard errors (0: any improvement qualifies).
        device: Where to run.
        batch_size: Batch size.
    """
    if len(models) != len(configs) or not models:
        raise ValueError(f"choose: {len(models)} models for {len(configs)} configurations")
    _check_labelled(inputs, labels)
    labels = labels.cpu().long()
    logits = [holdout_logits(model, inputs, device=device, batch_size=batch_size) for model in models]
    finite = [bool(torch.isfinite(z).all()) for z in logits]
    correct = [(z.argmax(1) == labels).double() for z in logits]
    raw = [F.cross_entropy(z, labels, reduction="none") if ok else torch.full((len(labels),), math.inf,
                                                                              dtype=torch.float64)
           for z, ok in zip(logits, finite)]
    calibrated = [calibrated_losses(z, labels) if ok else raw_i for z, ok, raw_i in zip(logits, finite, raw)]
    accuracy = [c.mean().item() if ok else 0.0 for c, ok in zip(correct, finite)]
    z_acc = [0.0] + [paired_z(c - correct[0]) if ok else -math.inf for c, ok in zip(correct[1:], finite[1:])]
    z_loss = [0.0] + [paired_z(calibrated[0] - c) for c in calibrated[1:]]
    mean_calibrated = [c.mean().item() if ok else math.inf for c, ok in zip(calibrated, finite)]
    eligible = [i for i in range(1, len(models))
                if z_acc[i] > min_z or (z_loss[i] > min_z and accuracy[i] >= accuracy[0])]
    index = min(eligible, key=lambda i: (-accuracy[i], mean_calibrated[i])) if eligible else 0
    scores = [CandidateScore(config.label(), raw[i].mean().item() if finite[i] else math.inf, accuracy[i], z_acc[i],
                             i == index, mean_calibrated[i],
                             fit_temperature(logits[i], labels) if finite[i] else math.nan, z_loss[i])
              for i, config in enumerate(configs)]
    return index, scores


def _check_labelled(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"holdout: {len(inputs)} inputs and {len(labels)} labels (need equal, positive counts)")


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
"""Named merge recipes (see :class:`~fedcca.merging.config.MergeSearch`); ``"cca-paper"`` is the paper's transform."""


def get_variant(name: str | MergeSearch) -> MergeSearch:
    """The recipe called ``name`` (or ``name`` itself when it is a search); ValueError listing the names."""
    if isinstance(name, MergeSearch):
        return name
    if name not in VARIANTS:
        raise ValueError(f"unknown merge variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


FEDERATED_SEARCH = MergeSearch(
    MergeConfig("cca", zero_dead=False),
    (("method", ("cca", "permute")), ("shrinkage", (0.0, 0.5, 1.0)), ("repair", ("none", "affine"))),
    min_z=2.0,
    description="CCA and Permute, shrunk towards FedAvg, with and without REPAIR, chosen on held-out accuracy",
)
"""CCAMerge's default when it has labelled held-out data: CCA transforms shrunk towards the
identity, ``T_a = I + a (T - I)`` for ``a`` in {0, 0.5, 1}, and Permute's (a = 1 only: a
halfway permutation is singular), each with and without REPAIR (8 distinct candidates).
``a = 0`` without REPAIR (plain FedAvg) is kept unless another candidate is more accurate (or
better calibrated at no loss of accuracy) by more than 2 paired standard errors
(:func:`fedcca.merging.selection.choose`). Measured: docs/results.md."""

UNLABELLED_DEFAULT = MergeConfig("cca", zero_dead=False, shrinkage=0.5)
"""CCAMerge's default without labelled held-out data (nothing to choose with): CCA shrunk
half-way towards FedAvg."""
