"""Transforms that map a model's features onto the reference's coordinates.

Every function returns :class:`fedcca.alignment.Transform` objects ``T`` (float64) with
``f_ref ~= T f_B`` at one alignment point, together with the exact inverse.

* :func:`cca_transform`: CCA Merge (Horoi et al., 2024) from activation statistics.
* :func:`permute_transform`: a (rescaled) permutation matching features by correlation.
* :func:`weight_matching`: Git Re-Basin weight matching, data free.
* :func:`blend_transform`: a convex combination of two transforms (e.g. Permute and CCA).
* :func:`shrink_transform`: ``I + a (T - I)``, a transform shrunk towards the identity.
* :func:`identity_transform`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import linear_sum_assignment

from fedcca.alignment import AlignmentSpec, ParamAxis, Transform
from fedcca.statistics import PairStatistics, StatisticsError

logger = logging.getLogger(__name__)

RIDGE_MODES: tuple[str, ...] = ("trace", "relative", "absolute")
"""How :func:`cca_transform` regularises each own-covariance block ``C`` with a ridge ``g``:

* ``"trace"`` (default): ``C + g * mean(diag C) * I``. Scale-aware per block, so one value of
  ``g`` fits every layer, and features of small variance (nearly dead ReLUs) are *shrunk*:
  their whitening is bounded by ``1 / sqrt(g * mean variance)``. Exact for a permutation with
  one scale per layer; with a different scale per feature only as ``g -> 0``. ``g = inf`` is
  the (rescaled) orthogonal Procrustes limit ``T = sqrt(m_a / m_b) * polar(C_ab)``.
* ``"relative"``: ``C + g * diag(C)`` (shrinks the correlation matrix towards I). Exact for any
  positively scaled permutation at any ``g``, but a low-variance feature is amplified by
  ``1 / std``: on trained ReLU nets it mixes the large negative pre-activations of nearly dead
  units into live ones (measured in issue 8: one-shot accuracy 16% vs 66% for "trace").
* ``"absolute"``: ``C + g * I``, Horoi et al.'s choice; depends on each layer's scale.
"""

DEFAULT_RIDGE_MODE = "trace"

DEFAULT_RIDGES: dict[str, float] = {"trace": 1.0, "relative": 0.1, "absolute": 1.0}
"""The ridge used when none is given, per mode. The trace value was chosen on held-out
calibration data (never test data) by ``simulations/ablation.py``; see README, Results."""

# A feature is dead when its variance is below this fraction of its squared mean: it is
# constant on the calibration data (exact zeros give 0 <= 0). Relative, so scale-free.
_DEAD_RTOL = 1e-10


def identity_transform(n: int) -> Transform:
    """The identity transform of size ``n`` (leaves a point unchanged).

    Args:
        n: Number of features at the point.
    """
    eye = torch.eye(n, dtype=torch.float64)
    return Transform(matrix=eye, inverse=eye.clone())


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


def permute_transform(stats: PairStatistics, rescale: bool = True, *, max_scale: float = math.inf,
                      point: str = "?") -> Transform:
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
    """
    c_aa, c_bb, c_ab = _checked_covariances(stats, point)
    var_a, var_b = c_aa.diagonal(), c_bb.diagonal()
    dead_a, dead_b = _dead_features(stats, var_a, var_b, point)
    std_a = torch.where(dead_a, 1.0, var_a.clamp_min(0).sqrt())
    std_b = torch.where(dead_b, 1.0, var_b.clamp_min(0).sqrt())
    corr = c_ab / torch.outer(std_a, std_b)
    corr[dead_a, :] = 0.0
    corr[:, dead_b] = 0.0
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
    return _scaled_permutation(rows, cols, scale)


def blend_transform(first: Transform, second: Transform, weight: float, *, point: str = "?") -> Transform:
    """``T = (1 - weight) * first + weight * second`` with a numerically computed inverse.

    Args:
        first: E.g. the rescaled permutation (``weight = 0`` returns it exactly).
        second: E.g. the CCA transform (``weight = 1`` returns it exactly).
        weight: Blend weight in [0, 1].
        point: The point's name, for error messages.

    Raises:
        ValueError: The blend is singular or ill-conditioned (condition number > 1e12).
    """
    if weight == 0:
        return first
    if weight == 1:
        return second
    return _with_inverse((1 - weight) * first.matrix + weight * second.matrix, f"blend {weight:g}", point)


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
    return _with_inverse(eye + amount * (transform.matrix.to(torch.float64) - eye), f"shrinkage {amount:g}", point)


def _with_inverse(matrix: torch.Tensor, what: str, point: str) -> Transform:
    """A Transform of ``matrix`` with its numerical inverse; ValueError when it is ill-conditioned."""
    cond = torch.linalg.cond(matrix).item()
    if not cond < 1e12:
        raise ValueError(f"point '{point}': the {what} transform is singular (condition {cond:.3g})")
    return Transform(matrix=matrix, inverse=torch.linalg.inv(matrix))


