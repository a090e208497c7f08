"""fedcca.protocol: statistics records and reply validation, one reply at a time."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedcca.alignment import spec_for
from fedcca.protocol import (
    STATISTICS_KEY,
    InvalidReplyError,
    record_bytes,
    statistics_from_record,
    statistics_to_record,
    validate_evaluate_reply,
    validate_reply,
)
from fedcca.statistics import StatisticsError, collect_statistics
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


def test_statistics_record_round_trip() -> None:
    stats = collect_statistics(make_model(1), [make_model(2)], CALIBRATION)[0]
    back = statistics_from_record(statistics_to_record(stats), SPEC)
    assert back.keys() == stats.keys()
    for point, original in stats.items():
        assert back[point].count == original.count
        for field in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
            assert torch.equal(getattr(back[point], field), getattr(original, field).double())


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
