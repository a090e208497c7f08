"""Merge configurations, searches and the named recipes: exactness, fixed points, finiteness,
REPAIR targets, shrinkage towards the identity, and the choice on held-out data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedcca.merging.batchnorm import recompute_batchnorm
from fedcca.merging.config import MergeConfig, MergeSearch
from fedcca.merging.merger import MergeResult, merge_with_result
from fedcca.merging.repair import preactivation_spec, preactivation_statistics
from fedcca.merging.selection import VARIANTS, choose, get_variant, paired_z
from fedcca.methods.blend import blend_transform
from fedcca.methods.cca import cca_transform
from fedcca.methods.common import identity_transform, shrink_transform
from fedcca.spec.tracing import spec_for
from fedcca.statistics import PairStatistics, collect_statistics
from tests.tiny_models import CLASSES, calibration, make_tiny, outputs, symmetric_copy


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


def merge_variant(models: list[nn.Module], calib: torch.Tensor, variant: str, **kwargs: object
                  ) -> tuple[nn.Module, MergeResult]:
    """A named recipe merged all-to-one onto models[0] (the one pipeline), with its report."""
    result = merge_with_result(models, calib, get_variant(variant), keep_transforms=True, **kwargs)
    return result.model, result


# Which copies each variant must undo exactly: the relative ridge and the rescaled permutation
# are covariant under any per-feature positive scale; the trace ridge (the default, and its
# Procrustes limit) only under a uniform scale per point; unscaled permutations (weight
# matching) and the paper's absolute ridge only when there is no rescaling at all.
PER_FEATURE, UNIFORM, NONE = (0.5, 2.0), (1.7, 1.7), (1.0, 1.0)
EXACT_CASES = [(v, PER_FEATURE) for v in ("permute", "cca-relative", "permute-repair", "permute-mean", "permute-keep-dead")] \
    + [(v, UNIFORM) for v in ("cca", "cca-trace", "cca-procrustes", "cca-repair", "cca-trace-repair", "cca-mean", "cca-keep-dead",
                              "blend", "cca-unfolded", "cca-unfolded-repair")] \
    + [(v, NONE) for v in ("cca-paper", "weight-matching", "weight-matching-repair", "zipit", "zipit-repair")]


def test_every_variant_has_an_exactness_case() -> None:
    assert {v for v, _ in EXACT_CASES} | {"direct"} == set(VARIANTS)


@pytest.mark.parametrize(("variant", "scales"), EXACT_CASES)
def test_exact_on_symmetric_copy(variant: str, scales: tuple[float, float], data) -> None:
    calib, holdout = data
    model = _model(0)
    merged, report = merge_variant([model, _copy_with(model, scales)], calib, variant, holdout=holdout)
    torch.testing.assert_close(_outputs(merged, holdout[0]), _outputs(model, holdout[0]), rtol=1e-4, atol=1e-4)
    candidates = len(VARIANTS[variant].candidates())
    assert len(report.scores) == (candidates if candidates > 1 else 0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("batchnorm", [False, True])
def test_identical_models_merge_to_themselves(variant: str, batchnorm: bool, data) -> None:
    calib, holdout = data
    model = _model(3, batchnorm)
    merged, _ = merge_variant([model, copy.deepcopy(model), copy.deepcopy(model)], calib, variant,
                              holdout=holdout)
    # Aligned merges fold BatchNorm and re-fit it (the model's own function); unfolded ones recompute it.
    base = get_variant(variant).base
    folded = base.aligns and base.fold_bn
    expected = model if folded else recompute_batchnorm(copy.deepcopy(model), calib)
    torch.testing.assert_close(_outputs(merged, holdout[0]), _outputs(expected, holdout[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_independent_models_merge_finite(variant: str, data) -> None:
    calib, holdout = data
    merged, report = merge_variant([_model(4, True), _model(5, True), _model(6, True)], calib, variant,
                                   holdout=holdout)
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(_outputs(merged, holdout[0])).all()
    joint = get_variant(variant).base.method == "zipit"  # ZipIt! transforms the reference too
    assert len(report.transforms) == 3 and (report.transforms["models[0]"] == {}) != joint


def test_repair_matches_endpoint_average(data) -> None:
    """After REPAIR every corrected pre-activation has the endpoints' average mean and std."""
    calib, holdout = data
    models = [_model(7, True), _model(8, True)]
    # Without the final norm balancing, which rescales each unit (same function, other statistics).
    merged, report = merge_variant(models, calib, "cca-repair", holdout=holdout, balance=False)
    assert preactivation_spec(spec_for(merged), merged)[1] == {"conv1": "conv1", "conv2": "bn2", "fc1": "fc1"}
    # reference computation: each endpoint's pre-activation stats moved by its transform
    endpoint = preactivation_statistics(models, calib, recompute_bn=False)  # a folded merge keeps their BatchNorm
    pre_spec, _ = preactivation_spec(spec_for(merged), merged)
    # measured as the merged model runs (eval mode, its BatchNorm statistics as left by merging)
    mine = collect_statistics(merged, [merged], calib, pre_spec)[0]
    assert set(mine) == {p.name for p in spec_for(merged).points}
    for point, pair in mine.items():
        mean, cov = pair.means()[1], pair.covariances()[1]
        means, stds = [], []
        for stats, ts in zip(endpoint, [report.transforms[f"models[{k}]"] for k in range(2)]):
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
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        MergeConfig("svd")
    with pytest.raises(ValueError, match="blend must be in"):
        MergeConfig("blend", blend=1.5)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        MergeConfig(shrinkage=-0.1)
    with pytest.raises(ValueError, match="inf only in 'trace'"):
        MergeConfig(ridge=math.inf, ridge_mode="absolute")
    with pytest.raises(ValueError, match="neither a MergeConfig field nor a method parameter"):
        MergeSearch(MergeConfig(), (("alpha", (1, 2)),))
    with pytest.raises(TypeError, match="unknown merge option"):
        MergeConfig.from_options(ridgee=1.0)


