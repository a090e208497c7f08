"""The reply screen and the recorder around Flower's own strategies and wrappers: hostile replies never stop a
round, and every composition aggregates what a hand computation says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import STATISTICS_KEY
from fedcca.flower.recording import RecordRounds
from fedcca.flower.screen import ScreenReplies
from tests.test_strategy_validation import BAD_NODE, GLOBAL, GOOD_NODES, _mutating_app, _scaled_app, _strategy
from tests.tiny_clients import _bomb, fedavg_app, make_model, stats_app


def _weights(mutate) -> object:  # noqa: ANN001
    """A fedavg-style client whose weights record is changed by ``mutate(record)``."""
    def change(content: RecordDict) -> None:
        content.pop(STATISTICS_KEY, None)
        mutate(content["arrays"])
    return _mutating_app(change)


def _bomb_weight(record: ArrayRecord) -> None:
    """Honest metadata (dtype, shape) but a header claiming 10^12 elements."""
    bomb = _bomb()
    record["fc2.weight"] = Array(dtype=record["fc2.weight"].dtype, shape=record["fc2.weight"].shape,
                                 stype="numpy.ndarray", data=bomb.data)


HOSTILE = {
    "header bomb": (_bomb_weight, "cannot be measured"),
    "shape ()": (lambda r: r.__setitem__("fc2.bias", Array(np.array(1e6, dtype=np.float32))), "cannot be measured"),
    "shape (1,)": (lambda r: r.__setitem__("fc2.bias", Array(np.ones(1, dtype=np.float32))), "cannot be measured"),
    "missing key": (lambda r: r.__delitem__("fc2.bias"), "cannot be measured"),
    "extra key": (lambda r: r.__setitem__("extra", Array(np.ones(3, dtype=np.float32))), "cannot be measured"),
    "complex dtype": (lambda r: r.__setitem__("fc2.bias", Array(r["fc2.bias"].numpy().astype(np.complex64))),
                      "cannot be measured"),
}


def _round(strategy, bad_app, nodes=GOOD_NODES):  # noqa: ANN001, ANN202
    grid = InProcessGrid({**{n: stats_app for n in nodes}, BAD_NODE: bad_app})
    replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    return replies, strategy.aggregate_train(1, replies)


def _honest_fedavg(replies: list[Message]) -> dict[str, torch.Tensor]:
    arrays, _ = FedAvg().aggregate_train(1, [r for r in replies if r.metadata.src_node_id != BAD_NODE])
    return arrays.to_torch_state_dict()


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("inner", ["fedavg", "ccamerge"])
def test_the_screen_drops_what_it_cannot_measure(name: str, inner: str) -> None:
    """Nothing passes the screen unmeasured; the round goes on with the honest replies (FedAvg crashed or was
    poisoned by these on main; CCAMerge behind the screen skipped the round on the header bomb)."""
    mutate, words = HOSTILE[name]
    strategy = ScreenReplies(FedAvg(min_available_nodes=4) if inner == "fedavg" else _strategy(min_train_nodes=2))
    replies, (arrays, _) = _round(strategy, _weights(mutate))
    assert arrays is not None
    assert list(strategy.screened_out(1)) == [BAD_NODE] and words in strategy.screened_out(1)[BAD_NODE]
    if inner == "fedavg":
        for key, value in _honest_fedavg(replies).items():
            torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)
    else:
        record = strategy.rounds[-1]
        assert not record.skipped and record.num_valid == 3 and words in record.dropped[BAD_NODE]


def test_a_zero_global_model_does_not_drop_every_honest_update() -> None:
    zero = ArrayRecord({k: torch.zeros_like(v) if v.is_floating_point() else v
                        for k, v in make_model(seed=1).state_dict().items()})
    strategy = ScreenReplies(FedAvg(min_available_nodes=3))
    grid = InProcessGrid({n: fedavg_app for n in GOOD_NODES})
    replies = list(grid.send_and_receive(strategy.configure_train(1, zero, ConfigRecord(), grid)))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.screened_out(1) == {}


def test_the_screen_around_flowers_dp_wrapper_keeps_the_round() -> None:
    """Flower's DP wrappers skip a round that contains any error reply: the screen takes its drops out."""
    strategy = ScreenReplies(DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_available_nodes=4), noise_multiplier=0.0, clipping_norm=1e6, num_sampled_clients=3))
    replies, (arrays, _) = _round(strategy, _scaled_app(1e3))
    assert arrays is not None and list(strategy.screened_out(1)) == [BAD_NODE]
    for key, value in _honest_fedavg(replies).items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)


