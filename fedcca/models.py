"""The networks fedcca merges, each describing its own alignment structure.

``build_model(name, num_classes, in_channels, width)`` builds one of :data:`MODEL_NAMES`.
Every model has an ``alignment_spec()`` method returning an
:class:`~fedcca.spec.alignment.AlignmentSpec` written as data from the model's own layout. ReLUs
are separate, named, non-inplace modules so that forward hooks can tap the features they
output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from fedcca.spec.alignment import AlignmentPoint, AlignmentSpec, ParamAxis

MODEL_NAMES: tuple[str, ...] = ("cnn", "lenet", "dense-cnn", "vgg11", "vgg11_bn", "resnet20")

_CNN_LAYOUT: tuple[int | str, ...] = (32, "M", 64, "M", 128)
_VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_RESNET20_WIDTHS: tuple[int, ...] = (16, 32, 64)
_BLOCKS_PER_STAGE = 3


def _producer(layer: str, bias: bool = False, bn: str | None = None) -> tuple[ParamAxis, ...]:
    """Output-side axes of a conv/linear ``layer`` and of the BatchNorm ``bn`` right after it."""
    axes = [ParamAxis(f"{layer}.weight", 0, "out")]
    if bias:
        axes.append(ParamAxis(f"{layer}.bias", 0, "out"))
    if bn is not None:
        axes += [ParamAxis(f"{bn}.{name}", 0, "out") for name in ("weight", "bias", "running_mean")]
        axes.append(ParamAxis(f"{bn}.running_var", 0, "var"))
    return tuple(axes)


def _consumer(layer: str) -> ParamAxis:
    """Input-side axis of a conv/linear ``layer``."""
    return ParamAxis(f"{layer}.weight", 1, "in")


def _classifier_fixed(first_conv: str, classifier: str) -> tuple[tuple[str, int], ...]:
    """The never-aligned axes: the stem's input channels and the classifier's outputs."""
    return ((f"{first_conv}.weight", 1), (f"{classifier}.weight", 0), (f"{classifier}.bias", 0))


@dataclass(frozen=True)
class _ChainLayer:
    """One conv(+BN)+ReLU layer of a plain feed-forward network, by module name."""

    conv: str
    bn: str | None
    relu: str
    channels: int


class _ChainNet(nn.Module):
    """conv(+BN)+ReLU layers with max-pools between, global average pool, linear classifier.

    Args:
        layout: Channel counts of the conv layers, ``"M"`` for a 2x2 max-pool.
        in_channels: Input channels.
        num_classes: Number of output classes.
        batch_norm: Insert BatchNorm after every conv (the conv then has no bias).
    """

    def __init__(self, layout: tuple[int | str, ...], in_channels: int, num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.features = nn.Sequential()
        layers: list[_ChainLayer] = []
        channels = in_channels
        for item in layout:
            if item == "M":
                # ceil_mode keeps 28x28 inputs alive through VGG's five pools (28-14-7-4-2-1).
                self.features.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            conv = f"features.{len(self.features)}"
            self.features.append(nn.Conv2d(channels, int(item), 3, padding=1, bias=not batch_norm))
            bn = None
            if batch_norm:
                bn = f"features.{len(self.features)}"
                self.features.append(nn.BatchNorm2d(int(item)))
            layers.append(_ChainLayer(conv, bn, f"features.{len(self.features)}", int(item)))
            self.features.append(nn.ReLU())
            channels = int(item)
        self._layers = tuple(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                # He init keeps the signal alive through VGG's eight plain ReLU layers.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def alignment_spec(self) -> AlignmentSpec:
        """One point per conv layer (named after the conv), tapped at its ReLU; the next conv
        (or the classifier) consumes it."""
        consumers = [layer.conv for layer in self._layers[1:]] + ["classifier"]
        points = tuple(
            AlignmentPoint(
                layer.conv, layer.channels, (layer.relu,),
                (*_producer(layer.conv, bias=layer.bn is None, bn=layer.bn), _consumer(consumer)),
            )
            for layer, consumer in zip(self._layers, consumers)
        )
        norms = tuple((layer.conv, layer.bn) for layer in self._layers if layer.bn is not None)
        return AlignmentSpec(points, _classifier_fixed(self._layers[0].conv, "classifier"), norms)


class CNN(_ChainNet):
    """Small convnet for 28x28 grayscale: conv3x3 32w-M-64w-M-128w, each + ReLU, GAP, linear. No BN.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1) -> None:
        super().__init__(_scaled(_CNN_LAYOUT, width), in_channels, num_classes, batch_norm=False)