def test_search_candidates_are_the_grid_with_the_baseline_first() -> None:
    search = MergeSearch(MergeConfig("cca"), (("shrinkage", (0.0, 0.5, 1.0)), ("repair", ("none", "affine"))))
    labels = [c.label() for c in search.candidates()]
    assert labels == ["direct", "direct +affine", "cca a=0.5", "cca a=0.5 +affine", "cca", "cca +affine"]
    assert not search.candidates()[0].aligns and not search.candidates()[0].needs_statistics


def test_shrinkage_interpolates_from_the_identity() -> None:
    t = cca_transform(_stats(3), 1.0)
    assert shrink_transform(t, 1.0) is t
    torch.testing.assert_close(shrink_transform(t, 0.0).matrix, torch.eye(6, dtype=torch.float64))
    half = shrink_transform(t, 0.5)
    torch.testing.assert_close(half.matrix, 0.5 * (torch.eye(6, dtype=torch.float64) + t.matrix))
    torch.testing.assert_close(half.matrix @ half.inverse, torch.eye(6, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        shrink_transform(t, 1.5)


def test_zero_shrinkage_is_the_plain_average(data) -> None:
    calib, _ = data
    models = [_model(1), _model(2), _model(3)]
    shrunk = merge_with_result(models, calib, MergeConfig("cca", shrinkage=0.0, recompute_bn=False),
                               weights=[1.0, 2.0, 3.0]).model.state_dict()
    states = [m.state_dict() for m in models]
    for key, value in states[0].items():  # against the weighted average written out, not another merge
        if value.is_floating_point():
            expected = sum(w * s[key].double() for w, s in zip((1.0, 2.0, 3.0), states)) / 6.0
            torch.testing.assert_close(shrunk[key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)


def test_choose_keeps_the_baseline_unless_a_candidate_is_significantly_better() -> None:
    """Three candidates whose held-out losses we control: a copy of the labels' teacher wins only by a margin."""
    x = calibration(200, seed=9)
    teacher = _model(9)
    with torch.no_grad():
        teacher.fc2.weight.mul_(30.0)  # confident: near-zero loss on its own labels
    labels = outputs(teacher, x).argmax(1)
    stranger, close = _model(10), copy.deepcopy(teacher)
    configs = [MergeConfig("direct"), MergeConfig("cca", shrinkage=0.5), MergeConfig("cca")]
    index, scores = choose([stranger, close, teacher], configs, x, labels, min_z=2.0)
    assert index in (1, 2) and scores[index].chosen and scores[0].z == 0.0 and scores[index].z > 2.0
    assert scores[index].loss == min(s.loss for s in scores)
    kept, scores = choose([stranger, close, teacher], configs, x, labels, min_z=math.inf)
    assert kept == 0 and scores[0].chosen  # no margin can be met: the baseline stays


def test_paired_z() -> None:
    assert paired_z(torch.tensor([1.0, 1.0, 1.0])) == math.inf
    assert paired_z(torch.zeros(3)) == 0.0
    assert paired_z(torch.tensor([1.0, float("nan")])) == -math.inf
    gain = torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64)
    assert paired_z(gain) == pytest.approx(1.0 / (gain.std().item() / 2))
