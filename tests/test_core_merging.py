"""fedcca.merging.merger: exact recovery of symmetric copies, averaging, BatchNorm, degenerate inputs."""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import torch

from fedcca.merging.config import MergeConfig
from fedcca.merging.merger import (
    MergeError,
    Merger,
    average_state_dicts,
    merge,
    merge_sequential,
    recompute_batchnorm,
)
from fedcca.methods.registry import ALIGNERS
from fedcca.statistics import StatisticsError, collect_statistics
from tests.tiny_models import calibration, make_tiny, outputs, symmetric_copy

METHODS = tuple(ALIGNERS)

DATA_METHODS = ("cca", "permute")
ZOO = ("cnn", "vgg11", "vgg11_bn", "resnet20")


def _assert_same_function(left: torch.nn.Module, right: torch.nn.Module, x: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(outputs(left, x), outputs(right, x), atol=atol, rtol=1e-4)


def _with_fresh_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    return recompute_batchnorm(copy.deepcopy(model), x)


def _assert_finite(model: torch.nn.Module) -> None:
    for key, value in model.state_dict().items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), key


# ----------------------------------------------------------------------------- exact recovery

# (method, merge options, scale range of the copy): the relative ridge and Permute undo any
# positive per-feature scale, the default trace ridge (and its g = inf limit) one scale per point.
EXACT_CASES = [("cca", {"ridge_mode": "relative"}, (0.5, 2.0)), ("permute", {}, (0.5, 2.0)),
               ("cca", {}, (1.7, 1.7)), ("cca", {"ridge": float("inf")}, (0.6, 0.6)),
               ("cca", {"ridge_mode": "absolute"}, (1.0, 1.0))]


@pytest.mark.parametrize(("method", "options", "scales"), EXACT_CASES)
@pytest.mark.parametrize("repair", ["none", "affine"])
@pytest.mark.parametrize("fold_bn", [True, False])
def test_symmetric_copy_is_recovered_exactly(method: str, options: dict, scales: tuple, repair: str,
                                             fold_bn: bool) -> None:
    model, x = make_tiny(1), calibration(24)
    # REPAIR targets the endpoints with BatchNorm recomputed on x, as merging leaves the result.
    merged = merge([model, symmetric_copy(model, scale_range=scales)], x, method, recompute_bn=repair != "none",
                   repair=repair, fold_bn=fold_bn, **options)
    if repair == "none" and not fold_bn:  # unfolded, the weights themselves come back
        for key, value in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-5, rtol=1e-5)
    # Folded, BatchNorm keeps the models' statistics (re-fitted); unfolded with repair, it is recomputed on x.
    _assert_same_function(merged, model if fold_bn or repair == "none" else _with_fresh_bn(model, x), x)


