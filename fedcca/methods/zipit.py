"""ZipIt! (Stoica et al., 2023): merge the features of all models jointly, within models too.

At every alignment point the features of all K models are pooled (K * n of them) and their
correlation matrix is measured on calibration data. Features are then zipped greedily: the
two most correlated groups merge, a group's correlation with another being the smallest
between their members (complete linkage), until n groups remain. Unlike a permutation, a
group may hold two features of the same model and none of another. Each merged feature is
the weighted average of its group's members; each original feature is replaced by its
group's merged feature in the next layer (the "unmerge").

In fedcca's terms this is, for model k, a :class:`~fedcca.spec.alignment.Transform` whose
``matrix`` (applied to producers) is ``W / w_k`` times the merge rows of model k's features
(so that the weighted average over models is the group average) and whose ``inverse``
(applied to consumers) is the unmerge, which is not an inverse: zipping loses information.
Without partial zipping; all models are needed at once, so it is an offline method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from fedcca.devices import resolve_device
from fedcca.methods.registry import Aligner, AlignmentJob, register
from fedcca.spec.alignment import AlignmentSpec, Transform
from fedcca.statistics import StatisticsError, as_batches, run_with_taps, running_on

_SIZE_PENALTY = 1e-9
_CROSS_BONUS = 1e-6  # above float32 noise in correlations of identical features


def joint_correlations(models: Sequence[nn.Module], calibration: torch.Tensor | Iterable, spec: AlignmentSpec, *,
                       device: torch.device | str | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per point, the correlation matrix of all models' features pooled (``[K * n, K * n]``, float64).

    Model k's feature i is row ``k * n + i``. Conv features count every spatial position as a
    sample; a point with several taps pools them. A feature constant on the calibration data
    (a dead unit) has correlation 0 with everything.

    Args:
        models: Models of one architecture.
        calibration: Inputs.
        spec: Their alignment spec.
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.

    Raises:
        StatisticsError: Non-finite features, or no calibration data.
    """
    device = resolve_device(device)
    sizes = {point.name: point.size for point in spec.points}
    taps = {tap: point.name for point in spec.points for tap in point.taps}
    count: dict[str, int] = {}
    sums: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(running_on(model, device, training=False))
        stack.enter_context(torch.no_grad())
        for batch in as_batches(calibration, batch_size):
            features = [_tap_features(model, k, batch.to(device), taps, sizes) for k, model in enumerate(models)]
            for tap, point in taps.items():
                pooled = torch.cat([per_model[tap] for per_model in features], dim=1).double()
                count[point] = count.get(point, 0) + pooled.shape[0]
                sums[point] = sums.get(point, 0) + pooled.sum(0)
                products[point] = products.get(point, 0) + pooled.T @ pooled
    if not count:
        raise StatisticsError("ZipIt!: no calibration data")
    correlations = {}
    for point, n in count.items():
        mean = sums[point] / n
        cov = products[point] / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        live = std > 1e-12 * std.max().clamp_min(1e-300)
        corr = cov / torch.outer(torch.where(live, std, 1.0), torch.where(live, std, 1.0))
        corr[~live, :] = 0.0
        corr[:, ~live] = 0.0
        corr[(~live)[:, None] & (~live)[None, :]] = 1.0  # dead features are interchangeable: zip them together
        correlations[point] = corr.cpu().numpy()
    return correlations


