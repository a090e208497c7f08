"""The alignment structure of every model: symmetries preserve the function, specs are complete."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fedcca.alignment import (
    AlignmentSpec,
    ParamAxis,
    UnsupportedModelError,
    apply_transforms,
    random_symmetry,
    spec_for,
)
from fedcca.models import MODEL_NAMES, build_model

CASES = [(name, ch) for name in MODEL_NAMES for ch in (1, 3)]


def _prepared(name: str, in_channels: int, seed: int = 0) -> nn.Module:
    """A model with non-trivial BatchNorm affine parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=7, in_channels=in_channels)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_channels, 12, 12))
    return model.eval()


def _transformed(model: nn.Module, spec: AlignmentSpec, transforms) -> nn.Module:
    clone = build_model(*_signature(model))
    clone.load_state_dict(apply_transforms(model.state_dict(), spec, transforms))
    return clone.eval()


def _signature(model: nn.Module) -> tuple[str, int, int]:
    name = {"CNN": "cnn", "ResNet20": "resnet20"}.get(type(model).__name__)
    if name is None:
        name = "vgg11_bn" if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) else "vgg11"
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return name, last.out_features, first.in_channels


@pytest.mark.parametrize(("name", "in_channels"), CASES)
def test_scaled_permutation_preserves_function(name: str, in_channels: int) -> None:
    model = _prepared(name, in_channels)
    spec = spec_for(model)
    sym = random_symmetry(spec, torch.Generator().manual_seed(1))
    moved = _transformed(model, spec, sym)
    x = torch.randn(4, in_channels, 12, 12)
    with torch.no_grad():
        ref, out = model(x), moved(x)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    weights = [k for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() == 4]
    assert all(not torch.equal(model.state_dict()[k], moved.state_dict()[k]) for k in weights)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dropping_a_consumer_axis_breaks_function(name: str) -> None:
    """Negative control: the preservation test above can fail when the spec is wrong."""
    model = _prepared(name, 3)
    spec = spec_for(model)
    point = spec.points[0]
    axes = tuple(a for a in point.axes if a.role != "in")
    broken = AlignmentSpec((dataclasses.replace(point, axes=axes),) + spec.points[1:], spec.fixed)
    sym = random_symmetry(spec, torch.Generator().manual_seed(2))
    moved = _transformed(model, broken, sym)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        gap = (moved(x) - ref).abs().max().item()
    assert gap > 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_transform_then_inverse_is_identity(name: str) -> None:
    model = _prepared(name, 1)
    spec = spec_for(model)
    state = model.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    sym = random_symmetry(spec, torch.Generator().manual_seed(3))
    inv = {k: dataclasses.replace(t, matrix=t.inverse, inverse=t.matrix) for k, t in sym.items()}
    back = apply_transforms(apply_transforms(state, spec, sym), spec, inv)
    for key, value in state.items():
        assert torch.equal(value, snapshot[key]), f"{key} was modified in place"
        assert back[key].dtype == value.dtype
        assert torch.allclose(back[key].double(), value.double(), atol=1e-5), key


def test_resnet20_points_and_sizes() -> None:
    spec = spec_for(build_model("resnet20", width=2))
    assert len(spec.points) == 12
    streams = [p for p in spec.points if p.name.count(".") == 0]
    assert [(p.name, p.size, len(p.taps)) for p in streams] == [("layer1", 32, 3), ("layer2", 64, 3), ("layer3", 128, 3)]
    assert sorted({p.size for p in spec.points if "." in p.name}) == [32, 64, 128]


def test_model_without_spec_names_its_first_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*'0' \(Conv2d\)"):
        spec_for(model)


def test_layer_unknown_to_the_spec_is_an_error() -> None:
    model = build_model("cnn")
    model.extra = nn.Linear(10, 10)  # a user's subclass adding a layer the spec does not describe
    with pytest.raises(UnsupportedModelError, match=r"layer 'extra'"):
        spec_for(model)


def test_layer_type_fedcca_cannot_align_is_an_error() -> None:
    model = build_model("cnn")
    model.features.append(nn.GroupNorm(2, 128))
    with pytest.raises(UnsupportedModelError, match=r"GroupNorm"):
        spec_for(model)


def test_wrong_size_names_point_and_key() -> None:
    model = build_model("cnn")
    spec = spec_for(model)
    bad = AlignmentSpec((dataclasses.replace(spec.points[0], size=31),) + spec.points[1:], spec.fixed)
    with pytest.raises(UnsupportedModelError, match=r"point 'features.0'.*'features.0.weight'"):
        bad.validate(model)


def test_missing_key_is_an_error() -> None:
    model = build_model("cnn")
    spec = spec_for(model)
    point = spec.points[0]
    bad_point = dataclasses.replace(point, axes=point.axes + (ParamAxis("nope.weight", 0, "out"),))
    with pytest.raises(UnsupportedModelError, match=r"'nope.weight'"):
        AlignmentSpec((bad_point,) + spec.points[1:], spec.fixed).validate(model)
