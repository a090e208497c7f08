"""fedcca.statistics: streaming moments, their combination, serialisation and failure modes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedcca.spec.alignment import AlignmentPoint, AlignmentSpec
from fedcca.statistics import (
    ROW_BLOCK,
    Moments,
    PairStatistics,
    StatisticsError,
    _batch_features,
    _gram,
    as_batches,
    collect_moments,
    collect_statistics,
    feature_moments,
)
from tests.tiny_models import C1, TinyNet, calibration, make_tiny


def _fields(stats: PairStatistics) -> list[torch.Tensor]:
    return [stats.a.mean, stats.b.mean, stats.a.comoment, stats.b.comoment, stats.cross]


def _assert_equal_stats(left: PairStatistics, right: PairStatistics, rtol: float = 1e-9) -> None:
    assert left.count == right.count == left.a.count == left.b.count
    for mine, theirs in zip(_fields(left), _fields(right)):
        torch.testing.assert_close(mine, theirs.double(), rtol=rtol, atol=rtol * max(theirs.abs().max().item(), 1e-30))


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
    expected = PairStatistics.from_features(a, b)  # float64 throughout
    _assert_equal_stats(stats["conv2"], expected, rtol=1e-5)  # float32 products: float32-level agreement
    c_aa, c_bb, c_ab = stats["conv2"].covariances()
    joint = np.cov(np.concatenate([a.numpy(), b.numpy()], axis=1), rowvar=False, bias=True)
    np.testing.assert_allclose(c_ab.numpy(), joint[:C1, C1:], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(c_aa.numpy(), joint[:C1, :C1], rtol=1e-5, atol=1e-7)


def test_the_float32_kernel_matches_float64_on_many_samples_with_large_means() -> None:
    """Centring before the float32 product keeps the error at float32 level where raw sums of
    squares would lose it to cancellation (features with mean 100 and spread 1)."""
    generator = torch.Generator().manual_seed(0)
    n, rows = 24, 3 * ROW_BLOCK + 123  # several row blocks
    a = (torch.randn(rows, n, generator=generator) + 100.0).float()
    b = (a[:, :n] @ torch.randn(n, n, generator=generator) * 0.1 + torch.randn(rows, n, generator=generator)).float()
    reference = PairStatistics.from_features(a, b)
    # Vectors ([N, n, 1]) and conv features ([N, n, S] with S = 64 positions per input).
    for layout in (a[:, :, None], a[: rows // 64 * 64].reshape(rows // 64, 64, n).transpose(1, 2)):
        other = b[:, :, None] if layout.shape[2] == 1 else b[: rows // 64 * 64].reshape(rows // 64, 64, n).transpose(1, 2)
        exact = reference if layout.shape[2] == 1 else PairStatistics.from_features(a[: rows // 64 * 64],
                                                                                    b[: rows // 64 * 64])
        ours = _batch_features(layout, "p", 0), _batch_features(other, "p", 1)
        pair = PairStatistics(ours[0].moments, ours[1].moments, _gram(ours[0].centred, ours[1].centred))
        assert pair.count == exact.count
        for mine, want in zip(_fields(pair), _fields(exact)):
            assert ((mine - want).abs().max() / want.abs().max()).item() < 1e-5


def test_moments_combine_exactly_in_any_order() -> None:
    """Chan's update: statistics of 3 chunks, added in any grouping, equal those of the whole."""
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(90, 5, generator=generator, dtype=torch.float64), torch.randn(90, 3, generator=generator,
                                                                                     dtype=torch.float64) + 4.0
    parts = [PairStatistics.from_features(a[i:i + 30], b[i:i + 30]) for i in (0, 30, 60)]
    whole = PairStatistics.from_features(a, b)
    _assert_equal_stats((parts[0] + parts[1]) + parts[2], whole, rtol=1e-12)
    _assert_equal_stats(parts[0] + (parts[1] + parts[2]), whole, rtol=1e-12)
    empty = Moments(0, torch.zeros(5, dtype=torch.float64), torch.zeros(5, 5, dtype=torch.float64))
    assert (empty + whole.a).count == whole.a.count


def test_statistics_of_a_dataset_are_the_sum_over_its_halves() -> None:
    a_model, models, x = make_tiny(1), [make_tiny(2), make_tiny(3)], calibration(32)
    whole = collect_statistics(a_model, models, x, batch_size=8)
    first = collect_statistics(a_model, models, x[:16], batch_size=8)
    second = collect_statistics(a_model, models, x[16:], batch_size=8)
    for k in range(2):
        for point in whole[k]:
            _assert_equal_stats(whole[k][point], first[k][point] + second[k][point], rtol=1e-6)


def test_several_taps_of_a_point_sum_their_statistics() -> None:
    a_model, b_model, x = make_tiny(1), make_tiny(2), calibration(8)
    assert C1 == TinyNet().conv2.out_channels  # both taps lie in one 4-feature space
    spec = AlignmentSpec(points=(AlignmentPoint("both", C1, ("relu1", "relu2"), ()),
                                 AlignmentPoint("one", C1, ("relu1",), ()),
                                 AlignmentPoint("two", C1, ("relu2",), ())))
    stats = collect_statistics(a_model, [b_model], x, spec)[0]
    _assert_equal_stats(stats["both"], stats["one"] + stats["two"], rtol=1e-6)


