"""Replies merged as they arrive: the stream, its timeout, and rounds equal to the all-at-once round."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp.strategy import FedAvg

import fedcca.merging.merger as merger_module
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.recording import RecordRounds
from fedcca.flower.screen import ScreenReplies
from fedcca.flower.strategy import CCAMerge
from fedcca.flower.streaming import ReplyTally, RunningMedian, stream_replies
from tests.tiny_clients import CALIBRATION, claiming_app, make_model, stats_app

GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
NODES = (1, 2, 3, 4, 5)


def _strategy(**kwargs: object) -> CCAMerge:
    kwargs.setdefault("reference", "global")
    return CCAMerge(make_model, CALIBRATION, device="cpu", min_available_nodes=1, **kwargs)  # type: ignore[arg-type]


def _logging_app(events: list[str], app: Callable[[Message, Context], Message] = stats_app):  # noqa: ANN202
    def logged(message: Message, context: Context) -> Message:
        events.append(f"train {message.metadata.dst_node_id}")
        return app(message, context)
    return logged


def _log_merges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that gets "merged <name>" whenever a Merger adds a model."""
    events: list[str] = []
    original = merger_module.Merger.add

    def add(self, model, weight=1.0, statistics=None, *, name=None, **kwargs):  # noqa: ANN001, ANN003, ANN202
        events.append(f"merged {name}")
        return original(self, model, weight, statistics, name=name, **kwargs)

    monkeypatch.setattr(merger_module.Merger, "add", add)
    return events


def _crashing_app(message: Message, context: Context) -> Message:
    raise RuntimeError("disk full")


def _states_close(a: ArrayRecord, b: ArrayRecord) -> None:
    left, right = a.to_torch_state_dict(), b.to_torch_state_dict()
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-6, atol=1e-7, msg=key)


def test_stream_yields_each_reply_before_the_next_node_runs() -> None:
    events: list[str] = []
    grid = InProcessGrid({n: _logging_app(events) for n in NODES})
    strategy = _strategy()
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    for reply in stream_replies(grid, messages, timeout=30):
        events.append(f"got {reply.metadata.src_node_id}")
    assert events == [f"{what} {n}" for n in NODES for what in ("train", "got")]


def test_stream_times_out_on_a_silent_node_and_passes_error_replies_on() -> None:
    grid = InProcessGrid({1: stats_app, 2: _crashing_app, 3: stats_app}, silent=[3])
    messages = _strategy().configure_train(2, GLOBAL, ConfigRecord(), grid)
    started = time.perf_counter()
    replies = list(stream_replies(grid, messages, timeout=0.3))
    waited = time.perf_counter() - started
    assert [r.metadata.src_node_id for r in replies] == [1, 2]
    assert not replies[0].has_error() and "disk full" in replies[1].error.reason
    assert 0.3 <= waited < 5


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_streamed_round_equals_the_all_at_once_round(wrapped: bool) -> None:
    """Client statistics, global reference: the stream and send_and_receive give the same model."""
    results = {}
    for mode in ("list", "stream"):
        strategy = _strategy(config="cca", repair="affine")
        wrapper = RecordRounds(ScreenReplies(strategy)) if wrapped else strategy
        grid = InProcessGrid({n: stats_app for n in NODES})
        messages = wrapper.configure_train(2, GLOBAL, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages) if mode == "list" else stream_replies(grid, messages, timeout=30)
        arrays, metrics = wrapper.aggregate_train(2, replies)
        record = strategy.rounds[-1]
        assert arrays is not None and record.num_valid == len(NODES) and record.client_statistics == len(NODES)
        results[mode] = (arrays, metrics, record)
    _states_close(results["list"][0], results["stream"][0])
    assert dict(results["list"][1]) == pytest.approx(dict(results["stream"][1]))
    assert results["list"][2].bytes_received == results["stream"][2].bytes_received


def test_replies_are_merged_while_later_clients_train_and_the_slowest_still_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    events = _log_merges(monkeypatch)
    grid = InProcessGrid({n: _logging_app(events) for n in NODES})
    strategy = RecordRounds(ScreenReplies(_strategy(config="cca")))
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    assert arrays is not None
    last = max(NODES)
    assert events.index("merged 1") < events.index(f"train {last}")  # the merge overlaps training
    assert f"merged {last}" in events and strategy.round(2).num_valid == len(NODES)
    record = strategy.round(2)
    assert 0 <= record.finish_seconds <= record.aggregate_seconds + 1e-3


