"""The one tiny test model: a conv net with BatchNorm and a hand-written alignment spec, and its data."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedcca.spec.alignment import AlignmentPoint, AlignmentSpec, ParamAxis, apply_transforms, random_symmetry

IN_CHANNELS, C1, C2, HIDDEN, CLASSES = 2, 4, 4, 6, 3


class TinyNet(nn.Module):
    """conv-ReLU, conv-BN-ReLU, global average pool, linear-ReLU, linear; three alignment points."""

    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(IN_CHANNELS, C1, 3, padding=1), nn.ReLU()
        self.conv2 = nn.Conv2d(C1, C2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(C2) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.fc1, self.relu3, self.fc2 = nn.Linear(C2, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for inputs [N, 2, H, W]."""
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(x.mean(dim=(2, 3)))))

    def alignment_spec(self) -> AlignmentSpec:
        """Points after relu1, relu2 and relu3."""
        bn = isinstance(self.bn2, nn.BatchNorm2d)
        conv2_out = [ParamAxis(key, 0, "out") for key in ("conv2.weight", "conv2.bias")]
        if bn:
            conv2_out += [ParamAxis(f"bn2.{name}", 0, "out") for name in ("weight", "bias", "running_mean")]
            conv2_out.append(ParamAxis("bn2.running_var", 0, "var"))
        return AlignmentSpec(points=(
            AlignmentPoint("conv1", C1, ("relu1",), (
                ParamAxis("conv1.weight", 0, "out"), ParamAxis("conv1.bias", 0, "out"),
                ParamAxis("conv2.weight", 1, "in"))),
            AlignmentPoint("conv2", C2, ("relu2",), (*conv2_out, ParamAxis("fc1.weight", 1, "in"))),
            AlignmentPoint("fc1", HIDDEN, ("relu3",), (
                ParamAxis("fc1.weight", 0, "out"), ParamAxis("fc1.bias", 0, "out"),
                ParamAxis("fc2.weight", 1, "in"))),
        ), fixed=(("conv1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0)),
            norms=(("conv2", "bn2"),) if bn else ())


def make_model(seed: int = 0) -> TinyNet:
    """A TinyNet freshly initialised from ``seed`` (as a federation's ``model_fn`` builds it)."""
    torch.manual_seed(seed)
    return TinyNet()


def make_tiny(seed: int = 0, batchnorm: bool = True) -> TinyNet:
    """A TinyNet initialised from ``seed``, in eval mode, with live features at every point.

    BatchNorm statistics and fc1's bias are centred on a probe batch so that no ReLU unit is
    dead on :func:`calibration` data (dead units are tested on purpose elsewhere). BatchNorm's
    eps is tiny: with eps = 1e-5, sqrt(s^2 var + eps) != s sqrt(var + eps), so a rescaled copy would
    differ from the original function by ~eps/var and "exact" recovery could not be tested.
    """
    torch.manual_seed(seed)
    model = TinyNet(batchnorm).eval()
    if batchnorm:
        model.bn2.eps = 1e-12
    probe = calibration(64, seed=seed + 100)
    with torch.no_grad():
        if batchnorm:
            pre = model.conv2(model.relu1(model.conv1(probe)))
            model.bn2.running_mean.copy_(pre.mean(dim=(0, 2, 3)))
            model.bn2.running_var.copy_(pre.var(dim=(0, 2, 3)))
            model.bn2.weight.uniform_(0.5, 1.5)
            model.bn2.bias.uniform_(0.2, 0.6)
        pooled = model.relu2(model.bn2(model.conv2(model.relu1(model.conv1(probe))))).mean(dim=(2, 3))
        model.fc1.bias.sub_(model.fc1(pooled).mean(0))
    return model


def calibration(n: int = 32, channels: int = IN_CHANNELS, size: int = 6, seed: int = 1) -> torch.Tensor:
    """Random inputs [n, channels, size, size]."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def symmetric_copy(model: nn.Module, seed: int = 3, scale_range: tuple[float, float] = (0.5, 2.0)) -> nn.Module:
    """A copy of ``model`` whose features are permuted and positively rescaled at every point."""
    spec = model.alignment_spec()
    transforms = random_symmetry(spec, torch.Generator().manual_seed(seed), scale_range=scale_range)
    other = copy.deepcopy(model)
    other.load_state_dict(apply_transforms(model.state_dict(), spec, transforms))
    return other


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits without gradients."""
    with torch.no_grad():
        return model.eval()(x)