def test_a_client_skips_the_reference_moments_and_keeps_the_rest() -> None:
    a_model, b_model, x = make_tiny(1), make_tiny(2), calibration(20)
    full = collect_statistics(a_model, [b_model], x)[0]
    client = collect_statistics(a_model, [b_model], x, reference_moments=False)[0]
    for point, pair in client.items():
        assert pair.a.comoment is None
        _assert_equal_stats(PairStatistics(full[point].a, pair.b, pair.cross), full[point], rtol=1e-12)
        with pytest.raises(StatisticsError, match="own second moment"):
            pair.covariances()


def test_the_reference_object_itself_gets_its_own_features() -> None:
    a_model, x = make_tiny(1), calibration(8)
    same, twin = collect_statistics(a_model, [a_model, copy.deepcopy(a_model)], x)
    for point, stats in same.items():
        torch.testing.assert_close(stats.cross, stats.a.comoment)
        _assert_equal_stats(stats, twin[point])
    moments = collect_moments(a_model, x)  # the server's one pass over the global model
    for point, stats in same.items():
        torch.testing.assert_close(moments[point].comoment, stats.a.comoment)
        torch.testing.assert_close(moments[point].mean, stats.a.mean)


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


class _Twice(torch.nn.Module):
    """A layer run twice in one forward, then a layer after it (which an early stop skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.after = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.shared(torch.relu(self.shared(x))))


def test_feature_moments_equal_the_covariance_diagonal_and_stop_after_the_point() -> None:
    model, x = make_tiny(seed=3), calibration(100, seed=5)
    spec = model.alignment_spec()
    moments = collect_moments(model, x, spec, batch_size=32)
    for point in spec.points:
        mean, variance = feature_moments(model, x, point, batch_size=32)
        torch.testing.assert_close(mean, moments[point.name].mean.double(), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(variance, moments[point.name].covariance().diagonal(), rtol=1e-5, atol=1e-7)
    twice, data = _Twice(), torch.randn(90, 4)
    point = AlignmentPoint("shared", 4, ("shared",), ())
    mean, variance = feature_moments(twice, data, point, batch_size=30)
    both = torch.cat([twice.shared(data), twice.shared(torch.relu(twice.shared(data)))]).detach().double()
    torch.testing.assert_close(mean, both.mean(0))
    torch.testing.assert_close(variance, both.var(0, unbiased=False))
    # both outputs of the shared layer counted; only the one-example count ran the layer after it
    calls: list[int] = []
    handle = twice.after.register_forward_hook(lambda *_: calls.append(1))
    feature_moments(twice, data, point, batch_size=30)
    handle.remove()
    assert len(calls) == 1
    with pytest.raises(StatisticsError, match="non-finite features at point 'shared'"):
        feature_moments(twice, torch.full((4, 4), float("nan")), point)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_statistics_and_preactivation_in_one_pass_equal_the_two_passes(batchnorm: bool) -> None:
    from fedcca.merging.repair import preactivation_statistics, statistics_and_preactivation  # noqa: PLC0415

    reference, model, x = make_tiny(1, batchnorm), make_tiny(2, batchnorm), calibration(40, seed=5)
    spec = reference.alignment_spec()
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    stats, pre = statistics_and_preactivation(reference, model, x, spec, reference_moments=False, device="cpu")
    hook.remove()
    assert len(forwards) == 1  # the model ran once for both (one batch)
    want_stats = collect_statistics(reference, [model], x, spec, reference_moments=False, device="cpu")[0]
    want_pre = preactivation_statistics([model], x, spec, recompute_bn=False, device="cpu")[0]
    assert set(pre) == set(want_pre) and pre
    for name, (mean, cov) in want_pre.items():
        torch.testing.assert_close(pre[name][0], mean)
        torch.testing.assert_close(pre[name][1], cov)
    for name, pair in want_stats.items():
        torch.testing.assert_close(stats[name].cross, pair.cross)


def test_a_reference_cache_runs_the_reference_once_and_changes_nothing() -> None:
    reference, first, second = make_tiny(1), make_tiny(2), make_tiny(3)
    x = calibration(40, seed=5)
    runs: list[int] = []
    reference.register_forward_hook(lambda module, inputs, output: runs.append(1))
    cache: list = []
    cached = [collect_statistics(reference, [model], x, batch_size=16, reference_cache=cache, device="cpu")[0]
              for model in (first, second)]
    assert len(runs) == 3 and len(cache) == 3  # 40 examples in batches of 16: three reference passes in all
    plain = collect_statistics(reference, [first, second], x, batch_size=16, device="cpu")
    for got, expected in zip(cached, plain):
        for point, stats in expected.items():
            torch.testing.assert_close(got[point].cross, stats.cross, rtol=0, atol=0, msg=point)
            torch.testing.assert_close(got[point].a.comoment, stats.a.comoment, rtol=0, atol=0, msg=point)
            torch.testing.assert_close(got[point].b.mean, stats.b.mean, rtol=0, atol=0, msg=point)
