"""Permute: the (rescaled) permutation matching each reference feature with its most correlated feature.

Parameter: ``max_scale``, the bound on the per-feature rescaling.
"""

from __future__ import annotations

import logging
import math

import torch
from scipy.optimize import linear_sum_assignment

from fedcca.methods.common import (
    block_mask,
    checked_covariances,
    dead_features,
    scaled_permutation,
)
from fedcca.methods.registry import Aligner, AlignmentJob, Parameter, number, register
from fedcca.spec.alignment import Transform
from fedcca.statistics import PairStatistics

logger = logging.getLogger(__name__)

DEFAULT_MAX_SCALE = 10.0
"""Default bound on the per-feature rescaling (nearly dead features otherwise get scales of ~1000)."""

def permute_transform(stats: PairStatistics, rescale: bool = True, *, max_scale: float = math.inf,
                      point: str = "?", groups: int | None = None) -> Transform:
    """Permutation matching each reference feature with the model feature most correlated to it.

    The assignment maximises the summed Pearson correlation (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``). With ``rescale`` each matched feature is also
    multiplied by ``std_a / std_b``, so a positively scaled permutation is recovered exactly.
    Dead features have correlation 0 and scale 1 (logged at DEBUG).

    Args:
        stats: Statistics of reference A and model B at the point.
        rescale: Multiply matched features by their standard-deviation ratio.
        max_scale: Clip every scale to ``[1 / max_scale, max_scale]`` (logged when it bites):
            a nearly dead feature matched with a live one otherwise gets a scale of ~1000,
            which the average then carries into every later layer.
        point: The point's name, for log messages.
        groups: Match features only within each of these contiguous groups (a GroupNorm's).
    """
    c_aa, c_bb, c_ab = checked_covariances(stats, point)
    var_a, var_b = c_aa.diagonal(), c_bb.diagonal()
    dead_a, dead_b = dead_features(stats, var_a, var_b, point)
    std_a = torch.where(dead_a, 1.0, var_a.clamp_min(0).sqrt())
    std_b = torch.where(dead_b, 1.0, var_b.clamp_min(0).sqrt())
    corr = c_ab / torch.outer(std_a, std_b)
    corr[dead_a, :] = 0.0
    corr[:, dead_b] = 0.0
    if groups is not None:  # no match across groups
        corr[~block_mask(len(corr), groups)] = -1e9
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    scale = std_a[rows] / std_b[cols] if rescale else torch.ones(len(rows), dtype=torch.float64)
    scale[dead_a[rows] | dead_b[cols]] = 1.0
    if not max_scale >= 1:
        raise ValueError(f"point '{point}': max_scale must be >= 1, got {max_scale}")
    clipped = (scale > max_scale) | (scale < 1 / max_scale)
    if clipped.any():
        logger.info("point '%s': %d Permute scale(s) clipped to [1/%g, %g] (largest %.3g, smallest %.3g)",
                    point, int(clipped.sum()), max_scale, max_scale, scale.max().item(), scale.min().item())
        scale = scale.clamp(1 / max_scale, max_scale)
    return scaled_permutation(rows, cols, scale)


# ----------------------------------------------------------------------------- the method

MAX_SCALE = Parameter("max_scale", DEFAULT_MAX_SCALE, number("max_scale", 1.0),
                      "the per-feature rescaling std_a / std_b is clipped to [1 / max_scale, max_scale]")


def transforms(job: AlignmentJob) -> dict[str, Transform]:
    """Permute's transform at every point of ``job.spec``."""
    return {p.name: permute_transform(job.pair(p.name), rescale=p.groups is None, max_scale=job.options["max_scale"],
                                      point=p.name, groups=p.groups)
            for p in job.spec.points}


register(Aligner("permute", True, transforms, "rescaled permutation matching features by correlation",
                 parameters=(MAX_SCALE,), shrinkable=False, permutation=True))
