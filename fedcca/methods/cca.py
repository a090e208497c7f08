"""CCA Merge (Horoi et al., 2024): ``T = S_aa^1/2 U V^T S_bb^-1/2`` from activation statistics.

The transform maps model B's features onto reference A's coordinates through the canonical
directions of their cross-covariance; each own-covariance block is regularised by a ridge
(:data:`RIDGE_MODES`). Parameters: ``ridge`` and ``ridge_mode``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.linalg
import torch

from fedcca.methods.common import checked_covariances, dead_features
from fedcca.methods.registry import (
    Aligner,
    AlignmentJob,
    Parameter,
    number,
    one_of,
    register,
)
from fedcca.spec.alignment import Transform
from fedcca.statistics import PairStatistics

logger = logging.getLogger(__name__)

RIDGE_MODES: tuple[str, ...] = ("trace", "relative", "absolute")


DEFAULT_RIDGE_MODE = "trace"


DEFAULT_RIDGES: dict[str, float] = {"trace": 1.0, "relative": 0.1, "absolute": 1.0}


class WhiteningCache:
    """The reference's whitening per point, reused for every model aligned to one reference.

    Within a merge the reference's covariance is the same for every model, so its
    eigendecomposition is computed once; an entry is reused only for an identical covariance
    matrix (compared exactly), never by name alone.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, float, str], tuple[torch.Tensor, np.ndarray, tuple]] = {}

    def get(self, key: tuple[str, float, str], cov: torch.Tensor, dead: np.ndarray,
            compute: Callable[[], tuple]) -> tuple:
        """The cached whitening for ``key`` when it was computed from ``cov`` and ``dead``, else ``compute()``."""
        entry = self._entries.get(key)
        if entry is not None and torch.equal(entry[0], cov) and np.array_equal(entry[1], dead):
            return entry[2]
        value = compute()
        self._entries[key] = (cov, dead, value)
        return value


def cca_transform(stats: PairStatistics, ridge: float | None = None, *, ridge_mode: str = DEFAULT_RIDGE_MODE,
                  point: str = "?", cache: WhiteningCache | None = None) -> Transform:
    """CCA Merge transform of model B onto reference A at one point.

    With ``S`` the ridged own blocks (see :data:`RIDGE_MODES`) and
    ``U S V^T = svd(S_aa^-1/2 C_ab S_bb^-1/2)``:
    ``T = S_aa^1/2 U V^T S_bb^-1/2`` and ``T^-1 = S_bb^1/2 V U^T S_aa^-1/2`` (closed form).
    Computed in float64 via symmetric eigendecompositions of the correlation matrices of
    ``S``; ``T`` does not depend on which square root whitens, so this equals the
    symmetric-root formula. Dead features (constant on the calibration data) are logged; their
    rows/columns are decoupled and paired dead-to-dead in index order (the paper's formula
    leaves them to arbitrary singular vectors), so a dead unit is never mixed into live ones.

    Args:
        stats: Statistics of reference A and model B at the point.
        ridge: Ridge ``g >= 0`` (``inf`` allowed in "trace" mode); None: ``DEFAULT_RIDGES[ridge_mode]``.
        ridge_mode: One of :data:`RIDGE_MODES`.
        point: The point's name, for log and error messages.
        cache: Reuse the reference's whitening across models aligned to one reference.

    Raises:
        ValueError: Unknown mode, ``ridge`` < 0, statistics of unequal sizes, or a singular
            covariance with ``ridge == 0`` (e.g. fewer samples than features).
        StatisticsError: Non-finite statistics or no samples.
    """
    return _cca(stats, ridge, ridge_mode, point, cache)[0]


def canonical_correlations(stats: PairStatistics, ridge: float | None = None, *,
                           ridge_mode: str = DEFAULT_RIDGE_MODE, point: str = "?") -> torch.Tensor:
    """The (ridge-regularised) canonical correlations at a point, in descending order.

    These are the singular values ``S`` of :func:`cca_transform`; with ``ridge == 0`` they are
    the plain canonical correlations of A's and B's features.

    Args:
        stats: Statistics of reference A and model B at the point.
        ridge: Ridge, as for :func:`cca_transform`.
        ridge_mode: One of :data:`RIDGE_MODES`.
        point: The point's name, for log and error messages.
    """
    return _cca(stats, ridge, ridge_mode, point)[1]


