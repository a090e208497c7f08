"""BatchNorm folding: folded models keep their function, dense transforms act exactly on folded
pre-activations (and not on unfolded ones), re-fitting gives real statistics without changing the function."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedcca.alignment import Transform, apply_transforms, spec_for
from fedcca.batchnorm import fold_batchnorm, folded_spec, refit_batchnorm
from fedcca.models import build_model

SIDE = 16


def _bn_model(name: str) -> nn.Module:
    """A small BN model with random affine parameters and running statistics (eval mode)."""
    torch.manual_seed(3)
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