class VGG11(_ChainNet):
    """VGG11 as in the CCA Merge paper: w x [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
    global average pool, one linear classifier.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
        batch_norm: Insert BatchNorm after every conv ("vgg11_bn").
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1, batch_norm: bool = False) -> None:
        super().__init__(_scaled(_VGG11_LAYOUT, width), in_channels, num_classes, batch_norm)


def _scaled(layout: tuple[int | str, ...], width: float) -> tuple[int | str, ...]:
    """``layout`` with every channel count multiplied by ``width`` (rounded, at least 1)."""
    return tuple(_channels(c, width) if isinstance(c, int) else c for c in layout)


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus identity or 1x1-conv-BN shortcut, then ReLU.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of the shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.planes = planes
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu2 = nn.ReLU()

    @property
    def projects(self) -> bool:
        """Whether the shortcut is a 1x1 conv + BN (the block starts a new residual stream)."""
        return len(self.shortcut) > 0

    def forward(self, x: Tensor) -> Tensor:
        """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


@dataclass
class _Stream:
    """A residual stream being described: everything that feeds or reads one chain of sums."""

    name: str
    size: int
    axes: list[ParamAxis]
    taps: list[str] = field(default_factory=list)

    def point(self) -> AlignmentPoint:
        """The finished alignment point."""
        return AlignmentPoint(self.name, self.size, tuple(self.taps), tuple(self.axes))


class ResNet20(nn.Module):
    """CIFAR ResNet20: conv-BN-ReLU stem, 3 stages of 3 basic blocks (16w/32w/64w), GAP, linear.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1) -> None:
        super().__init__()
        widths = [_channels(w, width) for w in _RESNET20_WIDTHS]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for s, planes in enumerate(widths):
            blocks = [
                BasicBlock(in_planes if b == 0 else planes, planes, 2 if s > 0 and b == 0 else 1)
                for b in range(_BLOCKS_PER_STAGE)
            ]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _stages(self) -> list[tuple[str, nn.Sequential]]:
        return [(f"layer{s + 1}", getattr(self, f"layer{s + 1}")) for s in range(len(_RESNET20_WIDTHS))]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        for _, stage in self._stages():
            out = stage(out)
        return self.linear(self.pool(out).flatten(1))

    def alignment_spec(self) -> AlignmentSpec:
        """3 residual-stream points (``layer1..3``) then 9 in-block points (``layerS.B``).

        A stream is started by the stem (stage 1) or by a projecting shortcut; every block's
        conv2/bn2 feeds the stream its sum adds to, and every block's conv1 (and projecting
        shortcut) reads the stream its input comes from; the classifier reads the last one.
        Streams are tapped at the blocks' outputs, in-block points at each block's ``relu1``.
        """
        stream = _Stream("layer1", self.bn1.num_features, list(_producer("conv1", bn="bn1")))
        streams, inner = [stream], []
        norms = [("conv1", "bn1")]
        for stage_name, stage in self._stages():
            for b, block in enumerate(stage):
                name = f"{stage_name}.{b}"
                stream.axes.append(_consumer(f"{name}.conv1"))
                norms += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", f"{name}.bn2")]
                if block.projects:
                    norms.append((f"{name}.shortcut.0", f"{name}.shortcut.1"))
                    stream.axes.append(_consumer(f"{name}.shortcut.0"))
                    shortcut = _producer(f"{name}.shortcut.0", bn=f"{name}.shortcut.1")
                    stream = _Stream(stage_name, block.planes, list(shortcut))
                    streams.append(stream)
                stream.axes += _producer(f"{name}.conv2", bn=f"{name}.bn2")
                stream.taps.append(name)
                inner_axes = (*_producer(f"{name}.conv1", bn=f"{name}.bn1"), _consumer(f"{name}.conv2"))
                inner.append(AlignmentPoint(name, block.planes, (f"{name}.relu1",), inner_axes))
        stream.axes.append(_consumer("linear"))
        return AlignmentSpec(tuple(s.point() for s in streams) + tuple(inner), _classifier_fixed("conv1", "linear"),
                             tuple(norms))


class LeNet(nn.Module):
    """The CNN of NIID-Bench and Flower's niid_bench baseline (LeNet-5 shape).

    conv 6@5x5 - ReLU - 2x2 max-pool - conv 16@5x5 - ReLU - 2x2 max-pool - flatten - fc 120 - ReLU -
    fc 84 - ReLU - classifier; no BatchNorm. Channel and unit counts scale with ``width``.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
        image_size: Side of the square input (28 for Fashion-MNIST, 32 for CIFAR); fixes fc1's
            input size ``16w * s * s`` with ``s = ((image_size - 4) // 2 - 4) // 2``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1, image_size: int = 28) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet needs images of at least 16x16 pixels, got {image_size}")
        c1, c2, h1, h2 = (_channels(n, width) for n in (6, 16, 120, 84))
        self.spatial = side * side  # fc1 inputs per conv2 channel
        self.conv1, self.relu1 = nn.Conv2d(in_channels, c1, 5), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(c1, c2, 5), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.relu3 = nn.Linear(c2 * self.spatial, h1), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(h1, h2), nn.ReLU()
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x))).flatten(1)
        return self.fc3(self.relu4(self.fc2(self.relu3(self.fc1(x)))))

    def alignment_spec(self) -> AlignmentSpec:
        """Four points, tapped at the ReLUs; conv2's channels reach fc1 as blocks of ``H*W`` inputs."""
        layers = (("conv1", "relu1", "conv2", 1), ("conv2", "relu2", "fc1", self.spatial),
                  ("fc1", "relu3", "fc2", 1), ("fc2", "relu4", "fc3", 1))
        points = tuple(
            AlignmentPoint(layer, getattr(self, layer).weight.shape[0], (relu,),
                           (*_producer(layer, bias=True), ParamAxis(f"{consumer}.weight", 1, "in", block)))
            for layer, relu, consumer, block in layers
        )
        return AlignmentSpec(points, _classifier_fixed("conv1", "fc3"))


