"""The four models and their alignment specs.

A spec is right when a random symmetry at every point (permutation times positive scaling,
which commutes with ReLU) leaves the function unchanged, moves every tap's feature by
exactly ``T``, and breaks the function once one axis is dropped from the spec.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from torch import nn

from fedcca.models import MODEL_NAMES, BasicBlock, build_model
from fedcca.spec.alignment import AlignmentSpec, Transform, apply_transforms, random_symmetry
from fedcca.spec.tracing import spec_for

CASES = [(name, channels) for name in MODEL_NAMES for channels in (1, 3)]
SIDE = 16  # input side: small enough to be fast, large enough for VGG's five pools


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machine, two threads spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prepared(name: str, in_channels: int) -> nn.Module:
    """A model in eval mode with random BatchNorm affine parameters and real running statistics.

    BatchNorm eps is made negligible: ``sqrt(s^2 var + eps) != s sqrt(var + eps)``, so with the
    default eps a rescaled model differs by ~eps/var, a BatchNorm property and not the spec's.
    """
    torch.manual_seed(10 * MODEL_NAMES.index(name) + in_channels)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=SIDE)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.normal_(m.bias, 0.0, 0.1)  # zero biases would hide a forgotten bias axis
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-12, None  # momentum None: running stats = exact batch averages
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, in_channels, SIDE, SIDE))
    return model.eval()


def _with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state``, in eval mode."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


@functools.lru_cache(maxsize=None)
def _symmetric_pair(name: str, in_channels: int) -> tuple[nn.Module, AlignmentSpec, dict[str, Transform], nn.Module]:
    """(model, its spec, a random symmetry, the model with the symmetry applied); cached per case."""
    model = _prepared(name, in_channels)
    spec = spec_for(model)
    symmetry = random_symmetry(spec, torch.Generator().manual_seed(1))
    return model, spec, symmetry, _with_state(model, apply_transforms(model.state_dict(), spec, symmetry))


def _outputs(model: nn.Module, x: torch.Tensor, taps: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits and the output of every tap module."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[t].register_forward_hook(lambda _m, _i, out, t=t: seen.__setitem__(t, out)) for t in taps]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool(((actual - expected).abs().max() <= rtol * expected.abs().max()).item())


@pytest.mark.parametrize(("name", "in_channels"), CASES)
def test_symmetry_preserves_function_and_moves_each_tap_by_t(name: str, in_channels: int) -> None:
    model, spec, symmetry, moved = _symmetric_pair(name, in_channels)
    taps = [t for p in spec.points for t in p.taps]
    x = torch.randn(4, in_channels, SIDE, SIDE)
    ref_logits, ref_taps = _outputs(model, x, taps)
    new_logits, new_taps = _outputs(moved, x, taps)
    assert _close(new_logits, ref_logits)
    for point in spec.points:
        for tap in point.taps:
            expected = torch.einsum("ij,nj...->ni...", symmetry[point.name].matrix.float(), ref_taps[tap])
            assert _close(new_taps[tap], expected), f"{name}: tap {tap!r} of point {point.name!r}"


@pytest.mark.parametrize(("name", "in_channels"), CASES)
def test_symmetry_changes_every_described_tensor(name: str, in_channels: int) -> None:
    model, spec, _, moved = _symmetric_pair(name, in_channels)
    before, after = model.state_dict(), moved.state_dict()
    keys = {ax.key for p in spec.points for ax in p.axes}
    assert keys, "spec describes nothing"
    unchanged = sorted(k for k in keys if torch.equal(before[k], after[k]))
    assert not unchanged


# (model, point, key of the axis dropped from that point): a consumer each time, plus a
# BatchNorm variance and a residual shortcut, the easiest ones to forget.
BROKEN = [
    ("cnn", "features.3", "features.6.weight"),
    ("lenet", "conv2", "fc1.weight"),  # the block axis across the flatten
    ("lenet", "fc1", "fc2.weight"),
    ("dense-cnn", "conv2", "fc.weight"),  # the block axis across the flatten
    ("dense-cnn", "conv1", "bn1.running_var"),
    ("vgg11", "features.0", "features.3.weight"),
    ("vgg11_bn", "features.4", "features.5.running_var"),
    ("resnet20", "layer1", "layer2.0.shortcut.0.weight"),
    ("resnet20", "layer2.1", "layer2.1.conv2.weight"),
    ("resnet20", "layer3", "linear.weight"),
]


@pytest.mark.parametrize(("name", "point_name", "key"), BROKEN)
def test_negative_control_dropping_one_axis_breaks_function(name: str, point_name: str, key: str) -> None:
    """The preservation test can fail: a spec missing one axis does not preserve the function."""
    model, spec, symmetry, _ = _symmetric_pair(name, 3)
    point = spec.point(point_name)
    kept = tuple(ax for ax in point.axes if ax.key != key)
    assert len(kept) == len(point.axes) - 1, f"{key} is not an axis of {point_name}"
    broken = AlignmentSpec((dataclasses.replace(point, axes=kept),))
    moved = _with_state(model, apply_transforms(model.state_dict(), broken, {point_name: symmetry[point_name]}))
    x = torch.randn(4, 3, SIDE, SIDE)
    with torch.no_grad():
        ref, out = model(x), moved(x)
    assert not _close(out, ref, rtol=1e-2)


@pytest.mark.parametrize(("in_channels", "side"), [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes(name: str, in_channels: int, side: int) -> None:
    model = build_model(name, num_classes=5, in_channels=in_channels, image_size=side).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, side, side)).shape == (2, 5)


def test_cnn_layout() -> None:
    model = build_model("cnn", width=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (3, 3)), (128, (3, 3)), (256, (3, 3))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert [p.size for p in spec_for(model).points] == [64, 128, 256]


@pytest.mark.parametrize(("in_channels", "side", "spatial"), [(1, 28, 16), (3, 32, 25)])
def test_lenet_layout_and_its_block_axis(in_channels: int, side: int, spatial: int) -> None:
    """niid_bench's CNN: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84; conv2's channels own H*W fc1 inputs."""
    model = build_model("lenet", num_classes=10, in_channels=in_channels, image_size=side)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in model.modules() if isinstance(c, nn.Conv2d)] \
        == [(in_channels, 6, (5, 5)), (6, 16, (5, 5))]
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)] \
        == [(16 * spatial, 120), (120, 84), (84, 10)]
    spec = spec_for(model)
    assert [(p.name, p.size) for p in spec.points] == [("conv1", 6), ("conv2", 16), ("fc1", 120), ("fc2", 84)]
    (flatten,) = [ax for ax in spec.point("conv2").axes if ax.key == "fc1.weight"]
    assert (flatten.axis, flatten.role, flatten.block) == (1, "in", spatial)
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("lenet", image_size=12)


@pytest.mark.parametrize(("name", "width", "channels"), [
    ("vgg11", 0.25, [16, 32, 64, 64, 128, 128, 128, 128]), ("resnet20", 0.5, [8] * 7 + [16] * 6 + [32] * 6)])
def test_fractional_width_scales_every_layer(name: str, width: float, channels: list[int]) -> None:
    """CPU-sized models for the benchmarks: channel counts rounded, the spec follows them."""
    model = build_model(name, width=width)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs == channels
    assert sum(p.size for p in spec_for(model).points) > 0
    spec_for(model).validate(model)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_vgg11_layout(name: str) -> None:
    model = build_model(name, in_channels=3)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (8 if name == "vgg11_bn" else 0)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.ceil_mode for p in pools)
    assert [p.size for p in spec_for(model).points] == widths
    with torch.no_grad():  # 28 -> 14 -> 7 -> 4 -> 2 -> 1 thanks to ceil_mode
        assert model.features(torch.randn(1, 3, 28, 28)).shape == (1, 512, 1, 1)


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_has_twelve_points_sized_by_width(width: int) -> None:
    model = build_model("resnet20", width=width)
    spec = spec_for(model)
    assert len(spec.points) == 12
    streams = [(f"layer{s}", 16 * width * 2 ** (s - 1)) for s in (1, 2, 3)]
    blocks = [(f"{stage}.{b}", size) for stage, size in streams for b in range(3)]
    assert [(p.name, p.size) for p in spec.points] == streams + blocks
    for stage, _ in streams:
        assert spec.point(stage).taps == tuple(f"{stage}.{b}" for b in range(3))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[spec.point(n).taps[0]], nn.ReLU) for n, _ in blocks)
    projecting = [n for n, m in modules.items() if isinstance(m, BasicBlock) and m.projects]
    assert projecting == ["layer2.0", "layer3.0"]
    assert sum(isinstance(m, nn.Conv2d) for m in modules.values()) == 21  # 19 3x3 + 2 shortcuts


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_relus_are_separate_and_not_inplace(name: str) -> None:
    relus = [m for m in build_model(name).modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(r.inplace for r in relus)
    assert len({id(r) for r in relus}) == len(relus)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet56"}, "unknown model 'resnet56'"),
        ({"name": "cnn", "width": 0}, "width"),
        ({"name": "cnn", "width": True}, "width"),
        ({"name": "cnn", "num_classes": 0}, "num_classes"),
        ({"name": "cnn", "in_channels": 1.0}, "in_channels"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