def _cca(stats: PairStatistics, ridge: float | None, mode: str, point: str,
         cache: WhiteningCache | None = None) -> tuple[Transform, torch.Tensor]:
    if mode not in RIDGE_MODES:
        raise ValueError(f"unknown ridge_mode {mode!r}; choose one of {RIDGE_MODES}")
    ridge = DEFAULT_RIDGES[mode] if ridge is None else float(ridge)
    if not ridge >= 0 or (ridge == float("inf") and mode != "trace"):
        raise ValueError(f"ridge must be >= 0 (inf only in 'trace' mode), got {ridge} in mode {mode!r}")
    c_aa, c_bb, c_ab = checked_covariances(stats, point)
    n = c_ab.shape[0]
    if stats.count < n:
        logger.warning("point '%s': %d samples for %d features, the covariances are singular; "
                       "CCA relies on the ridge (%s %g)", point, stats.count, n, mode, ridge)
    dead_a, dead_b = dead_features(stats, c_aa.diagonal(), c_bb.diagonal(), point)
    # numpy/scipy from here: LAPACK via scipy is several times faster than torch's on CPU.
    dead_a, dead_b = dead_a.numpy(), dead_b.numpy()
    whiten_a = lambda: _whitening(c_aa.numpy(), dead_a, ridge, mode, point, "reference")  # noqa: E731
    scale_a, root_a, inv_root_a = whiten_a() if cache is None else cache.get((point, ridge, mode), c_aa, dead_a,
                                                                             whiten_a)
    scale_b, root_b, inv_root_b = _whitening(c_bb.numpy(), dead_b, ridge, mode, point, "model")
    corr_ab = c_ab.numpy() / np.outer(scale_a, scale_b)
    corr_ab[dead_a, :] = 0.0
    corr_ab[:, dead_b] = 0.0
    # Dead features carry no information: pair them dead-to-dead (k-th with k-th) so the
    # polar factor is unique there, and a dead ReLU unit is not mixed into others.
    paired = min(int(dead_a.sum()), int(dead_b.sum()))
    corr_ab[np.flatnonzero(dead_a)[:paired], np.flatnonzero(dead_b)[:paired]] = 1.0
    u, singular, vh = _svd(inv_root_a @ corr_ab @ inv_root_b, point)
    polar = _unique_polar(u, singular, vh)
    # S = D R D with D = diag(scale), R a correlation matrix; whitening by (D R^1/2)^-1.
    matrix = (scale_a[:, None] * root_a) @ polar @ (inv_root_b / scale_b[None, :])
    inverse = (scale_b[:, None] * root_b) @ polar.T @ (inv_root_a / scale_a[None, :])
    return (Transform(matrix=torch.from_numpy(matrix), inverse=torch.from_numpy(inverse)),
            torch.from_numpy(singular))


def _unique_polar(u: np.ndarray, singular: np.ndarray, vh: np.ndarray, tolerance: float = 1e-10) -> np.ndarray:
    """The polar factor ``U V^T``, unique where the SVD is not.

    Directions with a zero singular value (a model's dead features left unpaired, features with no
    correlation at all) are paired by the SVD in an arbitrary rotation that rounding decides: the
    same statistics on two machines (or summed in another order) then give different transforms,
    harmless at ``a = 1`` on the calibration data but not once shrunk towards the identity. There the
    rotation is chosen closest to the identity (orthogonal Procrustes: ``Q`` maximising
    ``tr(U0 Q V0^T)``), so equal statistics up to rounding give equal transforms.
    """
    null = singular <= tolerance * max(float(singular.max(initial=0.0)), 1.0)
    if not null.any():
        return u @ vh
    u0, v0 = u[:, null], vh[null, :].T
    left, _, right = scipy.linalg.svd(u0.T @ v0)
    return u[:, ~null] @ vh[~null, :] + u0 @ (left @ right) @ v0.T


