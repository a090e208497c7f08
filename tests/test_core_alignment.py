"""apply_transforms against hand-written formulas, random_symmetry, and the spec's loud errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fedcca.models import build_model
from fedcca.spec.alignment import (
    AlignmentPoint,
    AlignmentSpec,
    ParamAxis,
    Transform,
    UnsupportedModelError,
    apply_transforms,
    random_symmetry,
)
from fedcca.spec.tracing import spec_for


class LinearThenBN(nn.Module):
    """conv1 -> conv2 -> BN -> ReLU -> GAP -> fc. Point "mid" (conv1's output) has no
    nonlinearity after it, so any invertible T there keeps the function exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 2] for inputs [N, 2, H, W]."""
        return self.fc(self.relu(self.bn(self.conv2(self.conv1(x)))).mean(dim=(2, 3)))

    def alignment_spec(self) -> AlignmentSpec:
        """Points "mid" (tapped at conv1) and "act" (tapped at the ReLU)."""
        mid = (ParamAxis("conv1.weight", 0, "out"), ParamAxis("conv1.bias", 0, "out"), ParamAxis("conv2.weight", 1, "in"))
        act = (
            ParamAxis("conv2.weight", 0, "out"),
            *(ParamAxis(f"bn.{n}", 0, "out") for n in ("weight", "bias", "running_mean")),
            ParamAxis("bn.running_var", 0, "var"),
            ParamAxis("fc.weight", 1, "in"),
        )
        return AlignmentSpec(
            (AlignmentPoint("mid", 3, ("conv1",), mid), AlignmentPoint("act", 4, ("relu",), act)),
            fixed=(("conv1.weight", 1), ("fc.weight", 0), ("fc.bias", 0)),
        )


def _tiny(seed: int = 0) -> LinearThenBN:
    """A LinearThenBN with random BatchNorm parameters and running statistics."""
    torch.manual_seed(seed)
    model = LinearThenBN()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(7)
    return model.eval()


def _dense(n: int, seed: int) -> Transform:
    """A random well-conditioned dense T with mixed signs."""
    g = torch.Generator().manual_seed(seed)
    matrix = torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return Transform(matrix, torch.linalg.inv(matrix))


def _swapped(t: Transform) -> Transform:
    """The transform of T^-1."""
    return Transform(t.inverse, t.matrix)


@pytest.mark.parametrize("kind", ["dense", "scaled-permutation"])
def test_apply_matches_hand_written_formulas(kind: str) -> None:
    model = _tiny()
    spec = spec_for(model)
    if kind == "dense":
        ts = {"mid": _dense(3, 1), "act": _dense(4, 2)}
    else:
        ts = random_symmetry(spec, torch.Generator().manual_seed(3))
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    new = apply_transforms(sd, spec, ts)
    tm, tmi, ta, tai = ts["mid"].matrix, ts["mid"].inverse, ts["act"].matrix, ts["act"].inverse
    expected = {
        "conv1.weight": torch.einsum("ij,jchw->ichw", tm, sd["conv1.weight"]),
        "conv1.bias": tm @ sd["conv1.bias"],
        # conv2: its input axis gets x T_mid^-1, its output axis T_act x
        "conv2.weight": torch.einsum("ij,jkhw,kl->ilhw", ta, sd["conv2.weight"], tmi),
        "bn.weight": ta @ sd["bn.weight"],
        "bn.bias": ta @ sd["bn.bias"],
        "bn.running_mean": ta @ sd["bn.running_mean"],
        "bn.running_var": (ta * ta) @ sd["bn.running_var"],
        "fc.weight": sd["fc.weight"] @ tai,
        "fc.bias": sd["fc.bias"],
    }
    for key, value in expected.items():
        assert torch.allclose(new[key], value, rtol=1e-12, atol=1e-12), key
    assert (new["bn.running_var"] >= 0).all()
    assert torch.equal(new["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])


def test_dense_transform_keeps_a_linear_path_exact_and_moves_its_tap() -> None:
    model = _tiny().double()
    t = _dense(3, 4)
    moved = _tiny().double()
    moved.load_state_dict(apply_transforms(model.state_dict(), spec_for(model), {"mid": t}))
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(moved(x), model(x), rtol=1e-10, atol=1e-12)
        assert torch.allclose(moved.conv1(x), torch.einsum("ij,njhw->nihw", t.matrix, model.conv1(x)), atol=1e-12)


def _resnet_case() -> tuple[nn.Module, dict[str, Transform]]:
    """ResNet20 with a scaled permutation at every point (BatchNorm everywhere)."""
    model = build_model("resnet20", in_channels=3)
    return model, random_symmetry(spec_for(model), torch.Generator().manual_seed(5))


def _tiny_case() -> tuple[nn.Module, dict[str, Transform]]:
    """The tiny net with a dense T where no BatchNorm variance is involved."""
    model = _tiny()
    return model, {"mid": _dense(3, 5), "act": random_symmetry(spec_for(model), torch.Generator())["act"]}


# "var" is exact for scaled permutations only: (T*T) then (T^-1*T^-1) is the identity for
# those, not for a dense T, so dense transforms go where no running_var is involved.
@pytest.mark.parametrize("case", [_resnet_case, _tiny_case])
def test_transform_then_inverse_restores_state_without_touching_input(case) -> None:
    model, ts = case()
    spec = spec_for(model)
    state = model.state_dict()
    first, last = spec.fixed[0][0], spec.fixed[-1][0]
    state[first], state[last] = state[first].bfloat16(), state[last].half()  # dtypes must survive
    snapshot = {k: v.clone() for k, v in state.items()}
    there = apply_transforms(state, spec, ts)
    back = apply_transforms(there, spec, {k: _swapped(t) for k, t in ts.items()})
    for key, value in state.items():
        assert torch.equal(value, snapshot[key]), f"{key} modified in place"
        assert there[key].dtype == back[key].dtype == value.dtype, key
        assert there[key].data_ptr() != value.data_ptr(), f"{key} shares storage with the input"
        rtol = 1e-2 if value.dtype in (torch.float16, torch.bfloat16) else 1e-6
        assert torch.allclose(back[key].double(), value.double(), rtol=rtol, atol=rtol * value.double().abs().max()), key
    assert sum(not torch.equal(there[k], state[k]) for k in state) >= len(spec.points)


def test_points_without_a_transform_are_unchanged() -> None:
    model = _tiny()
    spec = spec_for(model)
    new = apply_transforms(model.state_dict(), spec, {"act": _dense(4, 6)})
    for key in ("conv1.weight", "conv1.bias"):
        assert torch.equal(new[key], model.state_dict()[key])
    assert not torch.equal(new["fc.weight"], model.state_dict()["fc.weight"])


def test_apply_errors_name_the_point() -> None:
    model = _tiny()
    spec, sd = spec_for(model), model.state_dict()
    with pytest.raises(KeyError, match="'nope'"):
        apply_transforms(sd, spec, {"nope": _dense(3, 0)})
    with pytest.raises(ValueError, match="point 'mid': transform of size 4"):
        apply_transforms(sd, spec, {"mid": _dense(4, 0)})
    bad = torch.full((3, 3), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="point 'mid'.*not finite"):
        apply_transforms(sd, spec, {"mid": Transform(bad, bad)})
    with pytest.raises(UnsupportedModelError, match="point 'mid'.*'conv1.bias'"):
        apply_transforms({k: v for k, v in sd.items() if k != "conv1.bias"}, spec, {"mid": _dense(3, 0)})


def test_random_symmetry_is_a_positive_scaled_permutation_with_its_inverse() -> None:
    spec = spec_for(build_model("cnn"))
    a = random_symmetry(spec, torch.Generator().manual_seed(0), scale_range=(0.25, 4.0))
    b = random_symmetry(spec, torch.Generator().manual_seed(0), scale_range=(0.25, 4.0))
    assert list(a) == spec.names()
    for name, t in a.items():
        n = spec.point(name).size
        assert t.matrix.dtype == t.inverse.dtype == torch.float64
        assert torch.allclose(t.matrix @ t.inverse, torch.eye(n, dtype=torch.float64), atol=1e-12)
        nonzero = t.matrix[t.matrix != 0]
        assert nonzero.numel() == n and (t.matrix != 0).sum(0).eq(1).all()
        assert ((nonzero >= 0.25) & (nonzero <= 4.0)).all()
        assert not torch.equal(t.matrix.abs() > 0, torch.eye(n, dtype=torch.bool))  # actually permutes
        assert torch.equal(t.matrix, b[name].matrix)  # same generator state, same draw
    with pytest.raises(ValueError, match="scale_range"):
        random_symmetry(spec, torch.Generator(), scale_range=(0.0, 1.0))


def test_value_objects_reject_malformed_input() -> None:
    with pytest.raises(ValueError, match="role"):
        ParamAxis("w", 0, "output")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        Transform(torch.zeros(2, 3), torch.zeros(3, 2))
    point = AlignmentPoint("p", 1, ("a",), (ParamAxis("w", 0, "out"),))
    with pytest.raises(ValueError, match="duplicate"):
        AlignmentSpec((point, point))
    with pytest.raises(KeyError, match="'q'.*'p'"):
        AlignmentSpec((point,)).point("q")


# ---- spec_for / validate: loud errors naming what and where ----


def test_model_without_spec_names_type_and_first_layer_it_cannot_describe() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"model type Sequential has no alignment spec; layer '3' \(LayerNorm\)"):
        spec_for(model)
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(UnsupportedModelError, match=r"model type Sequential .* layer '0' \(Conv2d\)"):
        spec_for(plain)


def test_spec_that_is_not_an_alignment_spec_is_refused() -> None:
    class Liar(LinearThenBN):
        def alignment_spec(self):  # type: ignore[override]
            return {"mid": 3}

    with pytest.raises(UnsupportedModelError, match="Liar.alignment_spec.*dict"):
        spec_for(Liar())


class WithExtraLayer(LinearThenBN):
    """A user's subclass adding a layer the inherited spec does not describe."""

    def __init__(self, extra: nn.Module) -> None:
        super().__init__()
        self.extra = extra


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (nn.Linear(2, 2), r"layer 'extra' \(Linear\): axis 0 of 'extra.weight'"),
        (nn.BatchNorm2d(4, affine=False), r"layer 'extra' \(BatchNorm2d\): axis 0 of 'extra.running_mean'"),
        (nn.GroupNorm(2, 4), r"layer 'extra' \(GroupNorm\): axis 0 of 'extra.weight'"),
        (nn.InstanceNorm2d(4, affine=True), r"layer 'extra' \(InstanceNorm2d\).*can only align"),
        (nn.Conv2d(4, 4, 3, groups=2), r"layer 'extra' \(Conv2d\) is a grouped conv"),
    ],
)
def test_layer_unknown_to_the_spec_is_an_error(extra: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        spec_for(WithExtraLayer(extra))


def test_built_model_with_an_added_layer_is_an_error() -> None:
    model = build_model("cnn")
    model.head = nn.Linear(10, 10)
    with pytest.raises(UnsupportedModelError, match=r"layer 'head'"):
        spec_for(model)


def _edited(spec: AlignmentSpec, name: str, **changes: object) -> AlignmentSpec:
    """``spec`` with the point ``name`` replaced by a modified copy."""
    points = tuple(dataclasses.replace(p, **changes) if p.name == name else p for p in spec.points)
    return AlignmentSpec(points, spec.fixed)


def _mid_axes(*extra: ParamAxis) -> tuple[ParamAxis, ...]:
    return LinearThenBN().alignment_spec().point("mid").axes + extra


@pytest.mark.parametrize(
    ("changes", "fixed", "message"),
    [
        ({"size": 5}, None, r"point 'mid': 'conv1.weight' has shape \(3, 2, 3, 3\); its axis 0 should have the point's size 5"),
        ({"taps": ("conv9",)}, None, r"point 'mid': tap 'conv9' is not a module"),
        ({"taps": ()}, None, r"point 'mid' needs at least one tap"),
        ({"axes": _mid_axes(ParamAxis("nope.weight", 0, "out"))}, None, r"point 'mid': key 'nope.weight'"),
        ({"axes": _mid_axes(ParamAxis("conv1.bias", 3, "out"))}, None, r"point 'mid': 'conv1.bias'.*axis 3"),
        ({"axes": _mid_axes(ParamAxis("conv1.bias", 0, "out"))}, None, r"point 'mid': axis 0 of 'conv1.bias' is already claimed by point 'mid'"),
        ({"axes": _mid_axes()[:2]}, None, r"layer 'conv2' \(Conv2d\): axis 1 of 'conv2.weight' belongs to no alignment point"),
        ({}, (("conv1.weight", 1),), r"layer 'fc' \(Linear\): axis 0 of 'fc.weight'"),
        ({}, (("conv1.weight", 1), ("gone.weight", 0)), r"fixed axis: key 'gone.weight'"),
    ],
)
def test_validate_names_point_and_key(changes: dict, fixed: tuple | None, message: str) -> None:
    model = LinearThenBN()
    spec = _edited(model.alignment_spec(), "mid", **changes)
    if fixed is not None:
        spec = dataclasses.replace(spec, fixed=fixed)
    with pytest.raises(UnsupportedModelError, match=message):
        spec.validate(model)


@pytest.mark.parametrize("name", ["cnn", "vgg11_bn", "resnet20"])
def test_balance_norms_keeps_the_function_and_balances(name: str) -> None:
    from fedcca.models import build_model
    from fedcca.spec.alignment import _axis_norms, balance_norms

    model = build_model(name, num_classes=3, in_channels=1, width=0.25).eval()
    for module in model.modules():  # exact scaling symmetry needs a negligible BatchNorm eps
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-12
    spec = spec_for(model)
    # Badly balanced but equivalent weights: a random positive rescaling of every point.
    skewed = apply_transforms(model.state_dict(), spec, random_symmetry(spec, torch.Generator().manual_seed(1),
                                                                         scale_range=(0.05, 20.0)))
    balanced = balance_norms(skewed, spec, sweeps=20)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    expected = model(x).detach()
    for state in (skewed, balanced):
        other = copy.deepcopy(model)
        other.load_state_dict(state)
        torch.testing.assert_close(other(x).detach(), expected, rtol=1e-4, atol=1e-4)
    imbalance = {}
    for point in spec.points:
        for label, state in (("skewed", skewed), ("balanced", balanced)):
            ratio = _axis_norms(state, point, "out") / _axis_norms(state, point, "in")
            imbalance[label, point.name] = float(ratio.log().abs().max())
    assert max(v for (label, _), v in imbalance.items() if label == "skewed") > 1.0
    # incoming == outgoing norm for every feature
    assert max(v for (label, _), v in imbalance.items() if label == "balanced") < 0.05


def test_balance_norms_equals_diagonal_transforms_point_by_point() -> None:
    """The in-place rescaling is the sweep of diagonal transforms applied one point at a time."""
    from fedcca.models import build_model
    from fedcca.spec.alignment import Transform, _norm_ratio, balance_norms

    model = build_model("vgg11_bn", num_classes=3, in_channels=1, width=0.25)
    spec = spec_for(model)
    generator = torch.Generator().manual_seed(3)
    state = apply_transforms(model.state_dict(), spec, random_symmetry(spec, generator, scale_range=(0.1, 10.0)))
    for key, value in state.items():  # running variances away from 1, so the "var" role is exercised
        if key.endswith("running_var"):
            state[key] = value * (0.5 + torch.rand(value.shape, generator=generator))
    like = build_model("vgg11_bn", num_classes=3, in_channels=1, width=0.25).state_dict()
    expected = dict(state)
    for _ in range(2):
        for point in spec.points:
            ratio, target = _norm_ratio(expected, point), _norm_ratio(like, point)
            scale = (target / ratio).sqrt()
            expected = apply_transforms(expected, AlignmentSpec((point,)),
                                        {point.name: Transform(torch.diag(scale), torch.diag(1 / scale))})
    got = balance_norms(state, spec, like=like, sweeps=2)
    assert got.keys() == state.keys()
    for key in state:
        assert got[key].dtype == state[key].dtype
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(got[key], state[key]) for key in state if key.endswith("running_var"))
