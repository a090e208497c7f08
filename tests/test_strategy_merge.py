"""CCAMerge through Flower's Message API: what a round produces, and start() end to end."""

from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import COMPUTE_STATS_FLAG, STATISTICS_KEY
from fedcca.flower.strategy import CCAMerge
from fedcca.methods.registry import ALIGNERS
from tests.tiny_clients import CALIBRATION, fedavg_app, make_model, stats_app

NODES = (1, 2, 3)


def _strategy(**kwargs: object) -> CCAMerge:
    kwargs.setdefault("reference", "global")  # round 1 of "auto" asks for no client statistics
    return CCAMerge(make_model, CALIBRATION, device="cpu", **kwargs)  # type: ignore[arg-type]


def _round(strategy: CCAMerge | FedAvg, grid: InProcessGrid, arrays: ArrayRecord,
           server_round: int = 1) -> tuple[list[Message], tuple[ArrayRecord | None, MetricRecord | None]]:
    """One training round by hand: configure, send, aggregate; returns (replies, result)."""
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    return replies, strategy.aggregate_train(server_round, replies)


def _state(arrays: ArrayRecord | None) -> dict[str, torch.Tensor]:
    assert arrays is not None
    return dict(arrays.to_torch_state_dict())


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  atol: float = 1e-5, skip: tuple[str, ...] = ()) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        if key not in skip:
            torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=1e-4, msg=key)


def _echo_app(state_dict: dict[str, torch.Tensor]):  # noqa: ANN202 - a ClientApp-like callable
    """A client that always replies with ``state_dict`` (FedAvg shape)."""

    def app(message: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 10 * message.metadata.dst_node_id})
        return Message(RecordDict({"arrays": ArrayRecord(state_dict), "metrics": metrics}),
                       reply_to=message)

    return app


GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
BN_BUFFERS = ("bn2.running_mean", "bn2.running_var", "bn2.num_batches_tracked")


ROUND_METHODS = [method for method in ALIGNERS if not ALIGNERS[method].joint]  # ZipIt! is offline only


def _outputs(state: dict[str, torch.Tensor]) -> torch.Tensor:
    model = make_model()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(CALIBRATION)


