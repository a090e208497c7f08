"""fedcca.spec.tracing: alignment specs derived from torch.fx graphs.

A derived spec is right when it equals the hand-written one of every built-in model, when a
random symmetry drawn from it (permutation times positive scaling at every point) keeps a
user's model's function and moves every tap by exactly ``T``, when CCA and Permute recover a
symmetric copy exactly, and when dropping one of its axes breaks the function. Operations a
transform cannot be pushed through are refused, naming the graph node.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import STATISTICS_KEY, read_train_instruction, train_reply
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.batchnorm import recompute_batchnorm
from fedcca.merging.merger import merge
from fedcca.models import build_model
from fedcca.spec.alignment import AlignmentSpec, ParamAxis, Transform, UnsupportedModelError
from fedcca.spec.alignment import apply_transforms, random_symmetry
from fedcca.spec.tracing import derive_spec, spec_for
from fedcca.statistics import collect_statistics, run_with_taps
from tests.tiny_clients import CALIBRATION, shard

# ----------------------------------------------------------------------------- user models


class FlowerNet(nn.Module):
    """Flower's PyTorch quickstart ``Net``: conv-pool-conv-pool, ``view``, three linear layers, ``F.relu``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for [N, 3, 32, 32] images."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class McMahanCNN(nn.Module):
    """The CNN of McMahan et al. (2017): conv 32@5x5, pool, conv 64@5x5, pool, fc 512, classifier.

    Args:
        channels: The two conv widths (the paper's 32, 64).
        hidden: The fully connected width (the paper's 512).
        side: Input side (28 for MNIST).
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 512, side: int = 28,
                 in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels[0], 5, padding=2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5, padding=2)
        self.fc = nn.Linear(channels[1] * (side // 4) ** 2, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; ``torch.relu``, ``x.relu()`` and functional max-pooling as written by hand."""
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(self.conv2(x).relu(), 2)
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.fc(x), inplace=True))


def _mlp() -> nn.Sequential:
    """Flatten, Linear-ReLU-Dropout-Linear-ReLU-Linear on [N, 1, 8, 8]."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 5))


class Block(nn.Module):
    """torchvision's BasicBlock: one shared in-place ReLU, ``out += identity``, 1x1-conv + BN downsample."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))``."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18ish(nn.Module):
    """ResNet-18 layout (stem, max-pool, 4 stages of 2 BasicBlocks, average pool, fc) at small widths."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            self.add_module(f"layer{stage + 1}", nn.Sequential(Block(planes, width, stride), Block(width, width, 1)))
            planes = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for [N, C, H, W] images."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Conv1dNet(nn.Module):
    """Conv1d-BatchNorm1d-ReLU, average pool, Conv1d-ReLU, flatten, linear on [N, 2, 16] sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(2, 6, 3, padding=1, bias=False), nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 8, 3)
        self.fc = nn.Linear(8 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = F.avg_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(F.relu(self.conv2(x)).flatten(1))


class PreActivation(nn.Module):
    """Pre-activation residual stream ``h + conv(relu(h))`` twice: no module outputs a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1, self.block2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        h = self.stem(x)
        h = h + self.block1(F.relu(h))
        h = h + self.block2(F.relu(h))
        return self.fc(F.relu(h).mean(dim=(2, 3)))


class UserNet(nn.Module):
    """A small LeNet-like net on [N, 2, 6, 6] (tests.tiny_clients' data), functional ReLUs; no alignment_spec()."""

    def __init__(self, num_classes: int = 3, in_channels: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 3 * 3, 8)
        self.fc2 = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x))).view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


def _images(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


# name -> (model factory, calibration inputs that span every point's features)
USER_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "flower-net": (FlowerNet, lambda: _images(160, 3, 32)),
    "mcmahan-cnn": (lambda: McMahanCNN((8, 16), 32, side=16), lambda: _images(64, 1, 16)),
    "mlp": (_mlp, lambda: _images(64, 1, 8)),
    "conv1d": (Conv1dNet, lambda: _images(24, 2, 16)[:, :, 0]),
    "pre-activation": (PreActivation, lambda: _images(16, 3, 8)),
    "resnet18ish": (ResNet18ish, lambda: _images(48, 3, 32)),
}


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool(((actual - expected).abs().max() <= rtol * expected.abs().max()).item())


def _with_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone.eval()


