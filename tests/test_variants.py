"""Merge variants (fedcca.variants): exactness, fixed points, finiteness, REPAIR targets."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # only effective when this file runs alone

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fedcca.alignment import spec_for  # noqa: E402
from fedcca.batchnorm import recompute_batchnorm  # noqa: E402
from fedcca.repair import preactivation_spec, preactivation_statistics  # noqa: E402
from fedcca.statistics import PairStatistics, collect_statistics  # noqa: E402
from fedcca.transforms import cca_transform, identity_transform  # noqa: E402
from fedcca.variants import VARIANTS, Variant, blend_transform, merge_variant  # noqa: E402
from tests.coreb_helpers import CLASSES, calibration, make_tiny, outputs, symmetric_copy  # noqa: E402


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    holdout = calibration(24, seed=7)
    labels = torch.randint(0, CLASSES, (24,), generator=torch.Generator().manual_seed(8))
    return calibration(48, seed=5), (holdout, labels)


def _model(seed: int, batchnorm: bool = False) -> nn.Module:
    return make_tiny(seed, batchnorm)


def _copy_with(model: nn.Module, scale_range: tuple[float, float]) -> nn.Module:
    return symmetric_copy(model, seed=11, scale_range=scale_range)


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return outputs(model, x)


# Which copies each variant must undo exactly: the relative ridge and the rescaled permutation
# are covariant under any per-feature positive scale; the trace ridge (the default, and its
# Procrustes limit) only under a uniform scale per point; unscaled permutations (weight
# matching) and the paper's absolute ridge only when there is no rescaling at all.
PER_FEATURE, UNIFORM, NONE = (0.5, 2.0), (1.7, 1.7), (1.0, 1.0)
EXACT_CASES = [(v, PER_FEATURE) for v in ("permute", "cca-relative", "permute-repair", "permute-mean", "permute-keep-dead")] \
    + [(v, UNIFORM) for v in ("cca", "cca-trace", "cca-procrustes", "cca-repair", "cca-trace-repair", "cca-mean", "cca-keep-dead",
                              "blend")] \
    + [(v, NONE) for v in ("cca-paper", "weight-matching", "weight-matching-repair")]


def test_every_variant_has_an_exactness_case() -> None:
    assert {v for v, _ in EXACT_CASES} | {"direct"} == set(VARIANTS)


@pytest.mark.parametrize(("variant", "scales"), EXACT_CASES)
def test_exact_on_symmetric_copy(variant: str, scales: tuple[float, float], data) -> None:
    calib, holdout = data
    model = _model(0)
    merged, report = merge_variant([model, _copy_with(model, scales)], calib, variant, holdout=holdout)
    torch.testing.assert_close(_outputs(merged, holdout[0]), _outputs(model, holdout[0]), rtol=1e-4, atol=1e-4)
    assert len(report.scores) == len(VARIANTS[variant].candidates())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batchnorm", [False, True])
def test_identical_models_merge_to_themselves(variant: str, batchnorm: bool, data) -> None:
    calib, holdout = data
    model = _model(3, batchnorm)
    merged, _ = merge_variant([model, copy.deepcopy(model), copy.deepcopy(model)], calib, variant,
                              holdout=holdout)
    expected = recompute_batchnorm(copy.deepcopy(model), calib)  # merging always recomputes BatchNorm
    torch.testing.assert_close(_outputs(merged, holdout[0]), _outputs(expected, holdout[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_independent_models_merge_finite(variant: str, data) -> None:
    calib, holdout = data
    merged, report = merge_variant([_model(4, True), _model(5, True), _model(6, True)], calib, variant,
                                   holdout=holdout)
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(_outputs(merged, holdout[0])).all()
    assert len(report.transforms) == 3 and report.transforms[0] == {}


def test_repair_matches_endpoint_average(data) -> None:
    """After REPAIR every corrected pre-activation has the endpoints' average mean and std."""
    calib, holdout = data
    models = [_model(7, True), _model(8, True)]
    merged, report = merge_variant(models, calib, "cca-repair", holdout=holdout)
    assert preactivation_spec(spec_for(merged), merged)[1] == {"conv1": "conv1", "conv2": "bn2", "fc1": "fc1"}
    # reference computation: each endpoint's pre-activation stats moved by its transform
    endpoint = preactivation_statistics(models, calib)
    pre_spec, _ = preactivation_spec(spec_for(merged), merged)
    # measured as the merged model runs (eval mode, its BatchNorm statistics as left by merging)
    mine = collect_statistics(merged, [merged], calib, pre_spec)[0]
    assert set(mine) == {p.name for p in spec_for(merged).points}
    for point, pair in mine.items():
        mean, cov = pair.means()[1], pair.covariances()[1]
        means, stds = [], []
        for stats, ts in zip(endpoint, report.transforms):
            t = ts.get(point, identity_transform(len(mean))).matrix
            means.append(t @ stats[point][0])
            stds.append((t @ stats[point][1] @ t.T).diagonal().sqrt())
        torch.testing.assert_close(mean, torch.stack(means).mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cov.diagonal().sqrt(), torch.stack(stds).mean(0), rtol=1e-5, atol=1e-6)


def _stats(seed: int, n: int = 6, samples: int = 400) -> PairStatistics:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(samples, n, generator=generator, dtype=torch.float64) @ torch.randn(n, n, generator=generator,
                                                                                          dtype=torch.float64)
    b = a @ torch.randn(n, n, generator=generator, dtype=torch.float64) + 0.3 * torch.randn(
        samples, n, generator=generator, dtype=torch.float64)
    return PairStatistics.from_features(a, b)


def test_trace_ridge_shrinks_low_variance_features() -> None:
    """A nearly constant model feature gets a small column with the trace ridge, a 1/std one with the relative."""
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(2000, 4, generator=generator, dtype=torch.float64)
    b = a.clone()
    b[:, 3] = 1e-3 * torch.randn(2000, generator=generator, dtype=torch.float64)  # uncorrelated, tiny
    stats = PairStatistics.from_features(a, b)
    assert cca_transform(stats, 0.1, ridge_mode="relative").matrix[:, 3].norm() > 100
    # O(1) weight instead of ~1/std: a near-dead unit's large pre-activation is not amplified
    assert cca_transform(stats, 1.0, ridge_mode="trace").matrix[:, 3].norm() < 2


def test_blend_endpoints_and_inverse() -> None:
    p, c = identity_transform(6), cca_transform(_stats(3), 1.0)
    assert blend_transform(p, c, 0.0) is p and blend_transform(p, c, 1.0) is c
    mid = blend_transform(p, c, 0.5)
    torch.testing.assert_close(mid.matrix @ mid.inverse, torch.eye(6, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_selection_requires_holdout(data) -> None:
    calib, _ = data
    with pytest.raises(ValueError, match="holdout"):
        merge_variant([_model(0), _model(1)], calib, "cca-trace")


def test_bad_variant_settings_raise() -> None:
    with pytest.raises(ValueError, match="unknown merge variant"):
        merge_variant([_model(0)], calibration(4), "nope")
    with pytest.raises(ValueError, match="alignment"):
        Variant("svd")
    with pytest.raises(ValueError, match="blends"):
        Variant("blend", blends=(1.5,))
