"""The networks fedcca merges, each describing its own alignment structure.

``build_model(name, num_classes, in_channels, width)`` builds one of :data:`MODEL_NAMES`.
Every model has an ``alignment_spec()`` method returning an
:class:`~fedcca.alignment.AlignmentSpec`. ReLUs are separate, named, non-inplace modules so
that forward hooks can tap the features they output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fedcca.alignment import AlignmentPoint, AlignmentSpec, ParamAxis

MODEL_NAMES: tuple[str, ...] = ("cnn", "vgg11", "vgg11_bn", "resnet20")

_VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _bn_axes(prefix: str) -> tuple[ParamAxis, ...]:
    """Axes of a BatchNorm whose output is a point's feature (or feeds it, per channel)."""
    return (
        ParamAxis(f"{prefix}.weight", 0, "out"),
        ParamAxis(f"{prefix}.bias", 0, "out"),
        ParamAxis(f"{prefix}.running_mean", 0, "out"),
        ParamAxis(f"{prefix}.running_var", 0, "var"),
    )


def _conv_out(prefix: str, bias: bool) -> tuple[ParamAxis, ...]:
    """Output-side axes of a conv or linear layer."""
    axes = (ParamAxis(f"{prefix}.weight", 0, "out"),)
    return axes + ((ParamAxis(f"{prefix}.bias", 0, "out"),) if bias else ())


def _conv_in(prefix: str) -> ParamAxis:
    """Input-side axis of a conv or linear layer."""
    return ParamAxis(f"{prefix}.weight", 1, "in")


@dataclass(frozen=True)
class _ChainLayer:
    """One conv(+BN)+ReLU layer of a plain feed-forward network, by module name."""

    conv: str
    bn: str | None
    relu: str
    channels: int


def _chain_spec(layers: list[_ChainLayer], classifier: str) -> AlignmentSpec:
    """Spec of a chain conv(+BN)->ReLU->...->pool->classifier: one point per layer."""
    points = []
    for i, layer in enumerate(layers):
        consumer = layers[i + 1].conv if i + 1 < len(layers) else classifier
        axes = _conv_out(layer.conv, bias=layer.bn is None)
        if layer.bn is not None:
            axes += _bn_axes(layer.bn)
        points.append(AlignmentPoint(layer.conv, layer.channels, (layer.relu,), axes + (_conv_in(consumer),)))
    fixed = ((f"{layers[0].conv}.weight", 1), (f"{classifier}.weight", 0), (f"{classifier}.bias", 0))
    return AlignmentSpec(tuple(points), fixed)


class _ChainNet(nn.Module):
    """conv(+BN)+ReLU layers with optional max-pools, global average pool, linear classifier."""

    def __init__(self, layout: tuple[int | str, ...], in_channels: int, num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self._layers: list[_ChainLayer] = []
        channels = in_channels
        for item in layout:
            idx = len(self.features)
            if item == "M":
                # ceil_mode keeps 28x28 inputs alive through VGG's five pools.
                self.features.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            assert isinstance(item, int)
            self.features.append(nn.Conv2d(channels, item, 3, padding=1, bias=not batch_norm))
            bn = None
            if batch_norm:
                self.features.append(nn.BatchNorm2d(item))
                bn = f"features.{idx + 1}"
            self.features.append(nn.ReLU())
            self._layers.append(_ChainLayer(f"features.{idx}", bn, f"features.{len(self.features) - 1}", item))
            channels = item
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                # He init keeps the signal alive through VGG's eight plain ReLU layers.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def alignment_spec(self) -> AlignmentSpec:
        """One point per conv layer, tapped at its ReLU."""
        return _chain_spec(self._layers, "classifier")


class CNN(_ChainNet):
    """Small convnet for 28x28 grayscale: conv 32w-64w-128w (+ReLU), two max-pools, GAP, linear.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 1) -> None:
        super().__init__((32 * width, "M", 64 * width, "M", 128 * width), in_channels, num_classes, batch_norm=False)


class VGG11(_ChainNet):
    """VGG11 as in the CCA Merge paper: w x [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M].

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
        batch_norm: Insert BatchNorm after every conv.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 1, batch_norm: bool = False) -> None:
        layout = tuple(c * width if isinstance(c, int) else c for c in _VGG11_LAYOUT)
        super().__init__(layout, in_channels, num_classes, batch_norm)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus identity or 1x1-conv-BN shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet20 (16w/32w/64w, 3 stages of 3 basic blocks, BatchNorm).

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 1) -> None:
        super().__init__()
        self.widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, self.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = self.widths[0]
        for s, planes in enumerate(self.widths):
            blocks = [BasicBlock(in_planes if b == 0 else planes, planes, 2 if (s > 0 and b == 0) else 1) for b in range(3)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))

    def alignment_spec(self) -> AlignmentSpec:
        """3 residual-stream points (one per stage) and 9 in-block points.

        Everything that feeds one residual sum shares the stage's point: the stem (stage 1)
        or the stage's shortcut conv, and every block's conv2/bn2. Its consumers are the
        blocks' conv1 inputs, the next stage's first conv1 and shortcut, or the classifier.
        """
        points = []
        for s, planes in enumerate(self.widths):
            stage = f"layer{s + 1}"
            producers: tuple[ParamAxis, ...] = ()
            if s == 0:
                producers += _conv_out("conv1", bias=False) + _bn_axes("bn1")
            else:
                producers += _conv_out(f"{stage}.0.shortcut.0", bias=False) + _bn_axes(f"{stage}.0.shortcut.1")
            consumers: tuple[ParamAxis, ...] = ()
            for b in range(3):
                producers += _conv_out(f"{stage}.{b}.conv2", bias=False) + _bn_axes(f"{stage}.{b}.bn2")
                if b > 0:
                    consumers += (_conv_in(f"{stage}.{b}.conv1"),)
            if s == 0:
                consumers += (_conv_in(f"{stage}.0.conv1"),)
            if s + 1 < len(self.widths):
                nxt = f"layer{s + 2}.0"
                consumers += (_conv_in(f"{nxt}.conv1"), _conv_in(f"{nxt}.shortcut.0"))
            else:
                consumers += (_conv_in("linear"),)
            taps = tuple(f"{stage}.{b}" for b in range(3))
            points.append(AlignmentPoint(stage, planes, taps, producers + consumers))
        for s, planes in enumerate(self.widths):
            for b in range(3):
                block = f"layer{s + 1}.{b}"
                axes = _conv_out(f"{block}.conv1", bias=False) + _bn_axes(f"{block}.bn1") + (_conv_in(f"{block}.conv2"),)
                points.append(AlignmentPoint(block, planes, (f"{block}.relu1",), axes))
        fixed = (("conv1.weight", 1), ("linear.weight", 0), ("linear.bias", 0))
        return AlignmentSpec(tuple(points), fixed)


def build_model(name: str = "cnn", num_classes: int = 10, in_channels: int = 1, width: int = 1) -> nn.Module:
    """Build one of :data:`MODEL_NAMES`.

    Args:
        name: ``"cnn"`` (default), ``"vgg11"``, ``"vgg11_bn"`` or ``"resnet20"``.
        num_classes: Number of output classes.
        in_channels: Input channels (1 for Fashion-MNIST, 3 for CIFAR).
        width: Width multiplier (a positive integer).
    """
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if name == "cnn":
        return CNN(num_classes, in_channels, width)
    if name in ("vgg11", "vgg11_bn"):
        return VGG11(num_classes, in_channels, width, batch_norm=name == "vgg11_bn")
    if name == "resnet20":
        return ResNet20(num_classes, in_channels, width)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