def test_the_recorder_around_dp_adaptive_clipping() -> None:
    """The adaptive-clipping wrapper reads the replies twice (ZeroDivisionError on a stream on main)."""
    strategy = RecordRounds(DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(min_available_nodes=3), noise_multiplier=0.0, num_sampled_clients=3, initial_clipping_norm=1e6))
    grid = InProcessGrid({n: fedavg_app for n in GOOD_NODES})
    replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    arrays, _ = strategy.aggregate_train(1, iter(replies))
    assert arrays is not None and strategy.rounds[-1].num_valid == 3
    expected, _ = FedAvg().aggregate_train(1, replies)
    for key, value in expected.to_torch_state_dict().items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)


def test_the_recorder_reports_what_ccamerge_inside_a_dp_wrapper_dropped() -> None:
    """RecordRounds(DP(CCAMerge)) with a NaN reply: the record is CCAMerge's own (main recorded 4 valid, 0 dropped)."""
    def nan(record: ArrayRecord) -> None:
        state = record.to_torch_state_dict()
        state["fc2.weight"][0, 0] = float("nan")
        for key, value in state.items():
            record[key] = Array(value.numpy())

    inner = _strategy(min_train_nodes=2, stats="server")
    strategy = RecordRounds(DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=0.0, clipping_norm=1e6, num_sampled_clients=4))
    _round(strategy, _weights(nan))
    record = strategy.rounds[-1]
    assert record.num_valid == 3 and list(record.dropped) == [BAD_NODE] and "non-finite" in record.dropped[BAD_NODE]


def test_the_one_line_ccamerge_screens_by_default() -> None:
    """CCAMerge(model_fn, calibration) as the README builds it drops a x1e3 update by itself (main merged it)."""
    from fedcca.flower.strategy import CCAMerge
    from tests.tiny_clients import CALIBRATION

    strategy = CCAMerge(make_model, CALIBRATION, min_available_nodes=4, device="cpu")
    grid = InProcessGrid({**{n: stats_app for n in GOOD_NODES}, BAD_NODE: _scaled_app(1e3)})
    for server_round in (1, 2):
        replies = list(grid.send_and_receive(strategy.configure_train(server_round, GLOBAL, ConfigRecord(), grid)))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        record = strategy.rounds[-1]
        assert arrays is not None and record.num_valid == 3, record.dropped
        assert "screen bound max_update_norm=10" in record.dropped[BAD_NODE]


def test_claimed_examples_do_not_choose_the_round_1_reference() -> None:
    """reference="auto" in round 1: a client claiming 10^12 examples with a worse model (here: random weights of
    its honest norm) was the reference on main. Its claim now only breaks ties between models the hold-out set
    cannot tell apart; without a hold-out set the reference is the medoid of the weights."""
    from fedcca.flower.strategy import CCAMerge
    from tests.tiny_clients import CALIBRATION, HELD_OUT, claiming_app, teacher_labels

    def worse_and_claiming(message: Message, context: Context) -> Message:
        reply = claiming_app(1e12)(message, context)
        state = reply.content["arrays"].to_torch_state_dict()
        noise = make_model(seed=99).state_dict()
        reply.content["arrays"] = ArrayRecord({k: noise[k] for k in state})
        return reply

    for holdout in (None, (HELD_OUT, teacher_labels(HELD_OUT))):
        strategy = CCAMerge(make_model, CALIBRATION, "cca", holdout=holdout, min_available_nodes=4, device="cpu")
        grid = InProcessGrid({**{n: stats_app for n in GOOD_NODES}, BAD_NODE: worse_and_claiming})
        replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
        strategy.aggregate_train(1, replies)
        assert strategy.rounds[-1].reference != BAD_NODE and BAD_NODE in strategy.rounds[-1].capped


