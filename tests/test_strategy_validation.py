"""CCAMerge drops bad replies (one log line naming node and reason) and keeps going."""

from __future__ import annotations

import copy
import functools
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedcca.flower.aggregation as aggregation_module
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import STATISTICS_KEY, train_reply
from fedcca.flower.recording import RecordRounds
from fedcca.flower.screen import ScreenReplies, UpdateScreen
from fedcca.flower.screen import _update_norm as update_norm
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.config import MergeConfig
from fedcca.merging.merger import MergeResult
from tests.tiny_clients import (
    CALIBRATION,
    MUTATIONS,
    ROUND_MUTATIONS,
    claiming_app,
    fedavg_app,
    make_model,
    stats_app,
    train_messages,
)

GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
GOOD_NODES = (1, 2, 3)
BAD_NODE = 4


def _strategy(**kwargs: object) -> CCAMerge:
    kwargs.setdefault("reference", "global")  # round 1 of "auto" asks for no client statistics
    return CCAMerge(make_model, CALIBRATION, device="cpu", **kwargs)  # type: ignore[arg-type]


def _mutating_app(mutate):  # noqa: ANN001, ANN202 - ClientApp-like callables
    def app(message: Message, context: Context) -> Message:
        reply = stats_app(message, context)
        content = reply.content
        mutate(content)
        return Message(content, reply_to=message)

    return app


def _run_round(strategy: CCAMerge, grid: InProcessGrid, replies_filter=None):  # noqa: ANN001, ANN202
    messages = strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    if replies_filter is not None:
        replies = replies_filter(replies)
    return replies, strategy.aggregate_train(1, replies)


def _merge_of_good_nodes(replies: list[Message], **kwargs: object) -> dict[str, torch.Tensor]:
    """What the round gives from the good nodes' replies alone."""
    good = [r for r in replies if r.metadata.src_node_id in GOOD_NODES]
    reference = _strategy(**kwargs)
    reference.configure_train(1, GLOBAL, ConfigRecord(), InProcessGrid({n: stats_app for n in GOOD_NODES}))
    arrays, _ = reference.aggregate_train(1, good)
    assert arrays is not None
    return dict(arrays.to_torch_state_dict())


def _assert_dropped(strategy: CCAMerge, caplog: pytest.LogCaptureFixture, node: int, words: str,
                    result: tuple, replies: list[Message], **kwargs: object) -> None:
    """``node`` alone was dropped, with ``words`` in its log line; the others were merged."""
    entry = strategy.rounds[-1]
    assert list(entry.dropped) == [node] and words in entry.dropped[node]
    lines = [r.getMessage() for r in caplog.records if f"node {node}:" in r.getMessage()]
    assert len(lines) == 1 and words in lines[0]
    arrays, metrics = result
    assert arrays is not None and metrics is not None and not entry.skipped
    expected = _merge_of_good_nodes(replies, **kwargs)
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def _grid_with_bad_node(bad_app, **kwargs) -> InProcessGrid:  # noqa: ANN001
    return InProcessGrid({**{n: stats_app for n in GOOD_NODES}, BAD_NODE: bad_app}, **kwargs)


@pytest.mark.parametrize("name", sorted({**MUTATIONS, **ROUND_MUTATIONS}))
def test_malformed_reply_is_dropped_and_the_round_goes_on(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    mutate, words = {**MUTATIONS, **ROUND_MUTATIONS}[name]
    strategy = _strategy()
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, _grid_with_bad_node(_mutating_app(mutate)))
    _assert_dropped(strategy, caplog, BAD_NODE, words, result, replies)


def _crashing_app(message: Message, context: Context) -> Message:
    raise RuntimeError("disk full")


def test_error_reply_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy()
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, _grid_with_bad_node(_crashing_app))
    _assert_dropped(strategy, caplog, BAD_NODE, "disk full", result, replies)
    assert strategy.rounds[-1].bytes_received[BAD_NODE] == 0


def test_dropout_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy()
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, _grid_with_bad_node(stats_app, silent=[BAD_NODE]))
    _assert_dropped(strategy, caplog, BAD_NODE, "no reply", result, replies)


