"""Every model FedAvg accepts, CCAMerge accepts: architectures from the field under partial alignment.

For each architecture of tests/architectures.py: which points are aligned and which are left
unaligned (and that ``strict`` refuses exactly those, naming the node), that random symmetries
of the aligned points keep the function, that the merge equals the plain average on every
parameter no aligned point touches, and one federated round of CCAMerge through Flower.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

import fedcca
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.strategy import CCAMerge
from fedcca.spec.alignment import UnsupportedModelError, apply_transforms, random_symmetry
from fedcca.spec.tracing import spec_for
from fedcca.statistics import run_with_taps
from simulations.architectures import ARCHITECTURES, images

# name -> (aligned points, layers left unaligned, what strict names)
EXPECTED: dict[str, tuple[list[str], set[str], str | None]] = {
    "resnet18-gn": (["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2",
                     "layer2.1.conv1", "layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1",
                     "layer4.0.conv2", "layer4.1.conv1"], set(), None),
    "resnet-functional-relu": (["stem", "conv1", "down", "conv3"], set(), None),
    "mobilenet-depthwise": (["blocks.15"], {"stem.0", "blocks.3", "blocks.9"},
                            r"layer 'blocks.0' \(Conv2d\) .* depthwise conv \(groups=8\)"),
    "vgg-bn": (["features.0", "features.4", "features.8", "features.11", "classifier.1"], set(), None),
    "mlp": (["net.1", "net.3", "net.5"], set(), None),
    "gelu-layernorm": (["conv1", "conv2", "fc2"], {"fc1"}, r"graph node 'gelu' \(torch\._C\._nn\.gelu\)"),
    "concat": (["stem", "mix"], {"left", "right"}, r"graph node 'cat' \(torch\.cat\)"),
}


def _model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[name]().eval()


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial normalisation statistics and affine parameters (fresh ones are 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("running_mean", "running_var", "weight", "bias"):
                tensor = getattr(module, name, None)
                if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and tensor is not None:
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_aligned_and_left_out_points_and_strict(name: str) -> None:
    aligned, left, refused = EXPECTED[name]
    model = _model(name, 0)
    spec = spec_for(model, images(4))
    assert spec.names() == aligned
    assert left <= {layer for entry in spec.left for layer in entry.layers}
    assert bool(spec.left) == bool(left)
    if refused is None:
        assert spec_for(model, images(4), strict=True) == spec  # nothing skipped: the same spec
    else:
        with pytest.raises(UnsupportedModelError, match=refused):
            spec_for(model, images(4), strict=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_symmetries_of_the_aligned_points_keep_the_function(name: str) -> None:
    model = _randomised(_model(name, 0), 1)
    spec = spec_for(model, images(4))
    moved = _model(name, 0)
    moved.load_state_dict(apply_transforms(model.state_dict(), spec, random_symmetry(spec, torch.Generator()
                                                                                     .manual_seed(2))))
    x = images(6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(moved.eval()(x), model(x), atol=1e-4, rtol=1e-4)
    if spec.points:  # the symmetry did move weights
        assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), moved.state_dict().values()))


@pytest.mark.parametrize("method", ["cca", "permute"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_merge_is_the_plain_average_wherever_nothing_is_aligned(name: str, method: str) -> None:
    """Points normalised in groups (GroupNorm, LayerNorm) are aligned by Permute only; CCA averages them."""
    a, b = _randomised(_model(name, 0), 1), _randomised(_model(name, 5), 6)
    spec = spec_for(a, images(4))
    aligned = [p for p in spec.points if method == "permute" or p.groups is None]
    touched = {axis.key for point in aligned for axis in point.axes}
    merged = fedcca.merge([a, b], images(64), method, zero_dead=False, recompute_bn=False, balance=False,
                          fold_bn=False).state_dict()
    untouched = [key for key, value in a.state_dict().items() if value.is_floating_point() and key not in touched]
    assert untouched  # the classifier's bias at least
    for key in untouched:
        expected = 0.5 * (a.state_dict()[key].double() + b.state_dict()[key].double())
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)
    if aligned:
        assert any(not torch.allclose(merged[key].double(), 0.5 * (a.state_dict()[key].double()
                                                                  + b.state_dict()[key].double()))
                   for key in touched)


def test_permute_recovers_a_group_norm_model_from_its_permuted_copy() -> None:
    """A ResNet-18 with GroupNorm and a copy permuted within every GroupNorm's groups merge back into it."""
    model = _randomised(_model("resnet18-gn", 0), 1)
    spec = spec_for(model, images(4))
    assert {p.groups for p in spec.points} == {2}
    copy = _model("resnet18-gn", 0)
    copy.load_state_dict(apply_transforms(model.state_dict(), spec,
                                          random_symmetry(spec, torch.Generator().manual_seed(3))))
    merged = fedcca.merge([model, copy], images(128), "permute", zero_dead=False, recompute_bn=False)
    x = images(6, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), model(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(fedcca.merge([model, copy], images(128), "direct").eval()(x), model(x), atol=1e-2)


def _client(name: str) -> ClientApp:
    """A FedAvg-style client: two SGD steps on its own random shard, then the weights."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node = message.metadata.dst_node_id
        model = ARCHITECTURES[name]()
        model.load_state_dict(message.content["arrays"].to_torch_state_dict())
        generator = torch.Generator().manual_seed(node)
        x, y = torch.randn(32, 1, 12, 12, generator=generator), torch.randint(0, 10, (32,), generator=generator)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model.train()(x), y)
            loss.backward()
            optimiser.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": 32, "train-loss": loss.item()})})
        return Message(content, reply_to=message)

    return app


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_one_federated_round_of_ccamerge(name: str) -> None:
    strategy = CCAMerge(ARCHITECTURES[name], images(32), reference="global", fraction_evaluate=0.0,
                        min_available_nodes=3, min_train_nodes=3, device="cpu")
    grid = InProcessGrid({node: _client(name) for node in (1, 2, 3)})
    initial = ArrayRecord(_model(name, 0).state_dict())
    messages = strategy.configure_train(1, initial, ConfigRecord(), grid)
    arrays, metrics = strategy.aggregate_train(1, list(grid.send_and_receive(messages)))
    record = strategy.rounds[-1]
    assert arrays is not None and record.num_valid == 3 and not record.skipped, record.skip_reason
    assert all(torch.isfinite(v.double()).all() for v in arrays.to_torch_state_dict().values())
    report = strategy.alignment_report()
    assert report["aligned"] == EXPECTED[name][0] and bool(report["left"]) == bool(EXPECTED[name][1])
    assert metrics is not None and "train-loss" in metrics


def test_a_functional_relu_of_a_residual_sum_is_read_at_its_consumers_input() -> None:
    """No module outputs relu(x + f(x)) in the model's forward: its pooled value is read at the classifier."""
    model = _randomised(_model("resnet-functional-relu", 0), 1)
    spec = spec_for(model, images(4))
    assert spec.point("down").taps == ("fc:input",)
    seen: dict[str, torch.Tensor] = {}
    x = images(5, seed=4)
    with torch.no_grad():
        run_with_taps(model, x, {"fc:input": ["down"]}, lambda tap, out: seen.setdefault(tap, out.clone()))
        h = F.relu(model.bn(model.stem(x)))
        h = F.relu(h + model.bn2(model.conv2(F.relu(model.bn1(model.conv1(h))))))
        h = F.relu(model.down_bn(model.down(h)) + model.bn4(model.conv4(F.relu(model.bn3(model.conv3(h))))))
    torch.testing.assert_close(seen["fc:input"], h.mean((2, 3)))
