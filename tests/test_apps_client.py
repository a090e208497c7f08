"""The fedcca ClientApp called directly: what it trains on, what it replies, determinism."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType

from clients.client_app import app as client_app
from fedcca.app.federation import calibration_inputs, client_indices, holdout_set, load_data, make_model, node_partition
from fedcca.app.task import RunConfigError, TaskConfig
from fedcca.data import federated_split, normalize
from fedcca.flower.local_grid import node_context, set_task_identity
from fedcca.flower.protocol import (
    LABEL_COUNTS_FLAG,
    LABEL_COUNTS_KEY,
    STATISTICS_KEY,
    train_instruction,
    validate_reply,
)
from fedcca.spec.tracing import spec_for
from fedcca.statistics import collect_statistics
from tests.tiny_dataset import tiny_run_config


@pytest.fixture(scope="module")
def run_config(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return tiny_run_config(tiny_data_dir, tmp_path_factory.mktemp("apps-client") / "out")


def _global_model(run_config: dict[str, Any]) -> torch.nn.Module:
    task = TaskConfig.from_run_config(run_config)
    torch.manual_seed(1)
    return make_model(task, load_data(task.dataset, task.data_dir))


def _train_message(model: torch.nn.Module, server_round: int = 1, stats: bool = True, **config: Any) -> Message:
    set_task_identity()
    return Message(train_instruction(ArrayRecord(model.state_dict()), server_round, stats, **config), 1,
                   MessageType.TRAIN)


def _reply(run_config: dict[str, Any], partition_id: int = 0, **message_kwargs: Any) -> tuple[torch.nn.Module, Message]:
    model = _global_model(run_config)
    reply = client_app(_train_message(model, **message_kwargs), node_context(run_config, partition_id, 2))
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
        got, want = update.statistics[point], expected[point]  # the client's part: B's moments and the cross moment
        assert got.b.count == want.count > 0
        for mine, theirs in ((got.b.mean, want.b.mean), (got.b.comoment, want.b.comoment), (got.cross, want.cross)):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())
    # Training moved the weights away from the received model.
    assert any(not torch.equal(update.state_dict[k], v) for k, v in received.state_dict().items())
    metrics = reply.content["metrics"]
    assert set(metrics) == {"num-examples", "train-loss", "train-seconds", "stats-seconds"}
    assert np.isfinite(metrics["train-loss"]) and metrics["stats-seconds"] > 0


def test_no_statistics_unless_asked(run_config: dict[str, Any]) -> None:
    _, reply = _reply(run_config, stats=False)
    assert STATISTICS_KEY not in reply.content
    assert reply.content["metrics"]["stats-seconds"] == 0.0


def test_distillation_keys_reach_the_distillation_config(run_config: dict[str, Any]) -> None:
    config = TaskConfig.from_run_config({**run_config, "distill": True, "distill-teacher": "fitted,logits",
                                         "distill-augmentation": "none,shift", "distill-lr": "0.001, 0.0003",
                                         "distill-temperature": "1,4", "distill-copies": 3,
                                         "distill-ema": "0, 0.99", "distill-select": "loss"}).distill_config()
    assert config is not None and config.teachers == ("fitted", "logits") and config.augmentations == ("none", "shift")
    assert config.lrs == (0.001, 0.0003) and config.temperatures == (1.0, 4.0)
    assert config.copies == 3 and config.ema == (0.0, 0.99) and config.select == "loss"


def test_label_counts_only_when_asked_and_equal_to_the_shard(run_config: dict[str, Any]) -> None:
    """A "label-counts" teacher's input: the client's training examples per class, sent only when asked."""
    task = TaskConfig.from_run_config(run_config)
    dataset = load_data(task.dataset, task.data_dir)
    _, asked = _reply(run_config, 1, stats=False, **{LABEL_COUNTS_FLAG: True})
    labels = dataset.train_labels[torch.as_tensor(client_indices(task, 1, 2))]
    expected = np.bincount(labels.numpy(), minlength=dataset.num_classes).tolist()
    assert list(asked.content["metrics"][LABEL_COUNTS_KEY]) == expected
    assert sum(expected) == asked.content["metrics"]["num-examples"]
    _, silent = _reply(run_config, 1, stats=False)
    assert LABEL_COUNTS_KEY not in silent.content["metrics"]


def test_trains_on_its_shard_of_the_shared_split(
    run_config: dict[str, Any], first_reply: tuple[torch.nn.Module, Message]
) -> None:
    task = TaskConfig.from_run_config(run_config)
    dataset = load_data(task.dataset, task.data_dir)
    public = task.calibration_size + task.holdout_size
    split = federated_split(dataset, 2, task.partitioning, alpha=task.alpha, calibration_size=public, seed=task.seed)
    # The server's calibration and held-out sets are what federated_split holds out of every shard:
    # both class-balanced, disjoint, together the public set.
    calibration, (held_out, held_labels) = calibration_inputs(task), holdout_set(task)
    images = torch.cat([calibration, held_out])
    normalised = normalize(torch.stack([dataset.train_images[i] for i in split.calibration]), dataset)
    assert len(images) == public and len(calibration) == task.calibration_size
    assert {tuple(x.flatten().tolist()) for x in images} == {tuple(x.flatten().tolist()) for x in normalised}
    assert np.bincount(held_labels.numpy(), minlength=10).tolist() == [1] * 10  # 10 held out, one per class
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


def test_fedprox_instruction_adds_the_proximal_term(run_config: dict[str, Any],
                                                    first_reply: tuple[torch.nn.Module, Message]) -> None:
    """FedProx's 'proximal-mu' in the train config pulls the client towards the model it received."""
    received = first_reply[0].state_dict()
    plain = first_reply[1].content["arrays"].to_torch_state_dict()
    held = _reply(run_config, **{"proximal-mu": 5.0})[1].content["arrays"].to_torch_state_dict()

    def distance(state: dict[str, torch.Tensor]) -> float:
        return sum((state[k].double() - v.double()).square().sum() for k, v in received.items()
                   if v.is_floating_point() and "running" not in k).sqrt().item()

    assert distance(held) < 0.9 * distance(plain)  # two SGD steps only: a clear, not a large, pull


