"""Architectures from the field, written the way Flower and PyTorch users write them (small widths).

Used by the partial-alignment tests (tests/test_core_architectures.py) and benchmark
(``python -m simulations.oneshot_fl --set model=simulations.architectures:MobileNetSmall``).

torchvision does not import with the CPU torch of this environment, so these are equivalents:
a ResNet-18 with GroupNorm (as in federated-learning papers), a ResNet whose blocks apply a
functional ReLU to the residual sum, a MobileNet-style net with depthwise convs, a VGG with
BatchNorm, an MLP, a small model with GELU and LayerNorm, and one with a concatenation.
None has an ``alignment_spec()``: their specs are derived from the fx graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GNBasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (2 groups at these widths), ReLU modules, 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks) with GroupNorm instead of BatchNorm."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(2, width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for index, cout in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(GNBasicBlock(cin, cout, stride), GNBasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalResNet(nn.Module):
    """A small BatchNorm ResNet whose residual sums get a functional ReLU in the model's forward."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 1, 2, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # identity block
        x = F.relu(self.down_bn(self.down(x)) + self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))
        return self.fc(x.mean((2, 3)))


class MobileNetSmall(nn.Module):
    """MobileNet-style: depthwise 3x3 + pointwise 1x1 separable blocks with BatchNorm and ReLU."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, cin = [], width
        for cout, stride in ((2 * width, 2), (2 * width, 1), (4 * width, 2)):
            blocks += [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
                       nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class VGGBN(nn.Module):
    """VGG-style: conv-BatchNorm-ReLU stacks with max pooling, two linear layers."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, "M", 2 * width, "M", 4 * width, 4 * width, "M"):
            if cout == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin, 8 * width), nn.ReLU(),
                                        nn.Linear(8 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Three hidden layers with ReLU on flattened images."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1, side: int = 12) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                                 nn.Linear(width // 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GELUNet(nn.Module):
    """A conv feature extractor with ReLU, then a head with LayerNorm and GELU."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width, 4 * width)
        self.norm = nn.LayerNorm(4 * width)
        self.fc2 = nn.Linear(4 * width, 4 * width)
        self.fc3 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).mean((2, 3))
        x = F.gelu(self.norm(self.fc1(x)))
        return self.fc3(F.relu(self.fc2(x)))


class ConcatNet(nn.Module):
    """Two conv branches concatenated (Inception-style), then a conv and a classifier."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.left = nn.Conv2d(width, width, 1)
        self.right = nn.Conv2d(width, width, 3, padding=1)
        self.mix = nn.Conv2d(2 * width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet18-gn": ResNet18GN,
    "resnet-functional-relu": FunctionalResNet,
    "mobilenet-depthwise": MobileNetSmall,
    "vgg-bn": VGGBN,
    "mlp": MLP,
    "gelu-layernorm": GELUNet,
    "concat": ConcatNet,
}
"""Name -> builder (1-channel 12x12 inputs, 10 classes)."""

SIDE = 12


def images(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random 1x12x12 inputs."""
    return torch.randn(count, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