def _live(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval mode, negligible BatchNorm eps, and no dead ReLU unit on ``x``.

    Every hidden layer's bias is centred on ``x`` (in forward order), and BatchNorm gets the
    exact statistics of its inputs: each pre-activation has mean 0, so every unit is active on
    about half of the samples. The tiny eps makes a rescaled copy an exact symmetry.
    """
    torch.manual_seed(0)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))][:-1]  # not the classifier
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-12
            nn.init.uniform_(module.weight, 0.5, 1.5)
    model.eval()
    for layer in layers:
        if layer.bias is None:
            continue
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
        with torch.no_grad():
            model(x)
            handle.remove()
            layer.bias.sub_(seen[0].movedim(1, -1).reshape(-1, layer.bias.numel()).mean(0))
    return recompute_batchnorm(model, x).eval()


@functools.lru_cache(maxsize=None)
def _case(name: str) -> tuple[nn.Module, torch.Tensor, AlignmentSpec]:
    """(model with live units, its calibration inputs, its derived spec); built once per model."""
    factory, inputs = USER_MODELS[name]
    torch.manual_seed(1)
    x = inputs()
    model = _live(factory(), x)
    return model, x, spec_for(model, x)


def _symmetric(model: nn.Module, spec: AlignmentSpec, seed: int) -> tuple[dict[str, Transform], nn.Module]:
    symmetry = random_symmetry(spec, torch.Generator().manual_seed(seed))
    return symmetry, _with_state(model, apply_transforms(model.state_dict(), spec, symmetry))


def _tap_outputs(model: nn.Module, spec: AlignmentSpec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The feature at every tap, as the statistics code hooks it."""
    seen: dict[str, torch.Tensor] = {}
    taps = {tap: [point.name] for point in spec.points for tap in point.taps}
    with torch.no_grad():
        run_with_taps(model.eval(), x, taps, lambda tap, out: seen.setdefault(tap, out.clone()))
    return seen


# ----------------------------------------------------------------------------- built-in models

BUILT_IN = [("cnn", 1, 16), ("lenet", 1, 20), ("dense-cnn", 1, 16), ("vgg11", 3, 32), ("vgg11_bn", 3, 32), ("resnet20", 3, 16)]


def _comparable(spec: AlignmentSpec) -> set[tuple]:
    """A spec's points as (size, taps, axes), without their names."""
    return {(p.size, frozenset(p.taps), frozenset(p.axes)) for p in spec.points}


@pytest.mark.parametrize(("name", "in_channels", "side"), BUILT_IN)
def test_derived_spec_of_every_built_in_model_equals_its_hand_written_one(name: str, in_channels: int,
                                                                         side: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, width=0.25, image_size=side)
    derived = derive_spec(model, _images(2, in_channels, side))
    written = model.alignment_spec()
    derived.validate(model)
    assert _comparable(derived) == _comparable(written)
    assert set(derived.fixed) == set(written.fixed)
    assert set(derived.norms) == set(written.norms)
    if name == "lenet":  # the flatten block of conv2's 2x2 outputs
        assert ParamAxis("fc1.weight", 1, "in", 4) in derived.point("conv2").axes


def test_a_hand_written_spec_wins() -> None:
    model = build_model("resnet20", num_classes=3, in_channels=1, width=0.25)
    assert spec_for(model, _images(2, 1, 8)).names() == model.alignment_spec().names()


# ----------------------------------------------------------------------------- user models


def test_flower_net_spec_taps_functional_relus_and_blocks_the_flatten() -> None:
    model, x = FlowerNet(), _images(2, 3, 32)
    spec = derive_spec(model, x)
    assert spec.names() == ["conv1", "conv2", "fc1", "fc2"]
    assert [p.taps for p in spec.points] == [("conv1+relu",), ("conv2+relu",), ("fc1+relu",), ("fc2+relu",)]
    assert ParamAxis("fc1.weight", 1, "in", 25) in spec.point("conv2").axes
    assert set(spec.fixed) == {("conv1.weight", 1), ("fc3.weight", 0), ("fc3.bias", 0)}
    with torch.no_grad():  # a "+relu" tap hooks the module and hands on the ReLU of its output
        torch.testing.assert_close(_tap_outputs(model, spec, x)["conv1+relu"], F.relu(model.conv1(x)))


def test_mcmahan_cnn_at_the_papers_size_has_blocks_of_7x7() -> None:
    spec = derive_spec(McMahanCNN(), _images(2, 1, 28))
    assert [p.size for p in spec.points] == [32, 64, 512]
    assert ParamAxis("fc.weight", 1, "in", 49) in spec.point("conv2").axes


def test_resnet_streams_are_tapped_at_block_outputs_and_shared_relus_at_their_input() -> None:
    _, _, spec = _case("resnet18ish")
    assert len(spec.points) == 4 + 8  # one stream per stage, one point inside each block
    stream = next(p for p in spec.points if "layer1.0" in p.taps)
    assert stream.taps == ("layer1.0", "layer1.1")
    assert {ax.key for ax in stream.axes} >= {"conv1.weight", "bn1.running_var", "layer1.1.bn2.weight",
                                              "layer2.0.conv1.weight", "layer2.0.downsample.0.weight"}
    assert spec.point("layer1.0.conv1").taps == ("layer1.0.bn1+relu",)
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in spec.norms


def test_a_stream_without_module_outputs_is_tapped_at_another_of_its_relus() -> None:
    _, _, spec = _case("pre-activation")
    assert [(p.name, p.taps) for p in spec.points] == [("stem", ("stem+relu",))]
    assert {(ax.key, ax.axis) for ax in spec.points[0].axes} >= {("block1.weight", 0), ("block1.weight", 1)}


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_symmetry_keeps_the_function_and_moves_every_tap_by_t(name: str) -> None:
    model, x, spec = _case(name)
    model = copy.deepcopy(model)  # the cached one stays as it is
    with torch.no_grad():  # random BatchNorm statistics: the symmetry must hold for any
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.normal_(0.0, 0.3)
    symmetry, moved = _symmetric(model, spec, seed=1)
    probe = x[:4]
    assert _close(_outputs(moved, probe), _outputs(model, probe))
    before, after = _tap_outputs(model, spec, probe), _tap_outputs(moved, spec, probe)
    for point in spec.points:
        for tap in point.taps:
            expected = torch.einsum("ij,nj...->ni...", symmetry[point.name].matrix.float(), before[tap])
            assert _close(after[tap], expected), f"{name}: tap {tap!r} of point {point.name!r}"


@pytest.mark.parametrize("name", sorted(USER_MODELS))
def test_cca_and_permute_recover_a_symmetric_copy_exactly(name: str) -> None:
    model, x, _ = _case(name)
    _, other = _symmetric(model, spec_for(model, x), seed=5)
    statistics = [None, collect_statistics(model, [other], x)[0]]  # one pass serves both methods
    expected = _outputs(model, x)
    for method, options in (("permute", {}), ("cca", {"ridge_mode": "relative"})):
        merged = merge([model, other], x, method, statistics=statistics, recompute_bn=False, **options)
        torch.testing.assert_close(_outputs(merged, x), expected, atol=1e-4, rtol=1e-4, msg=f"{name}: {method}")


# (model, key of a consumer axis dropped from its point): the flatten block, a shortcut, a stream's reader
BROKEN = [("flower-net", "fc1.weight"), ("mcmahan-cnn", "fc.weight"), ("mlp", "4.weight"), ("conv1d", "fc.weight"),
          ("pre-activation", "block2.weight"),
          ("resnet18ish", "layer3.0.downsample.0.weight"), ("resnet18ish", "fc.weight")]


@pytest.mark.parametrize(("name", "key"), BROKEN)
def test_negative_control_dropping_one_axis_breaks_the_function(name: str, key: str) -> None:
    model, x, spec = _case(name)
    point = next(p for p in spec.points if any(ax.key == key and ax.role == "in" for ax in p.axes))
    kept = tuple(ax for ax in point.axes if not (ax.key == key and ax.role == "in"))
    broken = AlignmentSpec((dataclasses.replace(point, axes=kept),))
    symmetry = random_symmetry(spec, torch.Generator().manual_seed(1))
    moved = _with_state(model, apply_transforms(model.state_dict(), broken, {point.name: symmetry[point.name]}))
    assert not _close(_outputs(moved, x[:4]), _outputs(model, x[:4]), rtol=1e-2)


def test_torchvision_resnet18() -> None:
    models = pytest.importorskip("torchvision.models")
    model, x = models.resnet18(num_classes=5).eval(), _images(2, 3, 32)
    spec = spec_for(model, x)
    assert len(spec.points) == 4 + 8
    _, moved = _symmetric(model, spec, seed=2)
    assert _close(_outputs(moved, x), _outputs(model, x), rtol=1e-3)  # eps 1e-5: close, not exact


# ----------------------------------------------------------------------------- what is allowed, what is refused


class Wrapped(nn.Module):
    """FlowerNet with input normalisation before the first layer and log_softmax after the last."""

    def __init__(self) -> None:
        super().__init__()
        self.net = FlowerNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities."""
        return F.log_softmax(self.net((x - 0.5) / 0.25), dim=1)


def test_ops_on_the_input_and_on_the_logits_are_allowed() -> None:
    wrapped = derive_spec(Wrapped(), _images(2, 3, 32))
    plain = derive_spec(FlowerNet(), _images(2, 3, 32))
    assert [p.axes for p in wrapped.points] == [tuple(dataclasses.replace(ax, key=f"net.{ax.key}") for ax in p.axes)
                                                 for p in plain.points]
    assert set(wrapped.fixed) == {(f"net.{key}", axis) for key, axis in plain.fixed}


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)).mean((2, 3))


class Gelu(nn.Module):
    def __init__(self, module: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.act = nn.GELU() if module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x.flatten(1))
        return self.fc2(self.act(hidden) if self.act is not None else F.gelu(hidden))


class Squashed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(2.0 * torch.sigmoid(self.fc1(x.flatten(1))))  # the scaling comes before fc2, not sigmoid


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(hidden) if hidden.sum() > 0 else self.fc2(-hidden)


REFUSED = [
    (Concat, r"graph node 'cat' \(torch\.cat\) in the model's forward cannot be aligned"),
    (functools.partial(Gelu, False), r"graph node 'gelu' \(torch\._C\._nn\.gelu\)"),
    (functools.partial(Gelu, True), r"layer 'act' \(GELU\) at graph node 'act'"),
    (Squashed, r"graph node 'sigmoid' \(torch\.sigmoid\)"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.LayerNorm([2, 2]), nn.Conv2d(4, 2, 1), nn.Flatten()),
     r"layer '2' \(LayerNorm\) at graph node '_2' cannot be aligned: fedcca can align only"),  # over H, W
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten()),
     r"layer '2' \(Conv2d\) .* grouped or depthwise conv"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)),
     r"layer '2' \(BatchNorm2d\) .* does not directly follow a conv/linear layer"),
    (Branching, r"torch\.fx cannot trace its forward \(TraceError"),
]


@pytest.mark.parametrize(("factory", "message"), REFUSED)
def test_unsupported_operations_are_refused_naming_the_node_under_strict(factory: Callable[[], nn.Module],
                                                                         message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message) as caught:
        spec_for(factory(), _images(2, 1, 2), strict=True)
    assert "alignment_spec() method" in str(caught.value) and "method='direct'" in str(caught.value)


@pytest.mark.parametrize(("factory", "message"), REFUSED[:-1])  # an untraceable forward has no partial spec
def test_partial_alignment_leaves_the_same_parts_unaligned_naming_them(factory: Callable[[], nn.Module],
                                                                       message: str) -> None:
    model = factory()
    spec = spec_for(model, _images(2, 1, 2))  # the default: partial alignment
    said = "; ".join(f"{entry.where} cannot be aligned: {entry.reason}" for entry in spec.left)
    assert re.search(message, said), said
    spec.validate(model)
    _, other = _symmetric(model, spec, seed=3)  # what is still aligned keeps the function under its symmetries
    x = _images(4, 1, 2, seed=5)
    model.eval(), other.eval()
    torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-4)


def test_without_an_example_input_a_derivation_is_refused_whatever_was_derived_before() -> None:
    """No process-global state: an earlier derivation for an identical model does not stand in for the example."""
    with pytest.raises(UnsupportedModelError, match="Pass example_input="):
        spec_for(UserNet())
    derived = spec_for(UserNet(), CALIBRATION)
    assert derived.names()
    with pytest.raises(UnsupportedModelError, match="Pass example_input="):
        spec_for(UserNet())


# ----------------------------------------------------------------------------- Flower and the CLI


def _user_model(seed: int = 0) -> UserNet:
    torch.manual_seed(seed)
    return UserNet()


def _train_user_reply(message: Message, loss_key: str, with_statistics: bool) -> Message:
    """Train the received UserNet a few steps on the node's shard; statistics if asked for."""
    received = _user_model()
    received.load_state_dict(read_train_instruction(message).arrays.to_torch_state_dict())
    trained = copy.deepcopy(received).train()
    x, y = shard(message.metadata.dst_node_id)
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        loss = F.cross_entropy(trained(x), y)
        loss.backward()
        optimiser.step()
    statistics = collect_statistics(received, [trained], CALIBRATION)[0] if with_statistics else None
    return Message(train_reply(trained.state_dict(), len(x), {loss_key: loss.item()}, statistics), reply_to=message)


user_fedavg_app = ClientApp()
user_stats_app = ClientApp()


@user_fedavg_app.train()
def _fedavg_train(message: Message, context: Context) -> Message:
    return _train_user_reply(message, "train_loss", with_statistics=False)


@user_stats_app.train()
def _stats_train(message: Message, context: Context) -> Message:
    return _train_user_reply(message, "train-loss", read_train_instruction(message).compute_statistics)


def _round(strategy: CCAMerge, app: ClientApp) -> tuple[list[Message], dict[str, torch.Tensor]]:
    grid = InProcessGrid({node: app for node in (1, 2, 3)})
    messages = strategy.configure_train(1, ArrayRecord(_user_model(1).state_dict()), ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return replies, dict(arrays.to_torch_state_dict())


def test_a_flower_round_merges_a_user_model_from_fedavg_style_and_statistics_sending_clients() -> None:
    server_side = CCAMerge(_user_model, CALIBRATION, device="cpu")
    replies, merged = _round(server_side, user_fedavg_app)
    assert all(STATISTICS_KEY not in reply.content for reply in replies)
    assert server_side.rounds[-1].num_valid == 3 and server_side.rounds[-1].client_statistics == 0
    assert all(torch.isfinite(value).all() for value in merged.values())
    # Client statistics are taken against the received model: "global" reference (round 1 of "auto" uses a client).
    client_side = CCAMerge(_user_model, CALIBRATION, device="cpu", stats="client", reference="global")
    replies, from_clients = _round(client_side, user_stats_app)
    assert client_side.rounds[-1].client_statistics == 3
    check = CCAMerge(_user_model, CALIBRATION, device="cpu", stats="server", reference="global")
    check.configure_train(1, ArrayRecord(_user_model(1).state_dict()), ConfigRecord(),
                          InProcessGrid({node: user_stats_app for node in (1, 2, 3)}))
    from_server, _ = check.aggregate_train(1, replies)
    assert from_server is not None
    for key, value in from_server.to_torch_state_dict().items():
        torch.testing.assert_close(from_clients[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_cli_merges_checkpoints_of_a_user_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcca.cli import main

    x = CALIBRATION
    model = _live(_user_model(3), x)
    _, other = _symmetric(model, spec_for(model, x), seed=4)
    paths = {name: tmp_path / name for name in ("a.pt", "b.pt", "calib.pt")}
    torch.save(model.state_dict(), paths["a.pt"])
    torch.save(other.state_dict(), paths["b.pt"])
    torch.save(x, paths["calib.pt"])
    out = tmp_path / "merged.pt"
    code = main(["merge", str(paths["a.pt"]), str(paths["b.pt"]), "--calibration", str(paths["calib.pt"]),
                 "--model", "tests.test_core_tracing:UserNet", "--num-classes", "3", "--ridge", "0",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "points aligned: 3 (conv1, conv2, fc1)" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["model"] == "tests.test_core_tracing:UserNet"
    merged = UserNet()
    merged.load_state_dict(saved["state_dict"])
    torch.testing.assert_close(_outputs(merged, x), _outputs(model, x), atol=1e-4, rtol=1e-4)


def test_cli_names_a_user_model_it_cannot_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcca.cli import main

    torch.save(UserNet().state_dict(), tmp_path / "a.pt")
    torch.save(CALIBRATION, tmp_path / "calib.pt")
    code = main(["merge", str(tmp_path / "a.pt"), "--calibration", str(tmp_path / "calib.pt"),
                 "--model", "tests.nowhere:Net"])
    err = capsys.readouterr().err
    assert code == 2 and "--model 'tests.nowhere:Net': cannot import" in err and len(err.strip().splitlines()) == 1


class Conv1dReluModules(nn.Module):
    """Conv1d producers with bias, followed by ``nn.ReLU`` modules (REPAIR once skipped these)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv1d(2, 6, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv1d(6, 8, 3), nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(x.mean(dim=2))


def test_repair_corrects_conv1d_producers_behind_relu_modules() -> None:
    """Every point of a Conv1d net with ReLU modules has a pre-activation REPAIR can correct."""
    from fedcca.merging.repair import preactivation_spec  # pylint: disable=import-outside-toplevel

    model = Conv1dReluModules()
    spec = derive_spec(model, _images(8, 2, 16)[:, :, 0])
    _, producers = preactivation_spec(spec, model)
    assert sorted(producers.values()) == ["conv1", "conv2"]
