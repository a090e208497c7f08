"""BatchNorm folding: folded models keep their function, dense transforms act exactly on folded
pre-activations (and not on unfolded ones), re-fitting gives real statistics without changing the function,
and a folded merge's BatchNorms are restored to the endpoints' average output spread."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedcca.merging.repair as repair_module
from fedcca.merging.batchnorm import fold_batchnorm, folded_spec, refit_batchnorm
from fedcca.merging.config import MergeConfig
from fedcca.merging.merger import Merger
from fedcca.merging.repair import norm_output_spec, norm_output_statistics, restore_norms
from fedcca.models import build_model
from fedcca.spec.alignment import Transform, apply_transforms
from fedcca.spec.tracing import spec_for

SIDE = 16


def _bn_model(name: str, seed: int = 3) -> nn.Module:
    """A small BN model with random affine parameters and running statistics (eval mode)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=5, in_channels=3, width=0.25 if name == "vgg11_bn" else 0.5)
    model.train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.normal_(module.bias, 0.0, 0.3)
                module.momentum = None
        model(torch.randn(16, 3, SIDE, SIDE))  # running statistics of real (random) inputs
    return model.eval()


def _with(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


def _outputs_of(model: nn.Module, module_name: str, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = dict(model.named_modules())[module_name].register_forward_hook(lambda m, i, out: captured.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured[0].double()


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20"])
def test_folding_keeps_the_function(name: str) -> None:
    model = _bn_model(name)
    spec = spec_for(model)
    assert spec.norms
    folded = _with(model, fold_batchnorm(model, spec))
    x = torch.randn(4, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for _, norm in spec.norms:  # every folded BatchNorm is a pass-through plus a bias
        bn = dict(folded.named_modules())[norm]
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.running_mean.any()


@pytest.mark.parametrize("fold", [True, False])
def test_a_dense_transform_moves_the_folded_pre_activation_exactly(fold: bool) -> None:
    """One point, one dense invertible T: folded, the BatchNorm's output becomes T times the original."""
    model = _bn_model("vgg11_bn")
    spec = spec_for(model)
    point = spec.points[0]  # conv features.0 -> BatchNorm features.1 -> ReLU
    generator = torch.Generator().manual_seed(0)
    t = torch.eye(point.size, dtype=torch.float64) + 0.3 * torch.randn(point.size, point.size, generator=generator,
                                                                        dtype=torch.float64)
    transform = Transform(t, torch.linalg.inv(t))
    state, used = (fold_batchnorm(model, spec), folded_spec(spec)) if fold else (model.state_dict(), spec)
    moved = _with(model, apply_transforms(state, used, {point.name: transform}))
    x = torch.randn(3, 3, SIDE, SIDE)
    before, after = _outputs_of(model, "features.1", x), _outputs_of(moved, "features.1", x)
    expected = torch.einsum("ij,nj...->ni...", t, before)
    assert torch.allclose(after, expected, rtol=1e-4, atol=1e-4) == fold  # unfolded: BatchNorm breaks it


def test_refit_gives_real_statistics_and_keeps_the_function() -> None:
    model = _bn_model("resnet20")
    spec = spec_for(model)
    folded = _with(model, fold_batchnorm(model, spec))
    x = torch.randn(24, 3, SIDE, SIDE)
    with torch.no_grad():
        expected = folded(x)
    refit_batchnorm(folded, spec, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    # The first BatchNorm's running statistics are now those of its inputs on x.
    inputs = _outputs_of(folded, "conv1", x).movedim(1, -1).reshape(-1, folded.bn1.num_features)
    torch.testing.assert_close(folded.bn1.running_mean.double(), inputs.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.bn1.running_var.double(), inputs.var(0), rtol=1e-5, atol=1e-5)


def _output_spread(model: nn.Module, norm: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = _outputs_of(model, norm, x).movedim(1, -1).reshape(-1, dict(model.named_modules())[norm].num_features)
    return out.mean(0), out.std(0, unbiased=False)


def test_norm_output_spec_has_every_batchnorm_including_residual_streams() -> None:
    model = _bn_model("resnet20")
    spec = spec_for(model)
    outputs, owners = norm_output_spec(spec, model)
    assert [p.name for p in outputs.points] == [norm for _, norm in spec.norms]
    stream = {point.name for point in spec.points if len([n for n, p in owners.items() if p == point.name]) > 1}
    assert stream  # a residual stream holds several BatchNorms, each corrected on its own


def test_restore_sets_every_batchnorm_output_to_its_target() -> None:
    model = _bn_model("resnet20")
    spec = spec_for(model)
    folded = _with(model, fold_batchnorm(model, spec))
    x = torch.randn(24, 3, SIDE, SIDE)
    refit_batchnorm(folded, spec, x)
    generator = torch.Generator().manual_seed(1)
    modules = dict(folded.named_modules())
    targets = {norm: (torch.randn(modules[norm].num_features, generator=generator, dtype=torch.float64),
                      torch.rand(modules[norm].num_features, generator=generator, dtype=torch.float64) + 0.5)
               for _, norm in spec.norms}
    restore_norms(folded, targets, x, spec)
    for _, norm in spec.norms:
        mean, std = _output_spread(folded, norm, x)
        torch.testing.assert_close(mean, targets[norm][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(std, targets[norm][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20"])
def test_a_folded_merge_restores_the_average_output_spread(name: str) -> None:
    """Permute in folded form: each BatchNorm's output mean and std become the aligned models' average.

    Without the restore, the average of two unrelated models has collapsed spreads (what
    re-estimating BatchNorm makes up for in an unfolded merge)."""
    a, b = _bn_model(name, seed=3), _bn_model(name, seed=4)
    spec = spec_for(a)
    x = torch.randn(32, 3, SIDE, SIDE)
    merger = Merger(a, x, MergeConfig("permute", repair="none", balance=False, zero_dead=False), keep_transforms=True)
    merger.add(a, is_reference=True, name="a")
    merger.add(b, name="b")
    result = merger.finish()
    owners = norm_output_spec(spec, a)[1]
    ends = dict(zip("ab", norm_output_statistics([a, b], x, spec)))
    for _, norm in spec.norms:
        t = result.transforms["b"][owners[norm]].matrix
        mean_b, cov_b = t @ ends["b"][norm][0], t @ ends["b"][norm][1] @ t.T
        mean, std = _output_spread(result.model, norm, x)
        torch.testing.assert_close(mean, (ends["a"][norm][0] + mean_b) / 2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(std, (ends["a"][norm][1].diagonal().sqrt() + cov_b.diagonal().sqrt()) / 2,
                                   rtol=1e-4, atol=1e-4)


def test_repair_after_a_folded_restore_skips_the_points_it_would_leave_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """REPAIR of a point fed by a restored BatchNorm finds its targets already met: skipped, same model."""
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    models = [_bn_model("vgg11_bn", seed=s) for s in (3, 4, 5)]
    measured: list[str] = []
    original = repair_module.feature_moments

    def counted(model, calibration, point, **kwargs):  # noqa: ANN001, ANN003, ANN202
        measured.append(point.name)
        return original(model, calibration, point, **kwargs)

    monkeypatch.setattr(repair_module, "feature_moments", counted)
    merged = {}
    for skip in (True, False):
        merger = Merger(models[0], x, MergeConfig("cca", repair="affine"))
        producers = dict(merger._norm_producers)  # pylint: disable=protected-access
        assert producers  # vgg11_bn: every point's pre-activation is a BatchNorm's output
        if not skip:
            merger._norm_producers = {}  # pylint: disable=protected-access  # REPAIR every point, as before
        for model in models:
            merger.add(model)
        measured.clear()
        merged[skip] = merger.finish().model.state_dict()
        restored = [name for name in measured if name in producers.values()]  # restore_norms measures the norms
        repaired = [name for name in measured if name in producers]
        assert restored and (repaired == [] if skip else set(repaired) == set(producers))
    for key, value in merged[False].items():
        torch.testing.assert_close(merged[True][key], value, rtol=1e-4, atol=1e-5, msg=key)