def test_duplicate_reply_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy()
    grid = InProcessGrid({n: stats_app for n in GOOD_NODES})
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, grid, lambda rs: rs + rs[:1])
    twice = replies[0].metadata.src_node_id
    assert strategy.rounds[-1].dropped == {twice: "duplicate reply from the same node"}
    assert result[0] is not None and strategy.rounds[-1].num_valid == 3


def _scaled_app(factor: float):  # noqa: ANN202
    def scale(content: RecordDict) -> None:
        state = content["arrays"].to_torch_state_dict()
        content["arrays"] = ArrayRecord({k: v * factor if v.is_floating_point() else v
                                         for k, v in state.items()})
        content.pop(STATISTICS_KEY, None)

    return _mutating_app(scale)


@pytest.mark.parametrize(("factor", "nodes", "words"), [
    (1e6, (1, BAD_NODE), "the global model's norm"),  # two replies: only the global-centred bound can hold
    (1e6, (*GOOD_NODES, BAD_NODE), "the global model's norm"),
    (50.0, (*GOOD_NODES, BAD_NODE), "the median update norm"),
])
def test_screen_drops_an_outlying_update_for_ccamerge(factor: float, nodes: tuple, words: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    bound = 10.0 if factor > 1e3 else 1e3  # the x50 reply breaks the median bound alone
    strategy = ScreenReplies(_strategy(min_train_nodes=1), max_update_norm=bound, max_ratio=3.0)
    grid = InProcessGrid({n: (_scaled_app(factor) if n == BAD_NODE else stats_app) for n in nodes})
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, grid)
    entry = strategy.rounds[-1]
    assert list(entry.dropped) == [BAD_NODE] and "screen bound" in entry.dropped[BAD_NODE]
    assert words in entry.dropped[BAD_NODE] and result[0] is not None and not entry.skipped
    if len(nodes) == 4:
        expected = _merge_of_good_nodes(replies)
        for key, value in result[0].to_torch_state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=key)
    unscreened = _strategy(screen=None)  # without the screen the same reply is merged
    _run_round(unscreened, grid)
    assert unscreened.rounds[-1].dropped == {}


def test_screen_wraps_fedavg_too() -> None:
    """FedAvg gets the dropped reply as a failure: its average is the honest replies' average."""
    grid = _grid_with_bad_node(_scaled_app(1e6))
    screened = ScreenReplies(FedAvg(min_available_nodes=4, fraction_evaluate=0.0))
    messages = screened.configure_train(1, GLOBAL, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    arrays, _ = screened.aggregate_train(1, replies)
    honest, _ = FedAvg().aggregate_train(1, [r for r in replies if r.metadata.src_node_id != BAD_NODE])
    for key, value in honest.to_torch_state_dict().items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)
    assert list(screened.screened_out(1)) == [BAD_NODE] and "screen bound" in screened.screened_out(1)[BAD_NODE]
    recorded = RecordRounds(ScreenReplies(FedAvg(min_available_nodes=4, fraction_evaluate=0.0)))
    recorded.aggregate_train(1, list(grid.send_and_receive(recorded.configure_train(1, GLOBAL, ConfigRecord(), grid))))
    assert recorded.rounds[-1].num_valid == 3 and list(recorded.rounds[-1].dropped) == [BAD_NODE]


def test_screen_keeps_honest_replies_and_needs_the_global_model() -> None:
    strategy = ScreenReplies(_strategy())
    _run_round(strategy, InProcessGrid({n: stats_app for n in GOOD_NODES}))
    assert strategy.rounds[-1].dropped == {}
    with pytest.raises(RuntimeError, match="without its configure_train"):
        ScreenReplies(FedAvg()).aggregate_train(1, [])
    with pytest.raises(ValueError, match="max_ratio must be positive"):
        ScreenReplies(FedAvg(), max_ratio=0.0)