def _svd(matrix: np.ndarray, point: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scipy.linalg.svd`` with the fast divide-and-conquer driver, and the QR driver where it fails.

    LAPACK's ``gesdd`` does not converge on rare, highly degenerate matrices (seen with many
    canonical correlations equal to 1 and dozens of dead features); ``gesvd`` is slower and
    robust. The retry is logged at DEBUG.
    """
    try:
        return scipy.linalg.svd(matrix)
    except np.linalg.LinAlgError:
        logger.debug("point '%s': gesdd SVD did not converge, using gesvd", point)
        return scipy.linalg.svd(matrix, lapack_driver="gesvd")


def _whitening(cov: np.ndarray, dead: np.ndarray, ridge: float, mode: str, point: str,
               side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(d, R^1/2, R^-1/2)`` with ``S = diag(d) R diag(d)`` the ridged ``cov``, dead features decoupled."""
    cov = cov.copy()
    cov[dead, :] = 0.0
    cov[:, dead] = 0.0
    variance = cov.diagonal().copy()
    mean_variance = variance.mean()
    if mode == "trace" and ridge == float("inf"):
        # Procrustes limit: S -> g m I, and T depends only on the ratio of the two m's.
        scale = np.full(len(variance), np.sqrt(mean_variance) if mean_variance > 0 else 1.0)
        eye = np.eye(len(variance))
        return scale, eye, eye
    if mode == "relative":
        variance *= 1.0 + ridge
    else:
        variance += ridge * (mean_variance if mode == "trace" else 1.0)
    live = variance[~dead]
    # A dead feature left at zero variance (ridge 0, or "relative") gets the mean live variance:
    # T stays O(1) on it.
    floor = live.mean() if live.size and live.mean() > 0 else 1.0
    variance[dead & (variance <= 0)] = floor
    scale = np.sqrt(variance)
    corr = cov / np.outer(scale, scale)
    np.fill_diagonal(corr, 1.0)
    eigenvalues, vectors = scipy.linalg.eigh(corr)
    if eigenvalues[0] <= 1e-12 * len(scale):
        raise ValueError(f"point '{point}': the {side}'s feature covariance is singular "
                         f"(fewer samples than features, or collinear features); use ridge > 0")
    root = (vectors * np.sqrt(eigenvalues)) @ vectors.T
    inv_root = (vectors / np.sqrt(eigenvalues)) @ vectors.T
    return scale, root, inv_root


# ----------------------------------------------------------------------------- the method

RIDGE = Parameter("ridge", None, number("ridge", 0.0, math.inf, optional=True),
                  "CCA ridge g >= 0 read in ridge_mode (inf only in 'trace' mode); None: DEFAULT_RIDGES[ridge_mode]",
                  label="g")
RIDGE_MODE = Parameter("ridge_mode", DEFAULT_RIDGE_MODE, one_of("ridge_mode", RIDGE_MODES),
                       f"how the ridge regularises each covariance block: {', '.join(RIDGE_MODES)}", kind=str)


def resolved_ridge(options: Mapping[str, Any]) -> float:
    """The ridge in effect: ``options["ridge"]``, or the default of ``options["ridge_mode"]``."""
    ridge = options.get("ridge")
    return DEFAULT_RIDGES[options.get("ridge_mode", DEFAULT_RIDGE_MODE)] if ridge is None else ridge


def check_ridge(options: Mapping[str, Any]) -> None:
    """An infinite ridge is the Procrustes limit of "trace" mode only."""
    mode = options.get("ridge_mode", DEFAULT_RIDGE_MODE)
    if math.isinf(resolved_ridge(options)) and mode != "trace":
        raise ValueError(f"ridge must be finite in mode {mode!r} (inf only in 'trace' mode)")


def transforms(job: AlignmentJob) -> dict[str, Transform]:
    """CCA Merge's transform at every point of ``job.spec`` (the reference's whitening cached in ``job.cache``)."""
    cache = None if job.cache is None else job.cache.setdefault("cca", WhiteningCache())
    ridge, mode = resolved_ridge(job.options), job.options["ridge_mode"]
    return {p.name: cca_transform(job.pair(p.name), ridge, ridge_mode=mode, point=p.name, cache=cache)
            for p in job.spec.points}


register(Aligner("cca", True, transforms, "CCA Merge (Horoi et al., 2024): T = S_aa^1/2 U V^T S_bb^-1/2",
                 parameters=(RIDGE, RIDGE_MODE), check_options=check_ridge))