@pytest.mark.parametrize("method", ROUND_METHODS)
@pytest.mark.parametrize("reference", ["first", "largest"])
def test_identical_clients_merge_to_that_model(method: str, reference: str) -> None:
    client = make_model(seed=5).state_dict()
    grid = InProcessGrid({node: _echo_app(client) for node in NODES})
    _, (arrays, _) = _round(_strategy(method=method, reference=reference, fold_bn=False), grid, GLOBAL)
    merged = _state(arrays)
    _assert_close(merged, client, skip=BN_BUFFERS)
    # BatchNorm statistics were recomputed on the calibration data: exact mean of bn2's inputs.
    model = make_model(seed=5).eval()
    with torch.no_grad():
        bn_inputs = model.conv2(model.relu1(model.conv1(CALIBRATION)))
    torch.testing.assert_close(merged["bn2.running_mean"], bn_inputs.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    if method != "direct":  # the plain average is never folded
        # Folded (the default), BatchNorm is written into conv2 and re-fitted: the client's very function.
        _, (folded, _) = _round(_strategy(method=method, reference=reference), grid, GLOBAL)
        torch.testing.assert_close(_outputs(_state(folded)), _outputs(client), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ROUND_METHODS)
def test_clients_returning_the_global_model_keep_it(method: str) -> None:
    grid = InProcessGrid({node: _echo_app(_state(GLOBAL)) for node in NODES})
    _, (arrays, _) = _round(_strategy(method=method, recompute_bn=False, fold_bn=False), grid, GLOBAL)
    _assert_close(_state(arrays), _state(GLOBAL))
    _, (folded, _) = _round(_strategy(method=method, recompute_bn=False), grid, GLOBAL)
    torch.testing.assert_close(_outputs(_state(folded)), _outputs(_state(GLOBAL)), atol=1e-5, rtol=1e-4)


def test_direct_method_with_global_reference_is_fedavg() -> None:
    """Uncapped, weights are the replies' num-examples; metrics are FedAvg's weighted averages."""
    grid = InProcessGrid({node: fedavg_app for node in NODES})
    strategy = _strategy(method="direct", recompute_bn=False, max_weight_ratio=math.inf)
    replies, (arrays, metrics) = _round(strategy, grid, GLOBAL)
    fedavg_arrays, fedavg_metrics = FedAvg().aggregate_train(1, replies)
    # FedAvg turns the integer num_batches_tracked into a float average: not comparable.
    _assert_close(_state(arrays), _state(fedavg_arrays), atol=1e-6, skip=("bn2.num_batches_tracked",))
    assert metrics is not None and fedavg_metrics is not None
    assert metrics.keys() == fedavg_metrics.keys() == {"train_loss"}
    assert metrics["train_loss"] == pytest.approx(fedavg_metrics["train_loss"])


def test_fedavg_style_clients_get_server_side_statistics() -> None:
    grid = InProcessGrid({node: fedavg_app for node in NODES})
    strategy = _strategy()
    replies, (arrays, metrics) = _round(strategy, grid, GLOBAL)
    assert all(STATISTICS_KEY not in reply.content for reply in replies)
    merged = _state(arrays)
    assert all(torch.isfinite(value.double()).all() for value in merged.values())
    assert not torch.equal(merged["fc1.weight"], _state(GLOBAL)["fc1.weight"])
    entry = strategy.rounds[-1]
    assert entry.client_statistics == 0 and entry.stats_seconds > 0
    assert entry.num_valid == 3 and not entry.skipped
    assert metrics is not None and "train_loss" in metrics


def test_client_statistics_give_the_same_merge_as_server_statistics() -> None:
    grid = InProcessGrid({node: stats_app for node in NODES})
    client_side = _strategy(stats="client")
    replies, (from_clients, _) = _round(client_side, grid, GLOBAL)
    assert all(STATISTICS_KEY in reply.content for reply in replies)
    server_side = _strategy(stats="server")
    server_side.configure_train(1, GLOBAL, ConfigRecord(), grid)
    from_server, _ = server_side.aggregate_train(1, replies)
    _assert_close(_state(from_clients), _state(from_server))
    assert client_side.rounds[-1].client_statistics == 3
    # The server measured only the global model's own moments (once), not every client's features.
    assert 0.0 < client_side.rounds[-1].stats_seconds < server_side.rounds[-1].stats_seconds
    assert server_side.rounds[-1].client_statistics == 0


def test_replies_with_and_without_statistics_merge_in_one_round() -> None:
    grid = InProcessGrid({1: stats_app, 2: fedavg_app, 3: stats_app})
    mixed = _strategy()
    replies, (arrays, metrics) = _round(mixed, grid, GLOBAL)
    by_node = sorted(replies, key=lambda reply: reply.metadata.src_node_id)
    assert [STATISTICS_KEY in reply.content for reply in by_node] == [True, False, True]
    assert mixed.rounds[-1].client_statistics == 2
    server_side = _strategy(stats="server")
    server_side.configure_train(1, GLOBAL, ConfigRecord(), grid)
    _assert_close(_state(arrays), _state(server_side.aggregate_train(1, replies)[0]))
    # Each metric is averaged over the replies that report it (different ClientApps).
    losses = {r.metadata.src_node_id: r.content["metrics"] for r in replies}
    expected = (30 * losses[1]["train-loss"] + 50 * losses[3]["train-loss"]) / 80  # shard sizes
    assert metrics is not None and metrics["train-loss"] == pytest.approx(expected)
    assert metrics["train_loss"] == pytest.approx(losses[2]["train_loss"])


@pytest.mark.parametrize(
    ("options", "flag"),
    [({}, True), ({"stats": "server"}, False), ({"reference": "largest"}, False),
     ({"method": "weight-matching"}, False), ({"method": "permute"}, True)],
)
def test_configure_train_asks_for_statistics_only_when_usable(options: dict, flag: bool) -> None:
    config = ConfigRecord({"lr": 0.1})
    grid = InProcessGrid({node: fedavg_app for node in NODES})
    messages = list(_strategy(**options).configure_train(1, GLOBAL, config, grid))
    assert messages[0].content["config"][COMPUTE_STATS_FLAG] is flag
    assert messages[0].content["config"]["lr"] == 0.1
    assert COMPUTE_STATS_FLAG not in config  # the caller's record is reused every round


def test_start_runs_two_rounds_of_three_clients() -> None:
    strategy = _strategy(fraction_evaluate=1.0)
    grid = InProcessGrid({1: stats_app, 2: stats_app, 3: fedavg_app})
    result = strategy.start(grid, GLOBAL, num_rounds=2)
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    assert "eval-loss" in result.evaluate_metrics_clientapp[2]
    assert len(strategy.rounds) == 2 and not any(e.skipped for e in strategy.rounds)
    round_two = [m for m in grid.sent if m.metadata.message_type == "train"][3:]
    # Round 2 trained from round 1's merge.
    assert all(_state(m.content["arrays"]).keys() == _state(GLOBAL).keys() for m in round_two)
    assert not torch.equal(_state(round_two[0].content["arrays"])["fc1.weight"],
                           _state(GLOBAL)["fc1.weight"])
    entry = strategy.rounds[1]
    assert set(entry.bytes_received) == set(NODES) and min(entry.bytes_received.values()) > 0
    assert entry.statistics_bytes[1] > 0 and entry.statistics_bytes[3] == 0
    assert entry.merge_seconds > 0
    json.dumps([record.to_json() for record in strategy.rounds])  # the ServerApp writes it to history.json


def _flaky_app(failing_round: int):  # noqa: ANN202 - a ClientApp-like callable
    def app(message: Message, context: Context) -> Message:
        if message.content["config"]["server-round"] == failing_round:
            raise RuntimeError("disk full")
        return fedavg_app(message, context)

    return app


def test_start_keeps_the_previous_global_model_when_a_round_is_skipped() -> None:
    strategy = _strategy(fraction_evaluate=0.0)
    grid = InProcessGrid({node: _flaky_app(failing_round=2) for node in NODES})
    result = strategy.start(grid, GLOBAL, num_rounds=3)
    assert [e.skipped for e in strategy.rounds] == [False, True, False]
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    round1_merge = _state(train[3].content["arrays"])
    # start() ignores None arrays: round 3 trains from round 1's merge again.
    _assert_close(_state(train[6].content["arrays"]), round1_merge, atol=0)
    assert set(result.train_metrics_clientapp) == {1, 3}


def test_start_returns_the_initial_model_when_every_round_is_skipped() -> None:
    strategy = _strategy(fraction_evaluate=0.0)
    grid = InProcessGrid({node: _flaky_app(failing_round=1) for node in NODES})
    result = strategy.start(grid, GLOBAL, num_rounds=1)
    assert strategy.rounds[0].skipped
    _assert_close(_state(result.arrays), _state(GLOBAL), atol=0)


def test_average_of_list_metrics_and_mismatched_lists() -> None:
    from fedcca.flower.metrics import average_metrics

    records = [RecordDict({"m": MetricRecord({"num-examples": n, "acc": acc})})
               for n, acc in ((1, [1.0, 0.0]), (3, [0.0, 1.0]), (4, [1.0]))]
    averaged = average_metrics(records, "num-examples")
    assert np.allclose(averaged["acc"], [0.25, 0.75])


@pytest.mark.parametrize("value", [float("nan"), 1e308, -float("inf")])
def test_a_non_finite_or_huge_client_metric_is_left_out(value: float) -> None:
    """One client's NaN or 1e308 train-loss reached the averaged metrics on main."""
    from flwr.app import MetricRecord, RecordDict

    from fedcca.flower.metrics import average_metrics

    records = [RecordDict({"metrics": MetricRecord({"num-examples": 10, "train-loss": loss})})
               for loss in (1.0, 3.0, value)]
    assert average_metrics(records, "num-examples")["train-loss"] == pytest.approx(2.0)