def weight_matching(
    reference_state: Mapping[str, torch.Tensor],
    other_state: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Transform]:
    """Git Re-Basin weight matching: permutations making ``other``'s weights closest to the reference's.

    Coordinate descent over the spec's points: for one point, with the other points'
    current permutations applied, the permutation maximising the summed inner product of all
    tensors along the point's axes is a linear assignment (every axis role is permuted
    alike). Points are visited in a random order each iteration; the descent stops after an
    iteration without improvement or after ``max_iter`` iterations. Data free.

    Args:
        reference_state: State dict of the reference model.
        other_state: State dict of the model to align (same keys and shapes).
        spec: Alignment spec; only its points are permuted.
        max_iter: Largest number of sweeps over the points.
        seed: Seed of the point order.

    Returns:
        ``{point name: Transform}`` (permutation matrices) for every point of ``spec``.
    """
    axes_of = _axes_by_key(spec)
    ref = {key: _float64(reference_state, key) for key in axes_of}
    other = {key: _float64(other_state, key) for key in axes_of}
    for key in axes_of:
        if ref[key].shape != other[key].shape:
            raise ValueError(f"weight_matching: '{key}' has shape {tuple(other[key].shape)}, "
                             f"the reference {tuple(ref[key].shape)}")
    perms = {point.name: torch.arange(point.size) for point in spec.points}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(spec.points)):
            point = spec.points[index]
            cost = torch.zeros(point.size, point.size, dtype=torch.float64)
            for axis in point.axes:
                mine = axis.rows(ref[axis.key])
                theirs = _permuted(other[axis.key], axes_of[axis.key], perms, skip=point.name)
                cost += mine @ axis.rows(theirs).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.from_numpy(cols)
            rows = torch.arange(point.size)
            old_score, new_score = cost[rows, perms[point.name]].sum(), cost[rows, new].sum()
            if new_score > old_score + 1e-12 * abs(old_score):
                perms[point.name], improved = new, True
        if not improved:
            break
    ones = torch.ones(1, dtype=torch.float64)
    return {name: _scaled_permutation(np.arange(len(perm)), perm.numpy(), ones.expand(len(perm)))
            for name, perm in perms.items()}


# ----------------------------------------------------------------------------- CCA internals

def _cca(stats: PairStatistics, ridge: float | None, mode: str, point: str,
         cache: WhiteningCache | None = None) -> tuple[Transform, torch.Tensor]:
    if mode not in RIDGE_MODES:
        raise ValueError(f"unknown ridge_mode {mode!r}; choose one of {RIDGE_MODES}")
    ridge = DEFAULT_RIDGES[mode] if ridge is None else float(ridge)
    if not ridge >= 0 or (ridge == float("inf") and mode != "trace"):
        raise ValueError(f"ridge must be >= 0 (inf only in 'trace' mode), got {ridge} in mode {mode!r}")
    c_aa, c_bb, c_ab = _checked_covariances(stats, point)
    n = c_ab.shape[0]
    if stats.count < n:
        logger.warning("point '%s': %d samples for %d features, the covariances are singular; "
                       "CCA relies on the ridge (%s %g)", point, stats.count, n, mode, ridge)
    dead_a, dead_b = _dead_features(stats, c_aa.diagonal(), c_bb.diagonal(), point)
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
    polar = u @ vh
    # S = D R D with D = diag(scale), R a correlation matrix; whitening by (D R^1/2)^-1.
    matrix = (scale_a[:, None] * root_a) @ polar @ (inv_root_b / scale_b[None, :])
    inverse = (scale_b[:, None] * root_b) @ polar.T @ (inv_root_a / scale_a[None, :])
    return (Transform(matrix=torch.from_numpy(matrix), inverse=torch.from_numpy(inverse)),
            torch.from_numpy(singular))


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


# ----------------------------------------------------------------------------- shared helpers

def _checked_covariances(stats: PairStatistics, point: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _dead_features(stats: PairStatistics, var_a: torch.Tensor, var_b: torch.Tensor,
                   point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of features constant on the calibration data; logs a warning when there are any."""
    mean_a, mean_b = (m.double().cpu() for m in stats.means())
    dead_a = var_a <= _DEAD_RTOL * mean_a.square()
    dead_b = var_b <= _DEAD_RTOL * mean_b.square()
    if dead_a.any() or dead_b.any():
        logger.debug("point '%s': %d dead feature(s) in the reference and %d in the model "
                       "(zero variance on the calibration data)", point, int(dead_a.sum()), int(dead_b.sum()))
    return dead_a, dead_b


def _scaled_permutation(rows: np.ndarray, cols: np.ndarray, scale: torch.Tensor) -> Transform:
    """``T[rows[k], cols[k]] = scale[k]``: reference feature rows[k] <- model feature cols[k]."""
    n = len(rows)
    rows_t, cols_t = torch.as_tensor(rows), torch.as_tensor(cols)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    inverse = torch.zeros(n, n, dtype=torch.float64)
    matrix[rows_t, cols_t] = scale
    inverse[cols_t, rows_t] = 1.0 / scale
    return Transform(matrix=matrix, inverse=inverse)


def _axes_by_key(spec: AlignmentSpec) -> dict[str, list[tuple[ParamAxis, str]]]:
    """state-dict key -> [(axis, point name)] over all points of the spec."""
    axes: dict[str, list[tuple[ParamAxis, str]]] = {}
    for point in spec.points:
        for axis in point.axes:
            axes.setdefault(axis.key, []).append((axis, point.name))
    return axes


def _permuted(tensor: torch.Tensor, axes: list[tuple[ParamAxis, str]], perms: Mapping[str, torch.Tensor],
              skip: str) -> torch.Tensor:
    """``tensor`` with every point's permutation applied along its axis, except point ``skip``."""
    for axis, name in axes:
        if name != skip:
            tensor = axis.restore(axis.features(tensor).index_select(axis.axis, perms[name]))
    return tensor


def _float64(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"weight_matching: state dict has no key '{key}' named by the spec")
    return state[key].detach().cpu().double()