@pytest.mark.parametrize("reference", ["global", "largest"])
def test_model_with_non_finite_features_is_dropped(reference: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Finite weights can still overflow on the calibration data; the node with the
    most examples (4) is then also the would-be reference."""
    def overflow(content: RecordDict) -> None:
        state = content["arrays"].to_torch_state_dict()
        state["conv2.weight"] = torch.full_like(state["conv2.weight"], 3e38)
        content["arrays"] = ArrayRecord(state)
        content.pop(STATISTICS_KEY, None)

    strategy = _strategy(reference=reference, screen=None)  # the screen alone would drop it first
    with caplog.at_level(logging.WARNING):
        replies, result = _run_round(strategy, _grid_with_bad_node(_mutating_app(overflow)))
    _assert_dropped(strategy, caplog, BAD_NODE, "statistics failed", result, replies,
                    reference=reference)
    if reference == "largest":
        assert strategy.rounds[-1].reference == 3


def test_below_minimum_skips_the_round(caplog: pytest.LogCaptureFixture) -> None:
    strategy = _strategy(min_train_nodes=3)
    grid = InProcessGrid({1: stats_app, 2: _crashing_app, 3: _mutating_app(MUTATIONS["NaN weight"][0])})
    with caplog.at_level(logging.WARNING):
        _, result = _run_round(strategy, grid)
    assert result == (None, None)
    entry = strategy.rounds[-1]
    assert entry.skipped and "1 valid replies, min_train_nodes is 3" in entry.skip_reason
    assert set(entry.dropped) == {2, 3}
    assert any("round 1 skipped" in r.getMessage() for r in caplog.records)


def _nan_merge(self):  # noqa: ANN001, ANN202 - stands in for Merger.finish
    merged = make_model()
    with torch.no_grad():
        merged.fc2.weight.fill_(float("nan"))
    return MergeResult(merged, self.candidates[0].config)


def _failing_merge(self):  # noqa: ANN001, ANN202 - stands in for Merger.finish
    raise np.linalg.LinAlgError("SVD did not converge")


@pytest.mark.parametrize(("fake_finish", "words"), [(_nan_merge, "non-finite values in ['fc2.weight']"),
                                                    (_failing_merge, "SVD did not converge")])
def test_a_bad_merge_skips_the_round(fake_finish, words: str,  # noqa: ANN001
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregation_module.Merger, "finish", fake_finish)
    strategy = _strategy()
    _, result = _run_round(strategy, InProcessGrid({n: stats_app for n in GOOD_NODES}))
    assert result == (None, None)
    assert strategy.rounds[-1].skipped and words in strategy.rounds[-1].skip_reason


@pytest.mark.parametrize("options", [{"method": "fedavg"}, {"reference": "biggest"}, {"stats": "both"},
                                     {"max_weight_ratio": 0.5}])
def test_bad_configuration_raises(options: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        _strategy(**options)


def test_calibration_that_does_not_fit_the_model_raises() -> None:
    with pytest.raises(ValueError, match="calibration"):
        CCAMerge(make_model, torch.randn(8, 5))


def test_aggregate_without_configure_train_raises_for_global_reference() -> None:
    grid = InProcessGrid({n: fedavg_app for n in GOOD_NODES})
    replies = list(grid.send_and_receive(_strategy().configure_train(1, GLOBAL, ConfigRecord(), grid)))
    with pytest.raises(RuntimeError, match="configure_train"):
        _strategy().aggregate_train(1, replies)
    assert _strategy(reference="first").aggregate_train(1, replies)[0] is not None


def test_bad_evaluate_reply_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    grid = InProcessGrid({n: stats_app for n in GOOD_NODES})
    messages = list(_strategy().configure_evaluate(1, GLOBAL, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    replies[0].content["metrics"]["num-examples"] = -1
    with caplog.at_level(logging.WARNING):
        metrics = _strategy().aggregate_evaluate(1, replies)
    losses = [r.content["metrics"]["eval-loss"] for r in replies[1:]]
    sizes = [r.content["metrics"]["num-examples"] for r in replies[1:]]
    assert metrics is not None
    assert metrics["eval-loss"] == pytest.approx(np.average(losses, weights=sizes))
    assert any(f"node {replies[0].metadata.src_node_id}:" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- property-based

_FLOAT_KEYS = [k for k, v in make_model().state_dict().items() if v.is_floating_point()]
_TEMPLATE_SHAPES = {k: tuple(v.shape) for k, v in make_model().state_dict().items()}
_RECORD_EDITS = ["drop arrays", "drop metrics", "drop statistics", "extra array", "extra metrics"]
# Edits of the statistics: declared sizes and dtypes, and forgeries only the server's checks catch.
_STATISTICS_EDITS = {name: mutate for name, (mutate, _) in {**MUTATIONS, **ROUND_MUTATIONS}.items()
                     if name.startswith("statistics ") or name in ROUND_MUTATIONS}


@st.composite
def _damage(draw: st.DrawFn) -> dict:
    """A random set of edits to one reply."""
    return {
        "records": draw(st.sets(st.sampled_from(_RECORD_EDITS), max_size=2)),
        # a wrong shape only: zeros of the right shape are a value edit, which the statistics spot check
        # judges by correlation (tested on its own), not a malformed reply
        "reshape": draw(st.none() | st.sampled_from(_FLOAT_KEYS).flatmap(lambda key: st.tuples(
            st.just(key), st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(
                lambda shape: tuple(shape) != tuple(_TEMPLATE_SHAPES[key]))))),
        "poison": draw(st.none() | st.tuples(st.sampled_from(_FLOAT_KEYS),
                                             st.sampled_from([math.nan, math.inf, -math.inf]))),
        "num_examples": draw(st.none() | st.integers(-3, 100) | st.floats(allow_nan=True)
                             | st.lists(st.integers(1, 5), min_size=1, max_size=2)),
        "statistics": draw(st.none() | st.sampled_from(sorted(_STATISTICS_EDITS))),
    }


def _apply(content: RecordDict, damage: dict) -> None:
    records = damage["records"]
    for name, key in (("drop arrays", "arrays"), ("drop metrics", "metrics"),
                      ("drop statistics", STATISTICS_KEY)):
        if name in records:
            del content[key]
    if "extra array" in records:
        content["extra"] = ArrayRecord()
    if "extra metrics" in records:
        content["extra-metrics"] = MetricRecord({"num-examples": 1})
    if "arrays" in content:
        state = dict(content["arrays"].to_torch_state_dict())
        if damage["reshape"] is not None:
            key, shape = damage["reshape"]
            state[key] = torch.zeros(shape)
        if damage["poison"] is not None:
            key, value = damage["poison"]
            poisoned = state[key].clone()
            poisoned.view(-1)[0] = value
            state[key] = poisoned
        content["arrays"] = ArrayRecord(state)
    if "metrics" in content and damage["num_examples"] is not None:
        content["metrics"]["num-examples"] = damage["num_examples"]
    if STATISTICS_KEY in content and damage["statistics"] is not None:
        _STATISTICS_EDITS[damage["statistics"]](content)


def _is_valid(damage: dict) -> bool:
    """The oracle: which damaged replies must survive (removing statistics is harmless)."""
    records, n = damage["records"], damage["num_examples"]
    # Dropping "metrics" and adding "extra-metrics" leaves one valid MetricRecord.
    swapped = records == {"drop metrics", "extra metrics"}
    good_weight = swapped or n is None or (isinstance(n, (int, float)) and math.isfinite(n) and n > 0)
    template = make_model().state_dict()
    reshaped = damage["reshape"] is not None and tuple(damage["reshape"][1]) != tuple(
        template[damage["reshape"][0]].shape)
    forged = damage["statistics"] is not None and "drop statistics" not in records
    return (good_weight and not reshaped and damage["poison"] is None and not forged
            and (swapped or not records - {"drop statistics"}))


@functools.cache
def _clean_round() -> tuple[dict[int, Message], dict[int, Message]]:
    """Train instructions and clean replies of nodes 1-4, computed once (copied per example)."""
    grid = InProcessGrid({n: stats_app for n in range(1, 5)})
    instructions = {m.metadata.dst_node_id: m
                    for m in _strategy().configure_train(1, GLOBAL, ConfigRecord(), grid)}
    return instructions, {r.metadata.src_node_id: r for r in grid.send_and_receive(instructions.values())}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damages=st.lists(_damage(), min_size=4, max_size=4))
def test_random_malformed_replies_give_none_or_the_merge_of_the_valid_ones(damages: list[dict]) -> None:
    instructions, clean = _clean_round()
    damaged, survivors = [], []
    for node, damage in zip(sorted(clean), damages, strict=True):
        content = copy.deepcopy(clean[node].content)
        _apply(content, damage)
        damaged.append(Message(content, reply_to=instructions[node]))
        if _is_valid(damage):
            survivors.append(damaged[-1])
    strategy, oracle = _strategy(), _strategy()
    grid = InProcessGrid({n: stats_app for n in clean})
    for each in (strategy, oracle):
        each.configure_train(1, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, damaged)
    entry = strategy.rounds[-1]
    assert set(entry.dropped) == set(clean) - {m.metadata.src_node_id for m in survivors}
    if len(survivors) < strategy.min_train_nodes:
        assert arrays is None and entry.skipped
        return
    assert arrays is not None
    merged = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v.double()).all() for v in merged.values())
    expected, _ = oracle.aggregate_train(1, survivors)
    assert expected is not None
    for key, value in expected.to_torch_state_dict().items():
        torch.testing.assert_close(merged[key], value, msg=key)


@pytest.mark.parametrize("claim", [1e12, 1e308])
def test_one_client_claiming_huge_example_counts_gets_a_capped_weight(claim: float) -> None:
    """FedAvg would hand the attacker the whole average (1e12) or overflow and skip the round (1e308)."""
    strategy = _strategy(config="direct", recompute_bn=False)
    grid = InProcessGrid({**{n: stats_app for n in GOOD_NODES}, BAD_NODE: claiming_app(claim)})
    replies, (arrays, _) = _run_round(strategy, grid)
    assert arrays is not None and not strategy.rounds[-1].skipped
    claims = {r.metadata.src_node_id: float(r.content["metrics"]["num-examples"]) for r in sorted(
        replies, key=lambda r: r.metadata.src_node_id)}
    ratio = strategy.settings.max_weight_ratio
    assert ratio == 2.0  # the default: no reply weighs more than two median clients
    # streamed (reference "global"): each weight is capped at the median claim so far, the first three
    # waiting for each other
    order = list(claims.values())
    caps = {n: ratio * float(np.median(order[:max(3, i + 1)])) for i, n in enumerate(claims)}
    weights = {n: min(c, caps[n]) for n, c in claims.items()}
    assert strategy.rounds[-1].capped == {n: c for n, c in claims.items() if c > caps[n]}
    total = sum(weights.values())
    assert weights[BAD_NODE] == caps[BAD_NODE] < claim
    states = {r.metadata.src_node_id: r.content["arrays"].to_torch_state_dict() for r in replies}
    for key, value in arrays.to_torch_state_dict().items():
        if value.is_floating_point():
            expected = sum(w * states[n][key].double() for n, w in weights.items()) / total
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("average", ["median", "trimmed"])
def test_a_robust_average_keeps_one_scaled_reply_from_owning_the_model(average: str) -> None:
    """Without the screen, the x1e6 reply owns the mean; the median / trimmed mean stay near the honest merge."""
    grid = _grid_with_bad_node(_scaled_app(1e6))
    largest = {}
    for name in ("mean", average):
        strategy = _strategy(average=name, max_norm_growth=None, screen=None)
        _, (arrays, _) = _run_round(strategy, grid)
        largest[name] = max(float(v.abs().max()) for v in arrays.to_torch_state_dict().values() if v.is_floating_point())
    _, (good, _) = _run_round(_strategy(), InProcessGrid({n: stats_app for n in GOOD_NODES}))
    reference = max(float(v.abs().max()) for v in good.to_torch_state_dict().values() if v.is_floating_point())
    assert largest["mean"] > 1e4 * reference  # the attacker owns the plain average
    assert largest[average] < 3 * reference, (largest, reference)


def test_robust_averages_are_the_coordinate_wise_median_and_trimmed_mean() -> None:
    from fedcca.merging.averages import RobustAverage  # pylint: disable=import-outside-toplevel

    states = [{"w": torch.tensor([float(i), -float(i)]), "n": torch.tensor(i)} for i in (1, 2, 3, 4, 100)]
    like = {"w": torch.zeros(2), "n": torch.tensor(7)}
    median, trimmed = RobustAverage("median"), RobustAverage("trimmed")
    for state in states:
        median.add(state, 1.0)
        trimmed.add(state, 5.0)
    assert torch.equal(median.average(like)["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(trimmed.average(like)["w"], torch.tensor([3.0, -3.0]))  # 1 and 100 cut: mean of 2, 3, 4
    assert int(median.average(like)["n"]) == 7  # integer buffers from ``like``
    with pytest.raises(ValueError, match="average must be one of"):
        _strategy(average="mode")


def test_statistics_that_keep_every_norm_but_scramble_features_are_caught() -> None:
    """Honest weights, cross moments negated: every norm and the Cauchy-Schwarz bounds are kept, so neither the
    aligned-norm bound nor the statistics checks see it; without a hold-out set it took CCAMerge from 65% to 25%
    (K = 5). The server's spot check on a random subset of the calibration data drops it; honest replies pass."""
    from tests.tiny_clients import _scale_statistics

    strategy = _strategy(config=MergeConfig("cca", zero_dead=False), min_train_nodes=3, screen=None)
    _, (arrays, _) = _run_round(strategy, _grid_with_bad_node(_mutating_app(_scale_statistics({"/cross": -1.0}))))
    record = strategy.rounds[-1]
    assert arrays is not None and list(record.dropped) == [BAD_NODE], record.dropped
    assert "do not describe this model" in record.dropped[BAD_NODE] and record.client_statistics == len(GOOD_NODES)


def test_building_without_a_hold_out_set_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        CCAMerge(make_model, CALIBRATION, device="cpu")
    assert any("without a hold-out set" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CCAMerge(make_model, CALIBRATION, holdout=(CALIBRATION[:8], torch.zeros(8, dtype=torch.long)), device="cpu")
    assert not any("without a hold-out set" in r.getMessage() for r in caplog.records)


def test_the_screen_and_the_merge_decode_each_reply_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """CCAMerge's own screen hands the weights it decoded to the merge: one decode per reply, same model."""
    import fedcca.flower.protocol as protocol_module
    grid = _grid_with_bad_node(_scaled_app(1e6))
    expected = _run_round(_strategy(), grid)[1][0]
    calls: list[int] = []
    decode = protocol_module._decode_weights

    def counting(record, template, **options):  # noqa: ANN001, ANN202
        calls.append(1)
        return decode(record, template, **options)

    monkeypatch.setattr(protocol_module, "_decode_weights", counting)
    strategy = _strategy()
    _, (arrays, _) = _run_round(strategy, grid)
    assert len(calls) == len(GOOD_NODES) + 1 and list(strategy.rounds[-1].dropped) == [BAD_NODE]
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected.to_torch_state_dict()[key], rtol=0, atol=0, msg=key)


def test_only_the_screen_keeps_decoded_weights() -> None:
    """A merge without a screen keeps nothing per reply (streaming holds one reply at a time)."""
    from fedcca.flower.protocol import DecodedWeights, validate_reply
    grid = InProcessGrid({n: stats_app for n in GOOD_NODES})
    strategy = _strategy()
    replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    template = make_model().state_dict()
    decoded = DecodedWeights()
    validate_reply(replies[0], template, None, decoded=decoded)
    assert decoded.take(replies[0]) is None
    kept = {"w": torch.zeros(1)}
    decoded.put(replies[1], kept)
    assert decoded.take(replies[0]) is None and decoded.take(replies[1]) is kept and decoded.take(replies[1]) is None


def test_screen_measures_updates_in_the_model_dtype_and_exactly_when_that_overflows() -> None:
    """The update norm is taken in the model's own dtype (no float64 copy of every reply); where that
    overflows (half precision, 60,000 away in each of 4 entries) it is measured again in float64, exactly."""
    for dtype, step in ((torch.float32, 0.5), (torch.float16, 60000.0)):
        template = {"w": torch.zeros(4, dtype=dtype), "steps": torch.zeros((), dtype=torch.int64)}
        sent = train_messages(ArrayRecord(template), [5])[0]
        weights = {"w": torch.full((4,), step, dtype=dtype), "steps": torch.ones((), dtype=torch.int64)}
        reply = Message(train_reply(weights, 10), reply_to=sent)
        assert math.isinf(float(torch.dist(weights["w"], template["w"]))) == (dtype == torch.float16)
        measured = update_norm(reply, template, {"w": template["w"]}, "arrays", "num-examples")
        assert measured == pytest.approx(2 * step, rel=1e-6)  # |(s, s, s, s)| = 2 s
        (passed,) = UpdateScreen(max_update_norm=None, max_ratio=None).screen([reply], template)
        assert not passed.has_error()
