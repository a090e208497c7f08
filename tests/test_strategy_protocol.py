"""fedcca.flower.protocol: statistics records and reply validation, one reply at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedcca.flower.protocol import (
    STATISTICS_KEY,
    InvalidReplyError,
    record_bytes,
    statistics_from_record,
    statistics_to_record,
    validate_evaluate_reply,
    validate_reply,
)
from fedcca.spec.tracing import spec_for
from fedcca.statistics import StatisticsError, assemble, collect_moments, collect_statistics
from tests.tiny_clients import (
    CALIBRATION,
    MUTATIONS,
    make_model,
    run_app,
    stats_app,
    train_messages,
)

TEMPLATE = make_model().state_dict()
SPEC = spec_for(make_model())


def _valid_reply(node_id: int = 3) -> tuple[Message, Message]:
    """(train instruction, the stats ClientApp's reply to it)."""
    instruction = train_messages(ArrayRecord(make_model(seed=1).state_dict()), [node_id])[0]
    return instruction, run_app(stats_app, instruction)


def test_statistics_record_round_trip_and_the_server_completes_the_pair() -> None:
    """The client sends its own moments and the cross moment (float32 matrices); with the received
    model's moments measured on the server, the pair equals what the client computed."""
    received, trained = make_model(1), make_model(2)
    stats = collect_statistics(received, [trained], CALIBRATION)[0]
    back = statistics_from_record(statistics_to_record(stats), SPEC)
    assert back.keys() == stats.keys()
    pairs = assemble(collect_moments(received, CALIBRATION, SPEC), back)
    for point, original in stats.items():
        got = pairs[point]
        assert got.count == original.count == back[point].b.count
        assert torch.equal(got.b.mean, original.b.mean)  # means travel in float64
        for mine, theirs in ((got.a.mean, original.a.mean), (got.a.comoment, original.a.comoment),
                             (got.b.comoment, original.b.comoment), (got.cross, original.cross)):
            torch.testing.assert_close(mine, theirs.double(), rtol=1e-6, atol=1e-6 * theirs.abs().max().item())


def test_statistics_record_is_smaller_than_the_full_pair() -> None:
    """Only the model's triangle and the cross block, in float32: about 1.5 n^2 * 4 bytes per point,
    against 3 n^2 * 8 bytes for both own blocks and the cross block in float64."""
    from fedcca.models import build_model

    torch.manual_seed(0)
    received, trained = build_model("cnn", width=0.5), build_model("cnn", width=0.5)
    record = statistics_to_record(collect_statistics(received, [trained], torch.randn(8, 1, 28, 28))[0])
    sizes = [point.size for point in spec_for(received).points]  # 16, 32, 64
    full = sum(8 * (3 * n * n + 2 * n + 1) for n in sizes)
    assert record.count_bytes() < 0.3 * full


@pytest.mark.parametrize(("key", "value"), [
    ("conv1/cross", np.zeros((2, 2), np.float32)),
    ("conv2/comoment", np.full(10, np.nan, np.float32)),
    ("fc1/count", np.asarray(0.0)),
    ("extra/count", np.asarray(1.0)),
])
def test_malformed_statistics_arrays_are_named(key: str, value: np.ndarray) -> None:
    record = statistics_to_record(collect_statistics(make_model(1), [make_model(2)], CALIBRATION)[0])
    record[key] = Array(value)
    with pytest.raises(StatisticsError, match=key):
        statistics_from_record(record, SPEC)
    del record[key]
    if not key.startswith("extra"):
        with pytest.raises(StatisticsError, match=f"'{key}' is missing"):
            statistics_from_record(record, SPEC)


def test_other_statistics_format_versions_are_refused() -> None:
    record = statistics_to_record(collect_statistics(make_model(1), [make_model(2)], CALIBRATION)[0])
    record["format"] = Array(np.asarray(1, dtype=np.int64))
    with pytest.raises(StatisticsError, match="statistics format 1, this server reads formats 2, 3"):
        statistics_from_record(record, SPEC)
    record["format"] = Array(np.asarray(2, dtype=np.int64))  # format 2: the same without pre-activation moments
    assert statistics_from_record(record, SPEC).keys() == set(SPEC.names())
    del record["format"]
    with pytest.raises(StatisticsError, match="statistics format None"):
        statistics_from_record(record, SPEC)


def test_statistics_from_another_calibration_set_are_refused() -> None:
    received, trained = make_model(1), make_model(2)
    stats = collect_statistics(received, [trained], CALIBRATION[:40])[0]
    with pytest.raises(StatisticsError, match="different calibration data"):
        assemble(collect_moments(received, CALIBRATION, SPEC), statistics_from_record(statistics_to_record(stats), SPEC))


def test_statistics_from_record_rejects_undecodable_array() -> None:
    record = statistics_to_record(collect_statistics(make_model(1), [make_model(2)], CALIBRATION)[0])
    key = next(iter(record))
    record[key].data = b"garbage"
    with pytest.raises(StatisticsError, match=key):
        statistics_from_record(record, SPEC)


def test_valid_reply_is_decoded() -> None:
    instruction, reply = _valid_reply(node_id=3)
    update = validate_reply(reply, TEMPLATE, SPEC)
    assert update.node_id == 3
    assert update.num_examples == 50.0  # shard size of node 3
    assert update.state_dict.keys() == TEMPLATE.keys()
    for key, value in update.state_dict.items():
        assert value.dtype == TEMPLATE[key].dtype and value.shape == TEMPLATE[key].shape
    assert update.statistics is not None and set(update.statistics) == {"conv1", "conv2", "fc1"}
    assert update.statistics_bytes == reply.content[STATISTICS_KEY].count_bytes() > 0
    assert update.num_bytes == record_bytes(reply) > update.statistics_bytes


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_malformed_reply_is_rejected_with_reason(name: str) -> None:
    mutate, reason = MUTATIONS[name]
    instruction, reply = _valid_reply()
    content = reply.content
    mutate(content)
    with pytest.raises(InvalidReplyError, match=reason):
        validate_reply(Message(content, reply_to=instruction), TEMPLATE, SPEC)


def test_error_reply_is_rejected() -> None:
    instruction, _ = _valid_reply()
    reply = Message(Error(code=7, reason="out of memory"), reply_to=instruction)
    with pytest.raises(InvalidReplyError, match="error reply.*out of memory"):
        validate_reply(reply, TEMPLATE, SPEC)
    assert record_bytes(reply) == 0


def test_evaluate_reply_validation() -> None:
    instruction, _ = _valid_reply()
    good = Message(RecordDict({"metrics": MetricRecord({"num-examples": 4, "loss": 1.0})}),
                   reply_to=instruction)
    assert validate_evaluate_reply(good)["loss"] == 1.0
    bad = Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=instruction)
    with pytest.raises(InvalidReplyError, match="positive"):
        validate_evaluate_reply(bad)
