"""CCAMerge's calibration guard: an aligned merge is kept only if it fits the calibration set."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedcca.strategy import CCAMerge
from tests.flower_helpers import one_torch_thread  # noqa: F401 - autouse fixture
from tests.flower_helpers import CALIBRATION, FakeGrid, make_model, stats_app, train_messages

NODES = (1, 2, 3)


def _replies() -> list[Message]:
    """Three clients trained a few steps from independent initialisations (they differ)."""
    grid = FakeGrid({node: stats_app for node in NODES})
    messages = []
    for node in NODES:
        messages += train_messages(ArrayRecord(make_model(seed=10 + node).state_dict()), [node], compute_stats=False)
    return list(grid.send_and_receive(messages))


def _merged(replies: list[Message], method: str, labels: torch.Tensor | None = None,
            guard_z: float = 2.0) -> tuple[CCAMerge, dict]:
    strategy = CCAMerge(make_model, CALIBRATION, method=method, reference="largest", stats="server",
                        device="cpu", calibration_labels=labels, guard_z=guard_z, min_train_nodes=2)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return strategy, dict(arrays.to_torch_state_dict())


def _predictions(state_dict: dict) -> torch.Tensor:
    model = make_model()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(CALIBRATION).argmax(dim=1)


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in b)


@pytest.mark.parametrize("favoured", ["aligned", "direct"])
def test_guard_keeps_the_merge_with_lower_calibration_loss(favoured: str, caplog: pytest.LogCaptureFixture) -> None:
    replies = _replies()
    # Permute: its merge of these clients differs from the plain average more than the
    # default CCA's does, so labels predicted by either candidate favour that candidate.
    _, aligned = _merged(replies, "permute")
    _, direct = _merged(replies, "direct")
    assert not _equal(aligned, direct)
    # Labels that one candidate predicts itself: that candidate has the lower loss.
    labels = _predictions(aligned if favoured == "aligned" else direct)
    with caplog.at_level(logging.WARNING):
        strategy, guarded = _merged(replies, "permute", labels)
    entry = strategy.round_log[-1]
    assert entry["merge_choice"] == favoured
    assert (entry["calibration_loss"]["aligned"] <= entry["calibration_loss"]["direct"]) == (favoured == "aligned")
    assert (entry["guard_z"] > 2.0) == (favoured == "aligned")
    assert _equal(guarded, aligned if favoured == "aligned" else direct)
    warned = [r for r in caplog.records if "using the plain average" in r.getMessage()]
    assert len(warned) == (favoured == "direct")


def test_guard_runs_on_the_default_cca_merge() -> None:
    """With the default method the guard compares the CCA merge and the average by their calibration loss."""
    replies = _replies()
    _, aligned = _merged(replies, "cca")
    _, direct = _merged(replies, "direct")
    labels = _predictions(direct)
    strategy, guarded = _merged(replies, "cca", labels)
    entry = strategy.round_log[-1]
    expected = "aligned" if entry["guard_z"] > 2.0 else "direct"
    assert entry["merge_choice"] == expected
    assert _equal(guarded, aligned if expected == "aligned" else direct)


def test_guard_margin_is_in_standard_errors() -> None:
    """The same clear win is kept at margin 2 and refused at an infinite margin."""
    replies = _replies()
    _, aligned = _merged(replies, "permute")
    labels = _predictions(aligned)
    kept, _ = _merged(replies, "permute", labels, guard_z=2.0)
    refused, guarded = _merged(replies, "permute", labels, guard_z=float("inf"))
    assert kept.round_log[-1]["merge_choice"] == "aligned"
    assert refused.round_log[-1]["merge_choice"] == "direct"
    assert kept.round_log[-1]["guard_z"] == refused.round_log[-1]["guard_z"]


def test_paired_z() -> None:
    from fedcca.strategy import _paired_z

    gain = torch.tensor([1.0, 2.0, 3.0, 2.0], dtype=torch.float64)
    assert _paired_z(gain) == pytest.approx(2.0 / (gain.std().item() / 2.0))
    assert _paired_z(torch.zeros(5)) == 0.0
    assert _paired_z(torch.full((5,), 0.5)) == float("inf")
    assert _paired_z(torch.tensor([1.0, float("nan")])) == float("-inf")


def test_labels_must_match_the_calibration_tensor() -> None:
    with pytest.raises(ValueError, match="do not match"):
        CCAMerge(make_model, CALIBRATION, calibration_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one tensor"):
        CCAMerge(make_model, [CALIBRATION[:8]], calibration_labels=torch.zeros(8, dtype=torch.long))