def test_default_ridge_does_not_undo_per_feature_scales_exactly() -> None:
    """The price of the trace ridge (chosen for trained nets): per-feature rescaled copies are approximate."""
    model, x = make_tiny(1), calibration(24)
    merged = merge([model, symmetric_copy(model, scale_range=(0.5, 2.0))], x, "cca", recompute_bn=False)
    assert not torch.allclose(outputs(merged, x), outputs(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("repair", ["mean", "affine"])
def test_streamed_repair_equals_repair_of_the_merged_model(repair: str) -> None:
    """The merger's running REPAIR targets equal repair() applied afterwards with all endpoints at hand."""
    from fedcca.merging.merger import merge_with_result
    from fedcca.merging.repair import repair as repair_model

    models, x = [make_tiny(1, batchnorm=True), make_tiny(2, batchnorm=True), make_tiny(3, batchnorm=True)], calibration(24)
    merged = merge(models, x, "cca", weights=[1.0, 2.0, 1.0], repair=repair, balance=False)
    plain = merge_with_result(models, x, "cca", weights=[1.0, 2.0, 1.0], balance=False, keep_transforms=True)
    transforms = [plain.transforms[f"models[{k}]"] for k in range(3)]
    # Aligned BatchNorm merges are folded: the endpoints are measured as they are.
    expected = repair_model(copy.deepcopy(plain.model), models, transforms, x, [1.0, 2.0, 1.0], mode=repair,
                            recompute_bn=False)
    unrepaired = plain.model
    torch.testing.assert_close(outputs(merged, x), outputs(expected, x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(outputs(merged, x), outputs(unrepaired, x), atol=1e-3)


def test_unknown_repair_raises() -> None:
    with pytest.raises(ValueError, match="unknown repair 'full'"):
        merge([make_tiny(1)], calibration(4), "cca", repair="full")


def test_weight_matching_recovers_a_permuted_copy() -> None:
    model, x = make_tiny(1), calibration(8)
    merged = merge([model, symmetric_copy(model, scale_range=(1.0, 1.0))], x, "weight-matching",
                   recompute_bn=False)
    _assert_same_function(merged, model, x, atol=1e-6)


# CCA/Permute can only identify a symmetry where the samples span the features: VGG11's
# 512-channel points sit at 2x2 (32x32 input), so they need 64x64 inputs and 40 images.
ZOO_INPUTS = {"cnn": (12, 28), "vgg11": (40, 64), "vgg11_bn": (40, 64), "resnet20": (12, 28)}


@pytest.mark.parametrize("name", ZOO)
def test_model_zoo_symmetric_copies_are_recovered(name: str) -> None:
    from fedcca.models import build_model

    count, size = ZOO_INPUTS[name]
    x = torch.randn(count, 1, size, size, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    # Fresh BN statistics centre every BN-ReLU input, so no unit is dead: which dead unit of a
    # permuted copy matches which is unknowable from activations, and recomputing BN after
    # averaging two different dead units would revive them.
    # Tiny BN eps: with eps = 1e-5 a rescaled copy is not an exact symmetry (see make_tiny).
    model = build_model(name, num_classes=3, in_channels=1, width=1).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = 1e-12
    model = _with_fresh_bn(model, x)
    other = symmetric_copy(model, seed=5)
    statistics = [None, collect_statistics(model, [other], x)[0]]  # one pass serves both methods
    probe = x[:4]  # the function check needs few inputs; VGG forwards dominate the run time
    expected = outputs(model, probe)
    # Exact recovery makes the average equal to `model`, BN buffers included: no recompute needed.
    merged = [merge([model, other], x, method, statistics=statistics, recompute_bn=False, ridge_mode="relative")
              for method in DATA_METHODS]
    permuted = symmetric_copy(model, seed=6, scale_range=(1.0, 1.0))
    merged.append(merge([model, permuted], x, "weight-matching", recompute_bn=False))
    merged.append(merge([model, permuted], x, "zipit", recompute_bn=False))  # ZipIt! averages unscaled features
    merged.append(merge([model, copy.deepcopy(model), copy.deepcopy(model)], x, "zipit"))  # identical: itself
    for result in merged:
        torch.testing.assert_close(outputs(result, probe), expected, atol=1e-4, rtol=1e-4)


def test_zipit_zips_within_a_model_when_its_own_features_correlate_best() -> None:
    """Two copies of one feature inside model A, none matching in B: ZipIt! groups A's two (a permutation cannot)."""
    from fedcca.methods.zipit import zip_groups

    # Features: A0, A1, B0, B1 (n = 2, K = 2). A0 ~ A1 (0.99); B's features match neither well.
    correlation = np.array([[1.0, 0.99, 0.2, 0.1], [0.99, 1.0, 0.1, 0.2], [0.2, 0.1, 1.0, 0.3],
                            [0.1, 0.2, 0.3, 1.0]])
    assert zip_groups(correlation, 2) == [[0, 1], [2, 3]]
    permutation = np.array([[1.0, 0.0, 0.1, 0.95], [0.0, 1.0, 0.9, 0.1], [0.1, 0.9, 1.0, 0.0],
                            [0.95, 0.1, 0.0, 1.0]])
    assert zip_groups(permutation, 2) == [[0, 3], [1, 2]]  # cross-model pairs when they correlate best


def test_zipit_is_offline_only() -> None:
    from fedcca.flower.strategy import CCAMerge

    with pytest.raises(ValueError, match="aligns all client models jointly"):
        CCAMerge(lambda: make_tiny(1), calibration(8), method="zipit")


def test_separate_reference_is_only_a_target() -> None:
    model, x = make_tiny(1), calibration(24)
    copies = [symmetric_copy(model, seed=s) for s in (3, 4, 5)]
    merged = merge(copies, x, "cca", reference=model, weights=[1.0, 2.0, 3.0], recompute_bn=False,
                   ridge_mode="relative")
    _assert_same_function(merged, model, x)


def test_precomputed_statistics_give_the_same_merge() -> None:
    model, other, x = make_tiny(1), make_tiny(2), calibration(24)
    stats = collect_statistics(model, [model, other], x)
    given = merge([model, other], x, "cca", statistics=[None, stats[1]])
    computed = merge([model, other], x, "cca")
    for key, value in computed.state_dict().items():
        torch.testing.assert_close(given.state_dict()[key], value)


# ----------------------------------------------------------------------------- averaging

@pytest.mark.parametrize("method", METHODS)
def test_identical_models_merge_to_the_same_function(method: str) -> None:
    model, x = make_tiny(1), calibration(24)
    merged = merge([copy.deepcopy(model) for _ in range(3)], x, method, reference=1)
    _assert_finite(merged)
    # Aligned merges fold BatchNorm and re-fit it (the models' function); "direct" recomputes it on x.
    _assert_same_function(merged, model if method != "direct" else _with_fresh_bn(model, x), x, atol=1e-5)


def test_direct_merge_is_the_weighted_average() -> None:
    a, b = make_tiny(1), make_tiny(2)
    merged = merge([a, b], calibration(8), "direct", weights=[1.0, 3.0], recompute_bn=False)
    for key, value in merged.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * a.state_dict()[key] + 0.75 * b.state_dict()[key])
        else:
            assert torch.equal(value, a.state_dict()[key])  # num_batches_tracked from models[0]


def test_unknown_method_lists_the_options() -> None:
    with pytest.raises(ValueError, match="unknown method 'fedma'; choose one of") as caught:
        merge([make_tiny(1)], calibration(4), "fedma")
    assert all(name in str(caught.value) for name in ("cca", "permute", "weight-matching", "blend", "zipit", "direct"))


def test_architecture_mismatch_and_non_finite_weights_are_named() -> None:
    model = make_tiny(1)
    with pytest.raises(ValueError, match="models\\[1\\] does not match.*bn2"):
        merge([model, make_tiny(2, batchnorm=False)], calibration(8), "direct")
    broken = make_tiny(2)
    with torch.no_grad():
        broken.fc2.bias[0] = float("inf")
    with pytest.raises(MergeError, match="'fc2.bias'"):
        merge([model, broken], calibration(8), "direct")
    with pytest.raises(MergeError, match="'fc2.bias'"):
        average_state_dicts([model.state_dict(), broken.state_dict()])


# ----------------------------------------------------------------------------- sequential / selective

@pytest.mark.parametrize("method", DATA_METHODS)
def test_selective_merge_without_points_is_the_direct_average(method: str) -> None:
    a, b, x = make_tiny(1), make_tiny(2), calibration(8)
    selective = merge([a, b], x, method, points=[], recompute_bn=False).state_dict()
    for key, value in a.state_dict().items():  # against the average written out, not another merge
        if value.is_floating_point():
            expected = 0.5 * (value.double() + b.state_dict()[key].double())
            torch.testing.assert_close(selective[key].double(), expected, rtol=1e-6, atol=1e-7, msg=key)


def test_selective_merge_aligns_only_the_chosen_points() -> None:
    model, x = make_tiny(1), calibration(24)
    other = symmetric_copy(model)
    merged = merge([model, other], x, "permute", points=["fc1"], recompute_bn=False, balance=False).state_dict()
    torch.testing.assert_close(merged["fc2.weight"], model.state_dict()["fc2.weight"])  # fc1 aligned
    expected = (model.state_dict()["conv1.weight"] + other.state_dict()["conv1.weight"]) / 2
    torch.testing.assert_close(merged["conv1.weight"], expected)  # conv1 untouched: plain average


@pytest.mark.parametrize("method", METHODS)
def test_sequential_merge_of_identical_models_is_the_model(method: str) -> None:
    x = calibration(24)
    model = _with_fresh_bn(make_tiny(1), x)  # the running model gets fresh BN stats after step 1
    merged = merge_sequential([copy.deepcopy(model) for _ in range(3)], x, method)
    _assert_same_function(merged, model, x, atol=1e-5)


def test_sequential_weights_accumulate() -> None:
    models, x = [make_tiny(s) for s in (1, 2, 3)], calibration(8)
    weights = [1.0, 2.0, 5.0]
    sequential = merge_sequential(models, x, "direct", weights=weights, recompute_bn=False)
    all_to_one = merge(models, x, "direct", weights=weights, recompute_bn=False)
    for key, value in all_to_one.state_dict().items():
        torch.testing.assert_close(sequential.state_dict()[key], value)
    with pytest.raises(TypeError, match="reference"):
        merge_sequential(models, x, reference=1)


# ----------------------------------------------------------------------------- BatchNorm

def _bn2_inputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval().conv2(model.relu1(model.conv1(x)))
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()


def test_recompute_batchnorm_gives_exact_dataset_statistics() -> None:
    model, x = make_tiny(1).train(), calibration(30)
    model.relu1.eval()  # a submodule mode that must survive
    recompute_batchnorm(model, x, batch_size=7)  # 5 batches of 6
    inputs = _bn2_inputs(copy.deepcopy(model), x)  # bn2 is the first BN: its inputs do not depend on BN
    torch.testing.assert_close(model.bn2.running_mean.double(), inputs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn2.running_var.double(), inputs.var(0, unbiased=True), rtol=1e-5, atol=1e-6)
    assert model.training and model.bn2.training and not model.relu1.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_recompute_batchnorm_matches_torch_for_one_batch() -> None:
    model, x = make_tiny(1), calibration(16)
    torch_way = copy.deepcopy(model)
    torch_way.bn2.reset_running_stats()
    torch_way.bn2.momentum = None  # cumulative average: exact for one batch
    with torch.no_grad():
        torch_way.train()(x)
    recompute_batchnorm(model, x, batch_size=16)
    torch.testing.assert_close(model.bn2.running_mean, torch_way.bn2.running_mean)
    torch.testing.assert_close(model.bn2.running_var, torch_way.bn2.running_var)
    assert not model.training


def test_recompute_batchnorm_without_batchnorm_is_a_no_op() -> None:
    model = make_tiny(1, batchnorm=False)
    before = copy.deepcopy(model.state_dict())
    recompute_batchnorm(model, calibration(4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- degenerate inputs

@pytest.mark.parametrize("method", DATA_METHODS)
def test_dead_channels_are_logged_and_merge_stays_exact(method: str, caplog: pytest.LogCaptureFixture) -> None:
    model, x = make_tiny(1, batchnorm=False), calibration(24)
    with torch.no_grad():
        model.conv1.weight[1:3] = 0.0   # zeroed filters
        model.conv1.bias[1:3] = 0.0
        model.fc1.bias[:3] = -100.0     # dead ReLU units with non-zero weights
    with caplog.at_level(logging.DEBUG, logger="fedcca.methods"):
        merged = merge([model, symmetric_copy(model)], x, method, ridge_mode="relative")
    assert "point 'conv1': 2 dead feature(s) in the reference and 2 in the model" in caplog.text
    assert re.search(r"point 'fc1': ([3-6]) dead feature\(s\) in the reference and \1 in the model", caplog.text)
    _assert_finite(merged)
    _assert_same_function(merged, model, x)


def test_fewer_samples_than_features_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    x = calibration(2, size=1)  # 2 samples at every point, 4-6 features
    with caplog.at_level(logging.WARNING, logger="fedcca.methods"):
        merged = merge([make_tiny(1, batchnorm=False), make_tiny(2, batchnorm=False)], x, "cca")
    assert "2 samples for 4 features" in caplog.text
    _assert_finite(merged)


def test_non_finite_calibration_is_a_clear_error() -> None:
    x = calibration(8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(StatisticsError, match="non-finite features at point 'conv1'"):
        merge([make_tiny(1), make_tiny(2)], x, "cca")
    with pytest.raises(ValueError, match="non-finite input to 'bn2'"):
        merge([make_tiny(1), make_tiny(2)], x, "direct")


# ----------------------------------------------------------------------------- dead features

def _with_dead_units(seed: int, units: slice) -> torch.nn.Module:
    model = make_tiny(seed, batchnorm=False)
    with torch.no_grad():
        model.fc1.bias[units] = -100.0  # never active on the calibration data
    return model


def test_zero_features_keeps_the_function_of_dead_units() -> None:
    from fedcca.spec.alignment import zero_features
    from fedcca.spec.tracing import spec_for

    model, x = _with_dead_units(1, slice(0, 3)), calibration(24)
    stats = collect_statistics(model, [model], x)[0]
    masks = {point: pair.zero_features()[1] for point, pair in stats.items()}
    assert int(masks["fc1"].sum()) >= 3
    zeroed = copy.deepcopy(model)
    zeroed.load_state_dict(zero_features(model.state_dict(), spec_for(model), masks))
    assert torch.all(zeroed.fc1.bias[:3] == 0) and torch.all(zeroed.fc1.weight[:3] == 0)
    assert torch.all(zeroed.state_dict()["fc2.weight"][:, :3] == 0)  # the consumer ignores them
    _assert_same_function(zeroed, model, x, atol=1e-6)
    # negative control: zeroing a live unit changes the function
    live = {"fc1": torch.zeros_like(masks["fc1"])}
    live["fc1"][int(torch.nonzero(~masks["fc1"])[0])] = True
    broken = copy.deepcopy(model)
    broken.load_state_dict(zero_features(model.state_dict(), spec_for(model), live))
    assert not torch.allclose(outputs(broken, x), outputs(model, x), atol=1e-4)


@pytest.mark.parametrize("method", DATA_METHODS)
def test_dead_units_of_a_client_are_not_mixed_into_the_merge(method: str) -> None:
    """A client's dead units (absent in the reference) leave no trace in the merged weights."""
    reference, x = make_tiny(1, batchnorm=False), calibration(24)
    client = _with_dead_units(2, slice(0, 3))
    merged = merge([client], x, method, reference=reference)
    # Equivalent: the client with those units' weights removed by hand.
    by_hand = copy.deepcopy(client)
    with torch.no_grad():
        by_hand.fc1.weight[:3] = 0.0
        by_hand.fc1.bias[:3] = 0.0
        by_hand.fc2.weight[:, :3] = 0.0
    expected = merge([by_hand], x, method, reference=reference, zero_dead=False)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-6, rtol=1e-6)
    kept = merge([client], x, method, reference=reference, zero_dead=False)
    assert not torch.allclose(kept.state_dict()["fc1.bias"], merged.state_dict()["fc1.bias"], atol=1e-3)


@pytest.mark.parametrize("method", DATA_METHODS)
def test_balancing_changes_the_weights_not_the_function(method: str) -> None:
    models, x = [make_tiny(1, batchnorm=False), make_tiny(2, batchnorm=False), make_tiny(3, batchnorm=False)], calibration(24)
    balanced = merge(models, x, method)
    plain = merge(models, x, method, balance=False)
    _assert_same_function(balanced, plain, x, atol=1e-5)
    assert not torch.allclose(balanced.fc1.weight, plain.fc1.weight, atol=1e-3)
    direct = merge(models, x, "direct")  # FedAvg semantics: never rebalanced
    torch.testing.assert_close(direct.fc1.weight, merge(models, x, "direct", balance=False).fc1.weight)


@pytest.mark.parametrize("average", ["median", "trimmed"])
def test_a_robust_merge_keeps_its_own_copy_of_every_added_model(average: str) -> None:
    """Changing a model after adding it (a server reuses one model object per reply) changes nothing."""
    x = calibration(32, seed=0)
    models = [make_tiny(seed=s).double() for s in range(3)]
    expected = Merger(models[0], x.double(), MergeConfig("direct", recompute_bn=False), average=average)
    for model in models:
        expected.add(model)
    reused = models[0]
    merger = Merger(models[0], x.double(), MergeConfig("direct", recompute_bn=False), average=average)
    scratch = make_tiny(seed=9).double()
    for model in models:
        scratch.load_state_dict(model.state_dict())
        merger.add(scratch)
    scratch.load_state_dict(reused.state_dict())
    for key, value in expected.finish().model.state_dict().items():
        torch.testing.assert_close(merger.finish().model.state_dict()[key], value, msg=key)
