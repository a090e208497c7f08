"""fedcca.methods (cca, permute, weight_matching, common): CCA against an independent numpy/scipy reference, Permute, weight matching."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import scipy.linalg
import torch

import fedcca.methods.cca as cca_module
from fedcca.methods.cca import DEFAULT_RIDGES, WhiteningCache, canonical_correlations, cca_transform
from fedcca.methods.common import identity_transform, shrink_transform
from fedcca.methods.permute import permute_transform
from fedcca.methods.weight_matching import weight_matching
from fedcca.statistics import PairStatistics
from tests.tiny_models import make_tiny, symmetric_copy


def _stats(a: np.ndarray, b: np.ndarray) -> PairStatistics:
    return PairStatistics.from_features(torch.from_numpy(a), torch.from_numpy(b))


def _synthetic(n: int = 4000, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two views sharing latent factors of different strengths, with non-zero means."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, dim))
    a = latent @ rng.normal(size=(dim, dim)) + rng.normal(size=(n, dim)) * 0.5 + 3.0
    b = (latent * np.linspace(1.0, 0.2, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=(n, dim)) - 1.0
    return a, b


def _scaled_permutation(dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = np.zeros((dim, dim))
    q[np.arange(dim), rng.permutation(dim)] = rng.uniform(0.3, 3.0, dim)
    return q


def _numpy_cca(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain CCA: generalised eigenproblem C_ab C_bb^-1 C_ba w = rho^2 C_aa w (descending)."""
    joint = np.cov(np.concatenate([a, b], axis=1), rowvar=False, bias=True)
    d = a.shape[1]
    c_aa, c_bb, c_ab = joint[:d, :d], joint[d:, d:], joint[:d, d:]
    rho2, w_a = scipy.linalg.eigh(c_ab @ np.linalg.solve(c_bb, c_ab.T), c_aa)  # w_a^T C_aa w_a = I
    rho2, w_a = rho2[::-1], w_a[:, ::-1]
    rho = np.sqrt(rho2)
    w_b = np.linalg.solve(c_bb, c_ab.T @ w_a) / rho
    return rho, w_a, w_b


def test_cca_matches_a_numpy_reference() -> None:
    a, b = _synthetic()
    stats = _stats(a, b)
    rho, w_a, w_b = _numpy_cca(a, b)
    np.testing.assert_allclose(canonical_correlations(stats, ridge=0.0).numpy(), rho, rtol=1e-8)
    transform = cca_transform(stats, ridge=0.0)
    # T sends B's canonical variates onto A's: w_a^T (T b) = w_b^T b for every pair.
    np.testing.assert_allclose(w_a.T @ transform.matrix.numpy(), w_b.T, atol=1e-8)
    np.testing.assert_allclose(transform.inverse.numpy() @ transform.matrix.numpy(), np.eye(5), atol=1e-10)


_RIDGED = {  # the paper's formula with each mode's ridged own blocks, written independently
    "relative": lambda c, g: c + g * np.diag(np.diag(c)),
    "trace": lambda c, g: c + g * np.trace(c) / len(c) * np.eye(len(c)),
    "absolute": lambda c, g: c + g * np.eye(len(c)),
}


@pytest.mark.parametrize("mode", sorted(_RIDGED))
@pytest.mark.parametrize("ridge", [0.0, 0.1, 3.0])
def test_cca_ridge_matches_the_symmetric_root_formula(mode: str, ridge: float) -> None:
    a, b = _synthetic(seed=1)
    b = 3.0 * b  # unequal scales: the modes differ
    joint = np.cov(np.concatenate([a, b], axis=1), rowvar=False, bias=True)
    c_aa, c_bb, c_ab = joint[:5, :5], joint[5:, 5:], joint[:5, 5:]
    c_aa, c_bb = _RIDGED[mode](c_aa, ridge), _RIDGED[mode](c_bb, ridge)
    root_a, root_b = scipy.linalg.sqrtm(c_aa).real, scipy.linalg.sqrtm(c_bb).real
    u, s, vh = np.linalg.svd(np.linalg.solve(root_a, c_ab) @ np.linalg.inv(root_b))
    expected = root_a @ u @ vh @ np.linalg.inv(root_b)
    transform = cca_transform(_stats(a, b), ridge=ridge, ridge_mode=mode)
    np.testing.assert_allclose(transform.matrix.numpy(), expected, atol=1e-8)
    np.testing.assert_allclose(transform.inverse.numpy(), np.linalg.inv(expected), atol=1e-8)
    np.testing.assert_allclose(canonical_correlations(_stats(a, b), ridge, ridge_mode=mode).numpy(), s, atol=1e-10)


