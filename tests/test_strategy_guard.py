"""The collapse guard: a merge that wins its round but that clients cannot train from does not strand the run."""

from __future__ import annotations

import math

import pytest

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import read_train_instruction, train_reply
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.config import MergeConfig, MergeSearch
from tests.test_strategy_selection import NODES, _different_replies, _merge_of
from tests.tiny_clients import CALIBRATION, make_model, shard, train_locally
from tests.tiny_models import calibration

TRAINABLE: dict[str, torch.Tensor] = {}  # the one model local SGD can train from (set per test)
TRAINED: list[int] = []  # rounds in which a client trained


def _is_trainable(message: Message) -> bool:
    received = read_train_instruction(message).arrays.to_torch_state_dict()
    return bool(TRAINABLE) and all(torch.allclose(received[key], value) for key, value in TRAINABLE.items())


def _scripted(message: Message, context: Context) -> Message:
    """Trains honestly only from TRAINABLE; from any other model it comes back with nothing learned (a fresh
    random model): what the issue saw when every client's model died after training from the chosen merge."""
    node = message.metadata.dst_node_id
    instruction = read_train_instruction(message)
    if _is_trainable(message):
        _, trained, _ = train_locally(message, node)
        TRAINED.append(instruction.server_round)
    else:
        trained = make_model(seed=1000 * instruction.server_round + node)
    return Message(train_reply(trained.state_dict(), len(shard(node)[0]), {"train-loss": 1.0}), reply_to=message)


scripted_app = ClientApp()
scripted_app.train()(_scripted)


def _strategy(replies: list[Message], guard: bool) -> tuple[CCAMerge, ArrayRecord]:
    """Round 1 of a Permute-or-FedAvg choice whose held-out labels favour Permute; the round-1 FedAvg average is
    the trainable model."""
    images = calibration(3000, seed=77)
    aligned = _merge_of(replies, MergeConfig("permute", zero_dead=False, fold_bn=False))
    plain = _merge_of(replies, MergeConfig("permute", zero_dead=False, fold_bn=False, shrinkage=0.0))
    with torch.no_grad():
        held_out = images[aligned(images).argmax(1) != plain(images).argmax(1)]
        labels = aligned(held_out).argmax(1)
    search = MergeSearch(MergeConfig("permute", zero_dead=False, fold_bn=False), (("shrinkage", (0.0, 1.0)),), min_z=2.0)
    strategy = CCAMerge(make_model, CALIBRATION, search, holdout=(held_out, labels), reference="largest",
                        stats="server", device="cpu", min_train_nodes=2, guard=guard, max_weight_ratio=math.inf)
    strategy.configure_train(1, ArrayRecord(make_model(seed=1).state_dict()), ConfigRecord(),
                             InProcessGrid({node: scripted_app for node in NODES}))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.rounds[-1].merge_choice == "permute"
    TRAINABLE.clear()
    TRAINABLE.update({key: value for key, value in plain.state_dict().items() if key.endswith("weight")})
    return strategy, arrays


def _run(guard: bool, rounds: int = 3) -> CCAMerge:
    TRAINED.clear()
    strategy, arrays = _strategy(_different_replies(), guard)
    grid = InProcessGrid({node: scripted_app for node in NODES})
    for server_round in range(2, rounds + 1):
        replies = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
        new, _ = strategy.aggregate_train(server_round, replies)
        arrays = new if new is not None else arrays
    return strategy


def test_without_the_guard_an_untrainable_winner_strands_the_federation() -> None:
    """The failure the guard exists for (main before it): no client ever trains again after round 1."""
    strategy = _run(guard=False, rounds=4)
    assert TRAINED == []
    assert all(record.guard is None for record in strategy.rounds)


def test_a_collapse_rolls_back_to_the_previous_baseline_and_clients_train_again() -> None:
    strategy = _run(guard=True, rounds=4)
    second, third = strategy.rounds[1], strategy.rounds[2]
    assert second.guard is not None and second.guard["action"] == "rollback", second.guard
    assert second.guard["to"] == "round 1 direct"
    assert second.guard["accuracy"] < second.guard["previous_accuracy"] and second.guard["z"] < -2
    assert "did not train well; rolled back" in second.guard["reason"]
    # Round 3's clients received round 1's FedAvg average and trained; round 3 keeps its own baseline.
    assert set(TRAINED) >= {3} and len([r for r in TRAINED if r == 3]) == len(NODES)
    assert third.guard is None or third.guard["action"] == "probation"
    assert third.merge_choice in ("direct", "permute -> probation")


def test_ordinary_rounds_are_left_alone() -> None:
    """No collapse (the merge is as accurate as the model the clients trained from): nothing is overridden."""
    replies = _different_replies()
    strategy, arrays = _strategy(replies, guard=True)
    TRAINABLE.clear()
    grid = InProcessGrid({node: scripted_app for node in NODES})
    # The same replies again in round 2: the chosen merge equals the global model, no collapse.
    strategy.configure_train(2, arrays, ConfigRecord(), grid)
    strategy.aggregate_train(2, replies)
    assert strategy.rounds[-1].guard is None and strategy.rounds[-1].merge_choice == "permute"


class _Table(torch.nn.Module):
    """Predicts ``table[i]`` for hold-out example ``i`` (inputs are the indices)."""

    def __init__(self, predictions: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", torch.nn.functional.one_hot(predictions, 3).float() * 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long().reshape(-1)]


def _model(correct: float, labels: torch.Tensor) -> _Table:
    """A model right on the first ``correct`` share of the hold-out examples, wrong on the rest."""
    predictions = labels.clone()
    wrong = torch.arange(len(labels)) >= int(correct * len(labels))
    predictions[wrong] = (labels[wrong] + 1) % 3
    return _Table(predictions)


@pytest.mark.parametrize(("previous", "accuracy", "fallback", "action"), [
    ("cca +affine", 0.6, 0.7, "rollback"),  # a non-baseline broadcast that trained worse: back to its round's FedAvg
    ("cca +affine", 0.6, 0.5, "none"),      # ... unless that FedAvg average is worse still: the merge stands
    ("direct", 0.6, 0.7, None),             # the baseline, an ordinary dip: left alone
    ("direct", 0.1, 0.7, "keep"),           # the baseline, a collapse: the global model kept once
])
def test_what_the_guard_does_after_each_kind_of_broadcast(previous: str, accuracy: float, fallback: float,
                                                          action: str | None) -> None:
    from fedcca.flower.guard import CollapseGuard

    labels = torch.arange(500) % 3
    inputs = torch.arange(500).float()
    guard = CollapseGuard((inputs, labels), min_z=2.0)
    first, baseline = _model(0.8, labels), _model(fallback, labels)
    guard.decide(1, None, first, previous, baseline, "direct")
    chosen = _model(accuracy, labels)
    out, done = guard.decide(2, first, chosen, "cca", _model(accuracy, labels), "direct")
    assert (done or {}).get("action") == action
    if action == "none":
        assert out is chosen
    if action == "rollback":
        assert torch.equal(out.table, baseline.table) and done["to"] == "round 1 direct"
        assert guard.in_probation(3)