def test_one_reply_is_held_at_a_time() -> None:
    """While node k trains, at most the screen's warm-up (two replies) and the one in hand are alive."""
    alive: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []

    def app(message: Message, context: Context) -> Message:
        gc.collect()
        counts.append(len(alive))
        reply = stats_app(message, context)
        alive.add(reply)
        return reply

    nodes = tuple(range(1, 9))
    grid = InProcessGrid({n: app for n in nodes})
    strategy = RecordRounds(ScreenReplies(_strategy(config="cca")))
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    assert arrays is not None and len(counts) == len(nodes)
    assert max(counts) <= 3, counts  # all-at-once would hold k replies while node k + 1 trains
    assert counts[-1] <= 3


def test_failures_timeouts_and_the_minimum_behave_as_with_send_and_receive() -> None:
    nodes = {1: stats_app, 2: _crashing_app, 3: stats_app, 4: stats_app}
    records = {}
    for mode in ("list", "stream"):
        strategy = _strategy(config="cca", min_train_nodes=2)
        grid = InProcessGrid(nodes, silent=[4])
        messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=0.2) if mode == "list" else \
            stream_replies(grid, messages, timeout=0.2)
        arrays, _ = strategy.aggregate_train(2, replies)
        assert arrays is not None
        records[mode] = strategy.rounds[-1]
    for record in records.values():
        assert sorted(record.dropped) == [2, 4] and "disk full" in record.dropped[2]
        assert "no reply" in record.dropped[4] and record.num_valid == 2 and record.bytes_received[4] == 0
    strategy = _strategy(config="cca", min_train_nodes=3)
    grid = InProcessGrid(nodes, silent=[4])
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=0.2))
    assert arrays is None and strategy.rounds[-1].skipped and "min_train_nodes is 3" in strategy.rounds[-1].skip_reason


def test_fedavg_reads_a_stream_like_a_list() -> None:
    results = []
    for streamed in (False, True):
        grid = InProcessGrid({n: stats_app for n in NODES})
        strategy = RecordRounds(ScreenReplies(FedAvg(fraction_evaluate=0.0)))
        messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
        replies = stream_replies(grid, messages, timeout=30) if streamed else grid.send_and_receive(messages)
        arrays, _ = strategy.aggregate_train(2, replies)
        assert strategy.round(2).num_replies == len(NODES)
        results.append(arrays)
    _states_close(*results)


def test_a_huge_claim_arriving_first_is_still_capped() -> None:
    """The first three claims wait for their median: an attacker first in line gets at most the median's weight."""
    claim = 1e12
    grid = InProcessGrid({1: claiming_app(claim), **{n: stats_app for n in (2, 3, 4)}})
    strategy = _strategy(config="direct", recompute_bn=False)
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    assert arrays is not None and strategy.rounds[-1].capped.get(1) == claim


@pytest.mark.parametrize("claim", [1e12, 1e308])
def test_two_replies_one_claiming_huge_counts_neither_overflow_nor_own_the_round(claim: float) -> None:
    grid = InProcessGrid({1: claiming_app(claim), 2: stats_app})
    strategy = _strategy(config="direct", recompute_bn=False)
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    assert arrays is not None and not strategy.rounds[-1].skipped
    # the median of two claims is their mean: the huge one is capped to it, and the sums stay finite
    assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())


def test_the_screen_judges_an_early_outlier_against_the_first_three() -> None:
    def scaled(message: Message, context: Context) -> Message:
        reply = stats_app(message, context)
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({k: v * 1e3 if v.is_floating_point() else v
                                               for k, v in arrays.to_torch_state_dict().items()})
        return reply

    grid = InProcessGrid({1: scaled, **{n: stats_app for n in (2, 3, 4, 5)}})
    screen = ScreenReplies(_strategy(config="cca"), max_update_norm=None)
    messages = screen.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = screen.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    assert arrays is not None and list(screen.screened_out(2)) == [1]
    assert "median update" in screen.screened_out(2)[1]