def test_default_is_the_trace_ridge_and_unknown_modes_raise() -> None:
    stats = _stats(*_synthetic(seed=1))
    torch.testing.assert_close(cca_transform(stats).matrix,
                               cca_transform(stats, DEFAULT_RIDGES["trace"], ridge_mode="trace").matrix)
    with pytest.raises(ValueError, match="unknown ridge_mode 'tikhonov'"):
        cca_transform(stats, ridge_mode="tikhonov")
    with pytest.raises(ValueError, match="inf only in 'trace' mode"):
        cca_transform(stats, float("inf"), ridge_mode="relative")


def test_infinite_trace_ridge_is_the_scaled_procrustes_solution() -> None:
    a, b = _synthetic(seed=8)
    b = 2.0 * b
    joint = np.cov(np.concatenate([a, b], axis=1), rowvar=False, bias=True)
    c_aa, c_bb, c_ab = joint[:5, :5], joint[5:, 5:], joint[:5, 5:]
    u, _, vh = np.linalg.svd(c_ab)
    expected = np.sqrt(np.trace(c_aa) / np.trace(c_bb)) * u @ vh
    transform = cca_transform(_stats(a, b), float("inf"))
    np.testing.assert_allclose(transform.matrix.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(transform.matrix.numpy(), cca_transform(_stats(a, b), 1e9).matrix.numpy(), atol=1e-6)


@pytest.mark.parametrize("ridge", [0.0, 0.1, 100.0])
def test_cca_and_permute_recover_a_scaled_permutation_at_any_ridge(ridge: float) -> None:
    """Relative ridge: any positive per-feature scale; trace ridge: one scale per point."""
    a, _ = _synthetic(seed=2)
    q = _scaled_permutation(5, seed=7)
    stats = _stats(a, a @ q.T)  # b = Q a
    np.testing.assert_allclose(cca_transform(stats, ridge, ridge_mode="relative").matrix.numpy(),
                               np.linalg.inv(q), atol=1e-9)
    uniform = 2.5 * (q != 0)
    for g in (ridge, float("inf")):
        np.testing.assert_allclose(cca_transform(_stats(a, a @ uniform.T), g).matrix.numpy(),
                                   np.linalg.inv(uniform), atol=1e-9)
    if ridge > 0:  # per-feature scales are not undone exactly by the trace ridge: a real difference
        assert not np.allclose(cca_transform(stats, ridge).matrix.numpy(), np.linalg.inv(q), atol=1e-6)
    permuted = permute_transform(stats)
    np.testing.assert_allclose(permuted.matrix.numpy(), np.linalg.inv(q), atol=1e-12)
    np.testing.assert_allclose(permuted.inverse.numpy(), q, atol=1e-12)
    np.testing.assert_array_equal(permute_transform(stats, rescale=False).matrix.numpy(), (np.linalg.inv(q) > 0))


def test_permute_maximises_total_correlation() -> None:
    a, b = _synthetic(dim=5, seed=3)
    stats = _stats(a, b)
    corr = np.corrcoef(a, b, rowvar=False)[:5, 5:]
    best = max(itertools.permutations(range(5)), key=lambda p: corr[np.arange(5), list(p)].sum())
    matrix = permute_transform(stats, rescale=False).matrix.numpy()
    np.testing.assert_array_equal(matrix.argmax(axis=1), best)


@pytest.mark.parametrize("mode", ["relative", "trace", "absolute"])
def test_dead_features_are_logged_and_paired(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    a, _ = _synthetic(seed=4)
    a[:, 1] = 0.0                                   # a dead unit (ReLU never active)
    q = _scaled_permutation(5, seed=5)
    with caplog.at_level(logging.DEBUG, logger="fedcca.methods"):
        transform = cca_transform(_stats(a, a @ q.T), ridge_mode=mode, point="layer3")
    assert "point 'layer3': 1 dead feature(s) in the reference and 1 in the model" in caplog.text
    matrix = transform.matrix.numpy()
    assert np.isfinite(matrix).all() and np.isfinite(transform.inverse.numpy()).all()
    live = [0, 2, 3, 4]
    expected = np.linalg.inv(q)
    if mode == "relative":  # the only mode exact under per-feature scales
        np.testing.assert_allclose(matrix[live][:, expected[live].argmax(1)],
                                   expected[live][:, expected[live].argmax(1)], atol=1e-9)
    dead_col = int(np.flatnonzero(q[1])[0])         # b's dead feature is only sent to a's dead one
    assert np.count_nonzero(np.abs(matrix[:, dead_col]) > 1e-12) == 1 and matrix[1, dead_col] > 0


def test_fewer_samples_than_features(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    with caplog.at_level(logging.WARNING, logger="fedcca.methods"):
        transform = cca_transform(_stats(a, b), ridge=0.1, point="fc")
    assert "point 'fc': 4 samples for 8 features" in caplog.text
    assert torch.isfinite(transform.matrix).all() and torch.isfinite(transform.inverse).all()
    torch.testing.assert_close(transform.inverse @ transform.matrix, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="singular.*use ridge > 0"):
        cca_transform(_stats(a, b), ridge=0.0, point="fc")


def test_weight_matching_recovers_a_pure_permutation() -> None:
    model = make_tiny(1)
    other = symmetric_copy(model, seed=11, scale_range=(1.0, 1.0))
    spec = model.alignment_spec()
    found = weight_matching(model.state_dict(), other.state_dict(), spec)
    from fedcca.spec.alignment import apply_transforms
    aligned = apply_transforms(other.state_dict(), spec, found)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(aligned[key], value, rtol=0, atol=0)
    same = weight_matching(model.state_dict(), model.state_dict(), spec)
    assert all(torch.equal(t.matrix, torch.eye(t.matrix.shape[0], dtype=torch.float64)) for t in same.values())


def test_identity_transform() -> None:
    t = identity_transform(3)
    assert t.matrix.dtype == torch.float64 and torch.equal(t.matrix, torch.eye(3, dtype=torch.float64))
    assert torch.equal(t.inverse, t.matrix)


def test_svd_falls_back_to_the_robust_driver(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """gesdd does not converge on rare degenerate matrices: the QR driver takes over, logged at DEBUG."""
    import fedcca.methods.cca as cca_module

    original = scipy.linalg.svd

    def flaky(matrix, lapack_driver="gesdd", **kwargs):  # noqa: ANN001, ANN003, ANN202
        if lapack_driver == "gesdd":
            raise np.linalg.LinAlgError("SVD did not converge")
        return original(matrix, lapack_driver=lapack_driver, **kwargs)

    a, _ = _synthetic(seed=9)
    q = _scaled_permutation(5, seed=9)
    expected = cca_transform(_stats(a, a @ q.T), ridge_mode="relative")
    monkeypatch.setattr(cca_module.scipy.linalg, "svd", flaky)
    with caplog.at_level(logging.DEBUG, logger="fedcca.methods"):
        got = cca_transform(_stats(a, a @ q.T), ridge_mode="relative", point="deep")
    assert "point 'deep': gesdd SVD did not converge, using gesvd" in caplog.text
    torch.testing.assert_close(got.matrix, expected.matrix, rtol=1e-9, atol=1e-9)


def test_whitening_cache_reuses_only_an_identical_reference() -> None:
    """One reference, several models: the cached reference whitening gives the uncached transforms;
    a different reference covariance under the same key is recomputed, not reused."""
    a, _ = _synthetic(seed=11)
    cache = WhiteningCache()
    for seed in (12, 13):
        b = a @ _scaled_permutation(5, seed=seed).T + 0.1 * np.random.default_rng(seed).normal(size=a.shape)
        torch.testing.assert_close(cca_transform(_stats(a, b), point="p", cache=cache).matrix,
                                   cca_transform(_stats(a, b), point="p").matrix, rtol=0, atol=0)
    other, _ = _synthetic(seed=14)
    b = other @ _scaled_permutation(5, seed=15).T
    torch.testing.assert_close(cca_transform(_stats(other, b), point="p", cache=cache).matrix,
                               cca_transform(_stats(other, b), point="p").matrix, rtol=0, atol=0)


@pytest.mark.parametrize("unique", [True, False])
def test_cca_with_unpaired_dead_features_does_not_depend_on_rounding(unique: bool, monkeypatch) -> None:  # noqa: ANN001
    """B has more dead features than A: the SVD leaves a null space whose pairing rounding decides.
    The transform (and its shrunk version) must not move when the statistics move by 1e-12 relative;
    with the plain polar factor ``U V^T`` (``unique=False``) it does, which shows the test can fail."""
    if not unique:
        monkeypatch.setattr(cca_module, "_unique_polar", lambda u, singular, vh: u @ vh)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, generator=generator, dtype=torch.float64).relu()
    b = a[:, torch.randperm(12, generator=generator)] + 0.3 * torch.randn(400, 12, generator=generator,
                                                                        dtype=torch.float64)
    a[:, :2] = 0.0  # A: 2 dead features
    b[:, 3:8] = 0.0  # B: 5 dead, 3 of them unpaired
    stats = PairStatistics.from_features(a, b)
    moved = []
    for seed in range(4):
        noise = torch.randn(stats.cross.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        nudged = PairStatistics(stats.a, stats.b, stats.cross * (1 + 1e-12 * noise))
        for amount in (1.0, 0.5):
            first = shrink_transform(cca_transform(stats, 1.0), amount).matrix
            second = shrink_transform(cca_transform(nudged, 1.0), amount).matrix
            moved.append(float((first - second).abs().max()))
    if unique:
        assert max(moved) < 1e-6
    else:
        assert max(moved) > 1e-3
