"""CCAMerge's per-round choice among candidate merges on held-out public data (FedAvg is the baseline)."""

from __future__ import annotations

import math

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg

import fedcca.flower.round_statistics
import fedcca.merging.merger
import fedcca.merging.selection
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.strategy import FEDERATED_SEARCH, CCAMerge
from fedcca.merging.config import MergeConfig, MergeSearch
from tests.tiny_clients import CALIBRATION, HELD_OUT, fedavg_app, make_model, stats_app, teacher_labels, train_messages
from tests.tiny_models import calibration

NODES = (1, 2, 3)
GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
HOLDOUT = (HELD_OUT, teacher_labels(HELD_OUT))


def _round(strategy: CCAMerge, app=stats_app) -> tuple[list[Message], ArrayRecord | None]:  # noqa: ANN001
    grid = InProcessGrid({node: app for node in NODES})
    replies = list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))
    return replies, strategy.aggregate_train(1, replies)[0]


@pytest.mark.parametrize("app", [stats_app, fedavg_app])
def test_zero_shrinkage_reproduces_fedavg(app) -> None:  # noqa: ANN001
    """a = 0: no transform at all, so CCAMerge's weights are FedAvg's (float tolerance; weights uncapped)."""
    strategy = CCAMerge(make_model, CALIBRATION, MergeConfig("cca", shrinkage=0.0, recompute_bn=False), device="cpu",
                        max_weight_ratio=math.inf)
    replies, arrays = _round(strategy, app)
    expected, _ = FedAvg().aggregate_train(1, replies)
    assert arrays is not None and expected is not None
    merged, fedavg = arrays.to_torch_state_dict(), expected.to_torch_state_dict()
    for key, value in fedavg.items():
        if key != "bn2.num_batches_tracked":  # FedAvg averages the integer counter into a float
            torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7, msg=key)


def _different_replies() -> list[Message]:
    """Three clients trained a few steps from independent initialisations (they differ a lot)."""
    grid = InProcessGrid({node: stats_app for node in NODES})
    messages = []
    for node in NODES:
        messages += train_messages(ArrayRecord(make_model(seed=10 + node).state_dict()), [node], compute_stats=False)
    return list(grid.send_and_receive(messages))


def _search_strategy(holdout: tuple[torch.Tensor, torch.Tensor], min_z: float = 2.0) -> CCAMerge:
    search = MergeSearch(MergeConfig("permute", zero_dead=False, fold_bn=False), (("shrinkage", (0.0, 1.0)),), min_z=min_z)
    return CCAMerge(make_model, CALIBRATION, search, holdout=holdout, reference="largest", stats="server",
                    device="cpu", min_train_nodes=2, max_weight_ratio=math.inf)


def _merge_of(replies: list[Message], config: MergeConfig) -> torch.nn.Module:
    # Uncapped: with the tiny clients' 30/40/50 claims capped at the median, the two merges
    # disagree on too few images for the test.
    strategy = CCAMerge(make_model, CALIBRATION, config, reference="largest", stats="server", device="cpu",
                        min_train_nodes=2, max_weight_ratio=math.inf)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    return model.eval()


@pytest.mark.parametrize("favoured", ["aligned", "plain"])
def test_the_choice_follows_the_held_out_labels(favoured: str) -> None:
    """Held-out images where the two candidates disagree, labelled as one of them predicts: it wins."""
    replies, images = _different_replies(), calibration(3000, seed=77)
    aligned = _merge_of(replies, MergeConfig("permute", zero_dead=False, fold_bn=False))
    plain = _merge_of(replies, MergeConfig("permute", zero_dead=False, fold_bn=False, shrinkage=0.0))
    with torch.no_grad():
        disagree = aligned(images).argmax(1) != plain(images).argmax(1)
        held_out = images[disagree]
        labels = (aligned if favoured == "aligned" else plain)(held_out).argmax(dim=1)
    assert len(held_out) >= 20
    strategy = _search_strategy((held_out, labels))
    arrays, _ = strategy.aggregate_train(1, replies)
    record = strategy.rounds[-1]
    assert record.merge_choice == ("permute" if favoured == "aligned" else "direct")
    assert [score.chosen for score in record.candidates] == [favoured == "plain", favoured == "aligned"]
    chosen = aligned if favoured == "aligned" else plain
    for key, value in chosen.state_dict().items():
        torch.testing.assert_close(arrays.to_torch_state_dict()[key], value, msg=key)
    json.dumps(record.to_json())  # the ServerApp writes it to history.json


def test_statistics_read_only_the_calibration_set_and_the_choice_only_the_held_out_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[torch.Tensor]] = {"statistics": [], "choice": []}
    collect, logits = fedcca.merging.merger.collect_statistics, fedcca.merging.selection.holdout_logits

    def spy_collect(reference, models, calibration, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["statistics"] += list(calibration)
        return collect(reference, models, calibration, *args, **kwargs)

    def spy_logits(model, inputs, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen["choice"].append(inputs)
        return logits(model, inputs, **kwargs)

    for module in (fedcca.merging.merger, fedcca.flower.round_statistics):
        monkeypatch.setattr(module, "collect_statistics", spy_collect)
    monkeypatch.setattr(fedcca.merging.selection, "holdout_logits", spy_logits)
    strategy = CCAMerge(make_model, CALIBRATION, FEDERATED_SEARCH, holdout=HOLDOUT, stats="server", device="cpu")
    _, arrays = _round(strategy)
    assert arrays is not None
    assert seen["statistics"] and all(torch.equal(batch, CALIBRATION) for batch in seen["statistics"])
    # round 1 ("auto"): the reference is the reply most accurate on the hold-out set (one read per reply)
    assert len(seen["choice"]) == len(FEDERATED_SEARCH.candidates()) + len(NODES)
    assert all(inputs is HOLDOUT[0] for inputs in seen["choice"])
    assert len(strategy.rounds[-1].candidates) == len(FEDERATED_SEARCH.candidates())


def test_a_search_needs_held_out_data() -> None:
    with pytest.raises(ValueError, match="needs labelled holdout data"):
        CCAMerge(make_model, CALIBRATION, FEDERATED_SEARCH)
    with pytest.raises(ValueError, match="holdout must be"):
        CCAMerge(make_model, CALIBRATION, FEDERATED_SEARCH, holdout=(HELD_OUT, torch.zeros(3)))
    assert CCAMerge(make_model, CALIBRATION, holdout=HOLDOUT).search is FEDERATED_SEARCH  # the default with labels