def test_running_median_waits_for_its_warmup() -> None:
    medians: RunningMedian[str] = RunningMedian(warmup=3)
    assert medians.push("a", 1.0) == [] and medians.push("b", None) == [("b", None)]
    assert medians.push("c", 5.0) == []
    assert medians.push("d", 3.0) == [("a", 3.0), ("c", 3.0), ("d", 3.0)]
    assert medians.push("e", 100.0) == [("e", 4.0)]
    assert medians.flush() == []
    short: RunningMedian[str] = RunningMedian(warmup=3)
    short.push("a", 1.0)
    assert short.flush() == [("a", None)]
    with pytest.raises(ValueError, match="warmup"):
        RunningMedian(warmup=0)


def test_flowers_own_loop_streams_through_record_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RecordRounds.start`` (Flower's ``Strategy.start``) hands replies over as they arrive."""
    events = _log_merges(monkeypatch)
    grid = InProcessGrid({n: _logging_app(events) for n in NODES})
    strategy = RecordRounds(ScreenReplies(CCAMerge(make_model, CALIBRATION, config="cca", device="cpu",
                                                   fraction_evaluate=0.0, min_available_nodes=1)))
    result = strategy.start(grid, GLOBAL, num_rounds=2)
    assert result.arrays and [r.num_valid for r in strategy.rounds] == [len(NODES)] * 2
    second = events[events.index("train 1", events.index(f"train {max(NODES)}") + 1):]  # round 2 ("global" reference)
    assert second.index("merged 1") < second.index(f"train {max(NODES)}")


@pytest.mark.parametrize("server_round", [1, 2])  # round 1 of "auto": the largest reply is the reference
def test_time_waiting_for_replies_is_not_merge_time(server_round: int) -> None:
    def slow(message: Message, context: Context) -> Message:
        time.sleep(1.5)  # far longer than merging five tiny replies, even on a loaded machine
        return stats_app(message, context)

    grid = InProcessGrid({**{n: stats_app for n in NODES[:-1]}, NODES[-1]: slow})
    strategy = RecordRounds(CCAMerge(make_model, CALIBRATION, config="cca", device="cpu", min_available_nodes=1))
    messages = strategy.configure_train(server_round, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(server_round, stream_replies(grid, messages, timeout=30))
    record = strategy.round(server_round)
    assert arrays is not None and record.num_valid == len(NODES)
    assert 0 < record.merge_seconds < 1.5 and 0 < record.aggregate_seconds < 1.5 <= record.train_seconds_wall
    assert 0 < record.finish_seconds <= record.aggregate_seconds + 1e-3


def test_the_replies_end_at_the_last_arrival_and_its_handling_counts_after() -> None:
    grid = InProcessGrid({n: stats_app for n in NODES})
    reply = grid.send_and_receive(_strategy().configure_train(2, GLOBAL, ConfigRecord(), grid))[0]

    def source():  # noqa: ANN202
        yield reply
        time.sleep(0.3)  # the end of the stream waited for (a node that never replies)

    tally = ReplyTally(source())
    for _ in tally:
        time.sleep(0.2)  # handling the last reply
    finish = time.perf_counter() - tally.ended
    assert 0.2 <= finish < 0.3 and tally.waited >= 0.3 and tally.count == 1 and tally.errors == 0


def test_no_decoded_reply_outlives_its_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each new reply is decoded, at most the warm-up's replies' tensors are alive (not one per reply)."""
    import fedcca.flower.aggregation as aggregation_module  # pylint: disable=import-outside-toplevel

    alive: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []
    original = aggregation_module.validate_reply

    def decoded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        update = original(*args, **kwargs)
        gc.collect()
        counts.append(len(alive))
        alive.update(update.state_dict.values())
        alive.update(covariance for _, covariance in (update.preactivation or {}).values())
        return update

    monkeypatch.setattr(aggregation_module, "validate_reply", decoded)
    nodes = range(1, 13)
    grid = InProcessGrid({n: stats_app for n in nodes})
    strategy = _strategy(config="cca", repair="affine")
    messages = strategy.configure_train(2, GLOBAL, ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(2, stream_replies(grid, messages, timeout=30))
    per_reply = len(GLOBAL) + 3  # its weights, and a pre-activation covariance per point
    assert arrays is not None and len(counts) == len(nodes)
    assert max(counts) <= 2 * per_reply and counts[-1] <= per_reply, counts