def test_outlier_exposure_reaches_local_training(run_config: dict[str, Any],
                                                 first_reply: tuple[torch.nn.Module, Message]) -> None:
    """Run config 'outlier-exposure' is the client's TrainingConfig.outlier_exposure, and changes what it trains."""
    assert TaskConfig.from_run_config({**run_config, "outlier-exposure": 0.7}).training().outlier_exposure == 0.7
    plain = first_reply[1].content["arrays"].to_torch_state_dict()
    exposed = _reply({**run_config, "outlier-exposure": 1.0})[1].content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(plain[k], exposed[k]) for k in plain)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("strategy", "fedma", "'strategy' must be one of"),
    ("num-server-rounds", "3", "'num-server-rounds' must be a int"),
    ("lr", True, "'lr' must be a float"),
    ("resume", 1, "'resume' must be a bool"),
    ("partitioning", "pathological", "'partitioning' must be one of"),
    ("fraction-train", 1.5, "'fraction-train' must be in (0, 1]"),
    ("max-examples-per-client", -1, "'max-examples-per-client' must be >= 0"),
    ("shrinkage", "0,2", "shrinkage must be in [0, 1]"),
    ("repair", "none,full", "'repair' must be one of"),
    ("model", "resnet9", "'model' must be one of"),
    ("lr-schedule", "cosine", "'lr-schedule' must be one of"),
    ("distill-augmentation", "none,rotate", "'distill-augmentation' must be one of"),
    ("distill-lr", "0.001,0", "'distill-lr' must be positive finite numbers"),
    ("distill-temperature", "warm", "run config 'distill-temperature'"),
    ("distill-copies", 33, "'distill-copies' must be in [0, 32]"),
    ("distill-ema", "0.99,1", "'distill-ema' must be decays in [0, 1)"),
    ("distill-select", "f1", "'distill-select' must be one of"),
    ("outlier-exposure", -0.5, "'outlier-exposure' must be >= 0"),
])
def test_bad_run_config_names_the_key(run_config: dict[str, Any], key: str, value: Any, words: str) -> None:
    with pytest.raises(RunConfigError, match=re.escape(words)):
        TaskConfig.from_run_config({**run_config, key: value})


def test_missing_run_config_key_and_node_config_are_loud(run_config: dict[str, Any]) -> None:
    incomplete = {k: v for k, v in run_config.items() if k != "seed"}
    with pytest.raises(RunConfigError, match="lacks 'seed'"):
        TaskConfig.from_run_config(incomplete)
    with pytest.raises(RunConfigError, match="partition-id"):
        node_partition({"num-partitions": 2})
    with pytest.raises(RunConfigError, match=r"not in \[0, 2\)"):
        node_partition({"partition-id": 2, "num-partitions": 2})


def test_a_choice_of_merges_needs_held_out_examples(run_config: dict[str, Any]) -> None:
    with pytest.raises(RunConfigError, match="needs 'holdout-size' > 0"):
        TaskConfig.from_run_config({**run_config, "holdout-size": 0})
    single = TaskConfig.from_run_config({**run_config, "holdout-size": 0, "shrinkage": "1", "repair": "none",
                                         "merge-methods": "cca"})
    assert single.merge_search().candidates() == [single.merge_search().base]
    search = TaskConfig.from_run_config(run_config).merge_search()
    assert [c.label() for c in search.candidates()][:2] == ["direct", "direct +affine"]


def test_a_users_model_by_import_path(run_config: dict[str, Any]) -> None:
    task = TaskConfig.from_run_config({**run_config, "model": "tests.tiny_models:TinyNet"})
    dataset = load_data(task.dataset, task.data_dir)
    assert type(make_model(task, dataset)).__name__ == "TinyNet"
    for path, words in (("tests.nowhere:Net", "cannot import"), ("tests.tiny_models:CLASSES", "not a torch nn.Module class")):
        with pytest.raises(RunConfigError, match=words):
            make_model(TaskConfig.from_run_config({**run_config, "model": path}), dataset)


def test_out_dir_placeholders(run_config: dict[str, Any], tmp_path: Path) -> None:
    config = {**run_config, "out-dir": str(tmp_path / "{strategy}-seed{seed}"), "seed": 7}
    assert TaskConfig.from_run_config(config).output_dir(config) == tmp_path / "cca-seed7"
    config["out-dir"] = str(tmp_path / "{nope}")
    with pytest.raises(RunConfigError, match="nope"):
        TaskConfig.from_run_config(config).output_dir(config)


def test_a_diverging_client_replies_an_error_naming_the_step(run_config: dict[str, Any]) -> None:
    """A non-finite loss (here: the global model's weights overflow) is an error reply with the
    divergence code and reason, which the strategy's validation records as the drop reason."""
    from fedcca.flower.protocol import TRAINING_DIVERGED_CODE, InvalidReplyError

    model = _global_model(run_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1e30)
    reply = client_app(_train_message(model), node_context(run_config, 0, 2))
    assert reply.has_error() and reply.error.code == TRAINING_DIVERGED_CODE
    assert reply.error.reason.startswith("local training diverged: non-finite training loss at epoch 0, step 0")
    with pytest.raises(InvalidReplyError, match=f"code {TRAINING_DIVERGED_CODE}.*local training diverged"):
        validate_reply(reply, model.state_dict(), None)