def zip_groups(correlation: np.ndarray, groups: int) -> list[list[int]]:
    """Greedy complete-linkage zipping of ``len(correlation)`` features into ``groups`` groups.

    Features ``k * groups + i`` belong to model k. At equal correlation a pair from two models
    is zipped before a pair from one model (a tiny bonus), so that exact copies pair across
    models even when a model holds two perfectly correlated features, and dead features (which
    correlate 0 with everything) pair across models too.

    Args:
        correlation: Symmetric correlation matrix of the pooled features.
        groups: How many groups remain (the features per model).

    Returns:
        The member features of each group, groups in order of their smallest member.
    """
    total = correlation.shape[0]
    if not 1 <= groups <= total:
        raise ValueError(f"cannot zip {total} features into {groups} groups")
    model = np.arange(total) // groups
    linkage = np.array(correlation, dtype=np.float64) + _CROSS_BONUS * (model[:, None] != model[None, :])
    np.fill_diagonal(linkage, -np.inf)
    members: list[list[int]] = [[i] for i in range(total)]
    alive = np.ones(total, dtype=bool)
    best = linkage.argmax(1)
    best_value = linkage[np.arange(total), best]
    for _ in range(total - groups):
        i = int(np.argmax(np.where(alive, best_value, -np.inf)))
        j = int(best[i])
        members[i] += members[j]
        alive[j] = False
        # Complete linkage: the zipped group is as correlated with another as its least correlated
        # member; a tiny size penalty breaks ties (dead features all correlate 0) towards pairs.
        merged = np.minimum(linkage[i], linkage[j]) - _SIZE_PENALTY * len(members[i])
        linkage[i], linkage[:, i] = merged, merged
        linkage[i, i] = -np.inf
        linkage[j, :] = -np.inf
        linkage[:, j] = -np.inf
        best_value[j] = -np.inf
        # Links only shrink, so only rows whose best partner was i or j need a new one.
        for row in np.flatnonzero(alive & ((best == i) | (best == j) | (np.arange(total) == i))):
            best[row] = int(linkage[row].argmax())
            best_value[row] = linkage[row, best[row]]
    return sorted((sorted(members[i]) for i in np.flatnonzero(alive)), key=lambda group: group[0])


def zipit_transforms(models: Sequence[nn.Module], calibration: torch.Tensor | Iterable, spec: AlignmentSpec,
                     weights: Sequence[float], *, device: torch.device | str | None = None,
                     batch_size: int = 64) -> list[dict[str, Transform]]:
    """ZipIt!'s merge (``matrix``) and unmerge (``inverse``) for every model at every point of ``spec``.

    Averaged with ``weights`` (as :class:`fedcca.merging.merger.Merger` averages), model k's transformed
    producers give each merged feature the weighted mean of its group's members.

    Args:
        models: The models to merge.
        calibration: Inputs for the correlations.
        spec: Their alignment spec (the points to zip).
        weights: Their averaging weights (positive).
        device: Where forwards run.
        batch_size: Batch size when ``calibration`` is a tensor.
    """
    if len(weights) != len(models) or not all(w > 0 for w in weights):
        raise ValueError(f"ZipIt!: {len(models)} models need as many positive weights, got {list(weights)}")
    correlations = joint_correlations(models, calibration, spec, device=device, batch_size=batch_size)
    total = float(sum(weights))
    out: list[dict[str, Transform]] = [{} for _ in models]
    for point in spec.points:
        n = point.size
        grouped = zip_groups(correlations[point.name], n)
        for k, weight in enumerate(weights):
            merge = torch.zeros(n, n, dtype=torch.float64)
            unmerge = torch.zeros(n, n, dtype=torch.float64)
            for g, group in enumerate(grouped):
                group_weight = sum(weights[member // n] for member in group)
                for member in group:
                    if member // n == k:
                        merge[g, member % n] = total / group_weight
                        unmerge[member % n, g] = 1.0
            out[k][point.name] = Transform(matrix=merge, inverse=unmerge)
    return out


def _tap_features(model: nn.Module, index: int, batch: torch.Tensor, taps: dict[str, str],
                  sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each tap's output as ``[samples, features]`` (spatial positions as samples), checked finite."""
    captured: dict[str, torch.Tensor] = {}

    def keep(tap: str, output: object) -> None:
        point = taps[tap]
        if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[1] != sizes[point]:
            raise StatisticsError(f"model {index}: the tap of point '{point}' does not output [N, {sizes[point]}, ...]",
                                  index)
        if not torch.isfinite(output).all():
            raise StatisticsError(f"model {index} has non-finite features at point '{point}'", index)
        features = output.detach().movedim(1, -1).reshape(-1, sizes[point])
        captured[tap] = features if tap not in captured else torch.cat([captured[tap], features])

    run_with_taps(model, batch, {tap: [point] for tap, point in taps.items()}, keep)
    return captured


# ----------------------------------------------------------------------------- the method

def _one_model(job: AlignmentJob) -> dict[str, Transform]:
    raise ValueError(f"{job.name}: 'zipit' aligns all models jointly, not one model to a reference; "
                     "merge the models together with fedcca.merge (CCAMerge cannot use it)")


register(Aligner("zipit", False, _one_model, "ZipIt! (Stoica et al., 2023): all models' features zipped jointly",
                 joint=True))
