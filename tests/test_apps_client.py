"""The fedcca ClientApp called directly: what it trains on, what it replies, determinism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from clients.client_app import app as client_app
from clients.task import (
    RunConfigError,
    TaskConfig,
    calibration_inputs,
    client_indices,
    load_data,
    make_model,
    node_partition,
)
from fedcca.alignment import spec_for
from fedcca.data import federated_split
from fedcca.protocol import (
    COMPUTE_STATS_FLAG,
    STATISTICS_KEY,
    validate_reply,
)
from fedcca.statistics import collect_statistics
from tests.apps_helpers import client_context, tiny_run_config, write_tiny_fashion_mnist
from tests.flower_helpers import set_task_identity


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("apps-client")
    return tiny_run_config(write_tiny_fashion_mnist(root / "data"), root / "out")


def _global_model(run_config: dict[str, Any]) -> torch.nn.Module:
    task = TaskConfig.from_run_config(run_config)
    torch.manual_seed(1)
    return make_model(task, load_data(task.dataset, task.data_dir))


def _train_message(model: torch.nn.Module, server_round: int = 1, stats: bool = True) -> Message:
    set_task_identity()
    config = ConfigRecord({"server-round": server_round, COMPUTE_STATS_FLAG: stats})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, 1, MessageType.TRAIN)


def _reply(run_config: dict[str, Any], partition_id: int = 0, **message_kwargs: Any) -> tuple[torch.nn.Module, Message]:
    model = _global_model(run_config)
    reply = client_app(_train_message(model, **message_kwargs), client_context(run_config, partition_id, 2))
    assert not reply.has_error(), reply.error
    return model, reply


@pytest.fixture(scope="module")
def first_reply(run_config: dict[str, Any]) -> tuple[torch.nn.Module, Message]:
    """(received model, reply) of partition 0 of 2 in round 1, statistics requested."""
    return _reply(run_config)


def test_reply_is_a_valid_update_with_statistics_of_trained_vs_received(
    run_config: dict[str, Any], first_reply: tuple[torch.nn.Module, Message]
) -> None:
    received, reply = first_reply
    task = TaskConfig.from_run_config(run_config)
    spec = spec_for(received)
    update = validate_reply(reply, received.state_dict(), spec)  # what CCAMerge accepts
    assert update.statistics is not None
    # The statistics are exactly those of (received model = A, replied model = B) on the
    # public calibration set the server holds too.
    trained = _global_model(run_config)
    trained.load_state_dict(update.state_dict)
    expected = collect_statistics(received, [trained], calibration_inputs(task), spec, device="cpu")[0]
    for point in spec.names():
        got, want = update.statistics[point], expected[point]
        assert got.count == want.count > 0
        for field in ("sum_a", "sum_b", "sq_a", "sq_b", "cross"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-9, atol=1e-9)
    # Training moved the weights away from the received model.
    assert any(not torch.equal(update.state_dict[k], v) for k, v in received.state_dict().items())
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "train-loss", "train-seconds", "stats-seconds"}
    assert np.isfinite(metrics["train-loss"]) and metrics["stats-seconds"] > 0


def test_no_statistics_unless_asked(run_config: dict[str, Any]) -> None:
    _, reply = _reply(run_config, stats=False)
    assert STATISTICS_KEY not in reply.content
    assert reply.content["metrics"]["stats-seconds"] == 0.0


def test_trains_on_its_shard_of_the_shared_split(
    run_config: dict[str, Any], first_reply: tuple[torch.nn.Module, Message]
) -> None:
    task = TaskConfig.from_run_config(run_config)
    dataset = load_data(task.dataset, task.data_dir)
    split = federated_split(dataset, 2, task.partitioning, alpha=task.alpha,
                            calibration_size=task.calibration_size, seed=task.seed)
    # The server's calibration set is the one federated_split holds out of every shard.
    expected_calibration = torch.stack([dataset.train_images[i] for i in split.calibration])
    torch.testing.assert_close(
        calibration_inputs(task),
        (expected_calibration.float() / 255 - dataset.mean[0]) / dataset.std[0])
    for partition_id, reply in ((0, first_reply[1]), (1, _reply(run_config, 1)[1])):
        assert reply.content["metrics"]["num-examples"] == len(split.shards[partition_id])
        np.testing.assert_array_equal(client_indices(task, partition_id, 2), split.shards[partition_id])


def test_max_examples_per_client_is_a_fixed_subset_of_the_shard(run_config: dict[str, Any]) -> None:
    limited = {**run_config, "max-examples-per-client": 30}
    task = TaskConfig.from_run_config(limited)
    subset = client_indices(task, 1, 2)
    shard = client_indices(TaskConfig.from_run_config(run_config), 1, 2)
    assert len(subset) == 30 and set(subset) <= set(shard)
    np.testing.assert_array_equal(subset, client_indices(task, 1, 2))
    _, reply = _reply(limited, partition_id=1)
    assert reply.content["metrics"]["num-examples"] == 30


def test_training_is_seeded_by_round(
    run_config: dict[str, Any], first_reply: tuple[torch.nn.Module, Message]
) -> None:
    def weights(**kwargs: Any) -> dict[str, torch.Tensor]:
        return _reply(run_config, **kwargs)[1].content["arrays"].to_torch_state_dict()

    first = first_reply[1].content["arrays"].to_torch_state_dict()
    again, later = weights(server_round=1), weights(server_round=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], later[k]) for k in first)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("strategy", "fedprox", "'strategy' must be one of"),
    ("num-server-rounds", "3", "'num-server-rounds' must be a int"),
    ("lr", True, "'lr' must be a float"),
    ("resume", 1, "'resume' must be a bool"),
    ("partitioning", "pathological", "'partitioning' must be one of"),
    ("fraction-train", 1.5, "'fraction-train' must be in (0, 1]"),
    ("max-examples-per-client", -1, "'max-examples-per-client' must be >= 0"),
])
def test_bad_run_config_names_the_key(run_config: dict[str, Any], key: str, value: Any, words: str) -> None:
    with pytest.raises(RunConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TaskConfig.from_run_config({**run_config, key: value})


def test_missing_run_config_key_and_node_config_are_loud(run_config: dict[str, Any]) -> None:
    incomplete = {k: v for k, v in run_config.items() if k != "seed"}
    with pytest.raises(RunConfigError, match="lacks 'seed'"):
        TaskConfig.from_run_config(incomplete)
    with pytest.raises(RunConfigError, match="partition-id"):
        node_partition({"num-partitions": 2})
    with pytest.raises(RunConfigError, match=r"not in \[0, 2\)"):
        node_partition({"partition-id": 2, "num-partitions": 2})


def test_out_dir_placeholders(run_config: dict[str, Any], tmp_path: Path) -> None:
    config = {**run_config, "out-dir": str(tmp_path / "{strategy}-seed{seed}"), "seed": 7}
    assert TaskConfig.from_run_config(config).output_dir(config) == tmp_path / "cca-seed7"
    config["out-dir"] = str(tmp_path / "{nope}")
    with pytest.raises(RunConfigError, match="nope"):
        TaskConfig.from_run_config(config).output_dir(config)