class DenseCNN(nn.Module):
    """The (Fashion-)MNIST CNN of DENSE (Zhang et al., NeurIPS 2022), whose one-shot table FuseFL reprints.

    conv 16@5x5 (padding 2) - BN - ReLU - 2x2 max-pool - conv 32@5x5 (padding 2) - BN - ReLU -
    2x2 max-pool - flatten - classifier. Channel counts scale with ``width``.

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels.
        width: Width multiplier.
        image_size: Side of the square input; the classifier reads ``32w * (s // 4)^2`` features.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"dense-cnn needs images of at least 4x4 pixels, got {image_size}")
        c1, c2 = _channels(16, width), _channels(32, width)
        self.spatial = (image_size // 4) ** 2  # classifier inputs per conv2 channel
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(in_channels, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c1, c2, 5, padding=2), nn.BatchNorm2d(c2), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * self.spatial, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, C, H, W]``."""
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.relu2(self.bn2(self.conv2(x)))).flatten(1))

    def alignment_spec(self) -> AlignmentSpec:
        """Two points, tapped at the ReLUs; conv2's channels reach the classifier as blocks of ``H*W`` inputs."""
        points = (
            AlignmentPoint("conv1", self.conv1.weight.shape[0], ("relu1",),
                           (*_producer("conv1", bias=True, bn="bn1"), _consumer("conv2"))),
            AlignmentPoint("conv2", self.conv2.weight.shape[0], ("relu2",),
                           (*_producer("conv2", bias=True, bn="bn2"), ParamAxis("fc.weight", 1, "in", self.spatial))),
        )
        return AlignmentSpec(points, _classifier_fixed("conv1", "fc"), (("conv1", "bn1"), ("conv2", "bn2")))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def is_model_path(name: str) -> bool:
    """Whether ``name`` is a user's ``"package.module:Class"`` rather than one of :data:`MODEL_NAMES`."""
    return ":" in str(name)


def build_model(name: str = "cnn", num_classes: int = 10, in_channels: int = 1, width: float = 1,
                image_size: int = 28) -> nn.Module:
    """Build one of :data:`MODEL_NAMES`.

    Args:
        name: ``"cnn"`` (default), ``"lenet"``, ``"dense-cnn"``, ``"vgg11"``, ``"vgg11_bn"`` or ``"resnet20"``.
        num_classes: Number of output classes.
        in_channels: Input channels (1 for Fashion-MNIST, 3 for CIFAR).
        width: Width multiplier (> 0; fractions such as 0.25 give CPU-sized VGG11/ResNet20).
        image_size: Side of the square input images; only "lenet" and "dense-cnn" depend on
            it (the other models end in global average pooling).

    Raises:
        ValueError: an unknown name or a non-positive size.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        _check_positive_int(arg, value)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if name == "cnn":
        return CNN(num_classes, in_channels, width)
    if name == "lenet":
        return LeNet(num_classes, in_channels, width, image_size)
    if name == "dense-cnn":
        return DenseCNN(num_classes, in_channels, width, image_size)
    if name in ("vgg11", "vgg11_bn"):
        return VGG11(num_classes, in_channels, width, batch_norm=name == "vgg11_bn")
    if name == "resnet20":
        return ResNet20(num_classes, in_channels, width)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