def test_among_equally_accurate_replies_the_largest_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims break ties on the hold-out set: when every reply is equally accurate there, the largest claim
    (capped) is the round-1 reference."""
    import fedcca.flower.aggregation as aggregation
    from fedcca.flower.strategy import CCAMerge
    from tests.tiny_clients import CALIBRATION, HELD_OUT, claiming_app, teacher_labels

    monkeypatch.setattr(aggregation, "score", lambda *args, **kwargs: (1.0, 0.5))  # every reply 50% accurate
    strategy = CCAMerge(make_model, CALIBRATION, "cca", holdout=(HELD_OUT, teacher_labels(HELD_OUT)),
                        min_available_nodes=4, device="cpu")
    grid = InProcessGrid({**{n: stats_app for n in GOOD_NODES}, BAD_NODE: claiming_app(60)})
    replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    assert strategy.rounds[-1].reference == BAD_NODE


def test_uncapped_weights_merge_as_fedavg_weights() -> None:
    """max_weight_ratio=inf is documented as FedAvg's uncapped weights; every round was skipped (weights / inf)."""
    import math

    from fedcca.flower.strategy import CCAMerge
    from fedcca.merging.config import MergeConfig
    from tests.tiny_clients import CALIBRATION

    strategy = CCAMerge(make_model, CALIBRATION, MergeConfig("cca", shrinkage=0.0, recompute_bn=False),
                        max_weight_ratio=math.inf, min_available_nodes=3, device="cpu")
    grid = InProcessGrid({n: stats_app for n in GOOD_NODES})
    replies = list(grid.send_and_receive(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)))
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    expected, _ = FedAvg().aggregate_train(2, replies)
    for key, value in expected.to_torch_state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_server_side_dp_clipping_around_ccamerge_with_server_statistics() -> None:
    """Flower's server-side DP clipping clips every ArrayRecord (client statistics break); with stats="server"
    replies carry weights only and the wrapper composes: the merge equals CCAMerge's on the clipped replies."""
    import copy

    from flwr.supercore.differential_privacy import compute_clip_model_update

    from fedcca.flower.strategy import CCAMerge
    from fedcca.merging.config import MergeConfig
    from tests.tiny_clients import CALIBRATION

    def build() -> CCAMerge:
        return CCAMerge(make_model, CALIBRATION, MergeConfig("cca", zero_dead=False), stats="server",
                        reference="global", min_available_nodes=3, device="cpu", screen=None)

    clip = 0.05
    strategy = DifferentialPrivacyServerSideFixedClipping(build(), noise_multiplier=0.0, clipping_norm=clip,
                                                          num_sampled_clients=3)
    grid = InProcessGrid({n: stats_app for n in GOOD_NODES})
    replies = list(grid.send_and_receive(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)))
    assert all(set(r.content.array_records) == {"arrays"} for r in replies)  # no statistics asked for
    clipped = []
    for reply in copy.deepcopy(replies):
        arrays = reply.content["arrays"]
        values = arrays.to_numpy_ndarrays()
        compute_clip_model_update(values, GLOBAL.to_numpy_ndarrays(), clip)
        reply.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(arrays.keys(), values)})
        clipped.append(reply)
    arrays, _ = strategy.aggregate_train(2, replies)
    plain = build()
    plain.configure_train(2, GLOBAL, ConfigRecord(), grid)
    expected, _ = plain.aggregate_train(2, clipped)
    for key, value in expected.to_torch_state_dict().items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)
