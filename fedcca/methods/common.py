"""Transform algebra and statistics checks shared by the aligners.

* :func:`identity_transform`, :func:`shrink_transform` (``I + a (T - I)``),
  :func:`with_inverse` (a transform with its numerical inverse, refused when singular);
* :func:`checked_covariances` and :func:`dead_features`, the statistics every
  correlation-based aligner reads;
* :func:`scaled_permutation`, the transform of a (rescaled) matching.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fedcca.spec.alignment import Transform
from fedcca.statistics import PairStatistics, StatisticsError

logger = logging.getLogger(__name__)

# A feature is dead when its variance is below this fraction of its squared mean: it is
# constant on the calibration data (exact zeros give 0 <= 0). Relative, so scale-free.
_DEAD_RTOL = 1e-10


def block_mask(size: int, groups: int) -> torch.Tensor:
    """``[size, size]`` bool: True where row and column fall in the same of ``groups`` contiguous groups."""
    group = torch.arange(size) // (size // groups)
    return group[:, None] == group[None, :]


def identity_transform(n: int) -> Transform:
    """The identity transform of size ``n`` (leaves a point unchanged).

    Args:
        n: Number of features at the point.
    """
    eye = torch.eye(n, dtype=torch.float64)
    return Transform(matrix=eye, inverse=eye.clone())


def shrink_transform(transform: Transform, amount: float, *, point: str = "?") -> Transform:
    """``T_a = I + a (T - I)``: the transform moved a fraction ``a`` of the way from the identity.

    ``a = 0`` is the identity (no alignment: averaging gives FedAvg), ``a = 1`` returns
    ``transform`` itself (with its exact inverse); in between the inverse is computed.

    Args:
        transform: The aligner's transform ``T``.
        amount: ``a`` in [0, 1].
        point: The point's name, for error messages.

    Raises:
        ValueError: ``amount`` outside [0, 1], or a singular shrunk transform.
    """
    if not 0 <= amount <= 1:
        raise ValueError(f"point '{point}': shrinkage must be in [0, 1], got {amount}")
    if amount == 1:
        return transform
    if amount == 0:
        return identity_transform(transform.size)
    eye = torch.eye(transform.size, dtype=torch.float64)
    return with_inverse(eye + amount * (transform.matrix.to(torch.float64) - eye), f"shrinkage {amount:g}", point)


def with_inverse(matrix: torch.Tensor, what: str, point: str) -> Transform:
    """A Transform of ``matrix`` with its numerical inverse; ValueError when it is ill-conditioned."""
    cond = torch.linalg.cond(matrix).item()
    if not cond < 1e12:
        raise ValueError(f"point '{point}': the {what} transform is singular (condition {cond:.3g})")
    return Transform(matrix=matrix, inverse=torch.linalg.inv(matrix))


def checked_covariances(stats: PairStatistics, point: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C_aa, C_bb, C_ab)`` in float64 on the CPU; StatisticsError when empty or not finite, naming the point."""
    if stats.count <= 0:
        raise StatisticsError(f"point '{point}': statistics hold no samples")
    c_aa, c_bb, c_ab = (c.double().cpu() for c in stats.covariances())
    if c_ab.shape[0] != c_ab.shape[1]:
        raise ValueError(f"point '{point}': reference and model have {c_ab.shape[0]} and "
                         f"{c_ab.shape[1]} features")
    for name, value in (("C_aa", c_aa), ("C_bb", c_bb), ("C_ab", c_ab)):
        if not torch.isfinite(value).all():
            raise StatisticsError(f"point '{point}': {name} has non-finite values")
    return c_aa, c_bb, c_ab


def dead_features(stats: PairStatistics, var_a: torch.Tensor, var_b: torch.Tensor,
                   point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of features constant on the calibration data; logs a warning when there are any."""
    mean_a, mean_b = (m.double().cpu() for m in stats.means())
    dead_a = var_a <= _DEAD_RTOL * mean_a.square()
    dead_b = var_b <= _DEAD_RTOL * mean_b.square()
    if dead_a.any() or dead_b.any():
        logger.debug("point '%s': %d dead feature(s) in the reference and %d in the model "
                       "(zero variance on the calibration data)", point, int(dead_a.sum()), int(dead_b.sum()))
    return dead_a, dead_b


def scaled_permutation(rows: np.ndarray, cols: np.ndarray, scale: torch.Tensor) -> Transform:
    """``T[rows[k], cols[k]] = scale[k]``: reference feature rows[k] <- model feature cols[k]."""
    n = len(rows)
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    inverse = torch.zeros(n, n, dtype=torch.float64)
    matrix[rows_t, cols_t] = scale
    inverse[cols_t, rows_t] = 1.0 / scale
    return Transform(matrix=matrix, inverse=inverse)
