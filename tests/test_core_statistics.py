"""fedcca.statistics: streaming moments, their combination, serialisation and failure modes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.tiny_models import C1, TinyNet, calibration, make_tiny

from fedcca.alignment import AlignmentPoint, AlignmentSpec
from fedcca.statistics import (
    PairStatistics,
    StatisticsError,
    as_batches,
    collect_statistics,
    statistics_from_arrays,
    statistics_to_arrays,
)

FIELDS = ("sum_a", "sum_b", "sq_a", "sq_b", "cross")


def _assert_equal_stats(left: PairStatistics, right: PairStatistics, rtol: float = 1e-12) -> None:
    assert left.count == right.count
    for name in FIELDS:
        torch.testing.assert_close(getattr(left, name), getattr(right, name), rtol=rtol, atol=1e-12)


def _features(model: TinyNet, x: torch.Tensor, tap: str) -> torch.Tensor:
    """Features of one tap as [samples, channels], computed without the library."""
    captured = []
    handle = dict(model.named_modules())[tap].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    out = captured[0].double()
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]) if out.dim() == 4 else out


def test_statistics_equal_the_moments_of_the_features() -> None:
    a_model, b_model, x = make_tiny(1), make_tiny(2), calibration(20)
    stats = collect_statistics(a_model, [b_model], x, batch_size=7)[0]
    a, b = _features(a_model, x, "relu2"), _features(b_model, x, "relu2")
    assert stats["conv2"].count == 20 * 6 * 6  # every spatial position is a sample
    expected = PairStatistics(a.shape[0], a.sum(0), b.sum(0), a.T @ a, b.T @ b, a.T @ b)
    _assert_equal_stats(stats["conv2"], expected, rtol=1e-10)
    c_aa, c_bb, c_ab = stats["conv2"].covariances()
    joint = np.cov(np.concatenate([a.numpy(), b.numpy()], axis=1), rowvar=False, bias=True)
    np.testing.assert_allclose(c_ab.numpy(), joint[:C1, C1:], atol=1e-10)
    np.testing.assert_allclose(c_aa.numpy(), joint[:C1, :C1], atol=1e-10)


def test_statistics_of_a_dataset_are_the_sum_over_its_halves() -> None:
    a_model, models, x = make_tiny(1), [make_tiny(2), make_tiny(3)], calibration(32)
    whole = collect_statistics(a_model, models, x, batch_size=8)
    first = collect_statistics(a_model, models, x[:16], batch_size=8)
    second = collect_statistics(a_model, models, x[16:], batch_size=8)
    for k in range(2):
        for point in whole[k]:
            _assert_equal_stats(whole[k][point], first[k][point] + second[k][point])


def test_several_taps_of_a_point_sum_their_statistics() -> None:
    a_model, b_model, x = make_tiny(1), make_tiny(2), calibration(8)
    assert C1 == TinyNet().conv2.out_channels  # both taps lie in one 4-feature space
    spec = AlignmentSpec(points=(AlignmentPoint("both", C1, ("relu1", "relu2"), ()),
                                 AlignmentPoint("one", C1, ("relu1",), ()),
                                 AlignmentPoint("two", C1, ("relu2",), ())))
    stats = collect_statistics(a_model, [b_model], x, spec)[0]
    _assert_equal_stats(stats["both"], stats["one"] + stats["two"])


def test_the_reference_object_itself_gets_its_own_features() -> None:
    a_model, x = make_tiny(1), calibration(8)
    same, twin = collect_statistics(a_model, [a_model, copy.deepcopy(a_model)], x)
    for point, stats in same.items():
        torch.testing.assert_close(stats.cross, stats.sq_a)
        _assert_equal_stats(stats, twin[point])


def test_hooks_removed_and_mode_restored_also_on_error() -> None:
    a_model, b_model, x = make_tiny(1).train(), make_tiny(2), calibration(8)
    with torch.no_grad():
        b_model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(StatisticsError, match=r"model 1 has non-finite features at point 'fc1'") as info:
        collect_statistics(a_model, [make_tiny(3), b_model], x)
    assert info.value.model_index == 1
    collect_statistics(a_model, [make_tiny(3)], x, points=["conv1"])
    for model in (a_model, b_model):
        assert all(not m._forward_hooks for m in model.modules())
    assert a_model.training and all(m.training for m in a_model.modules())
    assert not b_model.training


def test_non_finite_reference_or_calibration_is_named() -> None:
    a_model, x = make_tiny(1), calibration(8)
    with torch.no_grad():
        a_model.conv1.bias[0] = float("inf")
    with pytest.raises(StatisticsError, match="reference model has non-finite features at point 'conv1'") as info:
        collect_statistics(a_model, [make_tiny(2)], x)
    assert info.value.model_index == -1
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(StatisticsError, match="non-finite features at point 'conv1'"):
        collect_statistics(make_tiny(1), [make_tiny(2)], x)


def test_empty_calibration_is_an_error() -> None:
    with pytest.raises(StatisticsError, match="no features at point"):
        collect_statistics(make_tiny(1), [make_tiny(2)], calibration(0))


def test_as_batches_splits_tensors_and_unpacks_pairs() -> None:
    x = torch.arange(10.0)
    sizes = [len(batch) for batch in as_batches(x, batch_size=4)]
    assert sizes == [4, 3, 3] and torch.equal(torch.cat(list(as_batches(x, 4))), x)
    pairs = [(x[:5], torch.zeros(5)), (x[5:], torch.zeros(5))]
    assert [b.tolist() for b in as_batches(pairs)] == [x[:5].tolist(), x[5:].tolist()]


def test_arrays_round_trip_and_validation() -> None:
    model = make_tiny(1)
    stats = collect_statistics(model, [make_tiny(2)], calibration(8))[0]
    arrays = statistics_to_arrays(stats)
    assert all(value.dtype == np.float64 for value in arrays.values())
    back = statistics_from_arrays(arrays, model.alignment_spec())
    for point in stats:
        _assert_equal_stats(back[point], stats[point], rtol=0)
    spec = model.alignment_spec()
    broken = {
        "conv1/cross": dict(arrays, **{"conv1/cross": np.zeros((2, 2))}),
        "conv2/sq_b": dict(arrays, **{"conv2/sq_b": np.full((C1, C1), np.nan)}),
        "fc1/count": dict(arrays, **{"fc1/count": np.asarray(0.0)}),
        "extra/count": dict(arrays, **{"extra/count": np.asarray(1.0)}),
    }
    for key, bad in broken.items():
        with pytest.raises(StatisticsError, match=key):
            statistics_from_arrays(bad, spec)
    missing = {k: v for k, v in arrays.items() if k != "fc1/sum_a"}
    with pytest.raises(StatisticsError, match="fc1/sum_a"):
        statistics_from_arrays(missing, spec)
