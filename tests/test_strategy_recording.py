"""RecordRounds: round records, progress, history.json and accuracy.png around any strategy, through Flower's loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.recording import RecordRounds
from fedcca.flower.records import RoundRecord
from fedcca.flower.strategy import CCAMerge
from tests.tiny_clients import CALIBRATION, HELD_OUT, fedavg_app, make_model, teacher_labels

NODES = (1, 2, 3)


def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        accuracy = (model.eval()(HELD_OUT).argmax(1) == teacher_labels(HELD_OUT)).float().mean().item()
    return MetricRecord({"accuracy": accuracy, "round-seen": server_round})


@pytest.mark.parametrize("inner", ["fedavg", "fedprox", "cca"])
def test_any_strategy_is_recorded_through_flowers_own_loop(inner: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    common = {"fraction_evaluate": 0.0, "min_train_nodes": 3, "min_available_nodes": 3}
    strategy = {"fedavg": lambda: FedAvg(**common), "fedprox": lambda: FedProx(proximal_mu=0.1, **common),
                "cca": lambda: CCAMerge(make_model, CALIBRATION, reference="global", **common)}[inner]()
    recorded = RecordRounds(strategy, tmp_path / "run", title=f"{inner} on tiny")
    grid = InProcessGrid({node: fedavg_app for node in NODES})
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = recorded.start(grid, ArrayRecord(make_model(seed=1).state_dict()), num_rounds=2,
                                evaluate_fn=_evaluate)
    assert [r.round for r in recorded.rounds] == [1, 2]
    for record in recorded.rounds:
        assert record.num_sent == 3 and record.num_valid == 3 and not record.skipped
        assert record.bytes_sent > 0 and sorted(record.bytes_received) == list(NODES)
        assert record.metrics["round-seen"] == record.round and 0 <= record.metrics["accuracy"] <= 1
        assert "client_train_loss" in record.metrics
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["strategy"] == f"{inner} on tiny" and history["initial"]["round-seen"] == 0
    assert [entry["round"] for entry in history["rounds"]] == [1, 2]
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Received 3 results and 0 failures" in caplog.text  # Flower's own line, CCAMerge included
    assert "[fedcca] round 2/2: accuracy" in caplog.text and "ETA" in caplog.text
    if inner == "cca":  # the strategy's own details are the record completed, not a second one
        assert recorded.rounds[-1] is strategy.rounds[-1] and recorded.rounds[-1].merge_choice is not None
    assert result.arrays is not None


def test_files_are_rewritten_after_every_round(tmp_path: Path) -> None:
    """A run stopped after round 1 has round 1 on disk (the files are not written only at the end)."""
    seen: list[int] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 2:
            seen.extend(e["round"] for e in json.loads((tmp_path / "history.json").read_text())["rounds"])
        return _evaluate(server_round, arrays)

    recorded = RecordRounds(FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), tmp_path)
    recorded.start(InProcessGrid({node: fedavg_app for node in NODES}),
                   ArrayRecord(make_model(seed=1).state_dict()), num_rounds=2, evaluate_fn=evaluate)
    assert seen == [1]


def test_dead_features_are_reported_per_client_not_summed() -> None:
    record = RoundRecord(1, dead_features={1: {"fc1": 3}, 2: {"fc1": 5, "conv1": 1}, 3: {"fc1": 3}})
    assert record.dead_summary() == {"fc1": "3-5", "conv1": "0-1"}  # 11 summed would read as 11 of fc1's units


def test_a_run_where_no_round_produced_a_model_reports_the_initial_one(tmp_path: Path) -> None:
    def crashing(message, context):  # noqa: ANN001, ANN202
        raise RuntimeError("client down")

    initial = ArrayRecord(make_model(seed=1).state_dict())
    recorded = RecordRounds(FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), tmp_path)
    result = recorded.start(InProcessGrid({node: crashing for node in NODES}), initial, num_rounds=1,
                            evaluate_fn=_evaluate)
    assert recorded.rounds[-1].skipped and recorded.rounds[-1].num_valid == 0
    for key, value in initial.to_torch_state_dict().items():
        assert torch.equal(result.arrays.to_torch_state_dict()[key], value)


def test_a_second_run_into_the_same_folder_goes_to_a_fresh_one(tmp_path: Path) -> None:
    """RecordRounds(out_dir) started twice on one folder replaced the first history on main."""
    def run(out: Path) -> RecordRounds:
        recorded = RecordRounds(FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), out)
        recorded.start(InProcessGrid({node: fedavg_app for node in NODES}),
                       ArrayRecord(make_model(seed=1).state_dict()), num_rounds=1, evaluate_fn=_evaluate)
        return recorded

    run(tmp_path / "run")
    first = (tmp_path / "run" / "history.json").read_bytes()
    assert run(tmp_path / "run").out_dir == tmp_path / "run-2"
    assert (tmp_path / "run" / "history.json").read_bytes() == first and (tmp_path / "run-2" / "history.json").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run(tmp_path / "file" / "run")


def test_a_resumed_start_continues_the_round_numbers() -> None:
    """start(first_round=3): the wrapped strategy, evaluate_fn, the records and on_round see rounds 3 and 4; the
    initial model is not evaluated again."""
    seen: dict[str, list[int]] = {"configure": [], "evaluate": [], "on_round": []}

    class Spy(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
            seen["configure"].append(server_round)
            return super().configure_train(server_round, arrays, config, grid)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        seen["evaluate"].append(server_round)
        return _evaluate(server_round, arrays)

    recorded = RecordRounds(Spy(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3))
    recorded.start(InProcessGrid({node: fedavg_app for node in NODES}), ArrayRecord(make_model(seed=1).state_dict()),
                   num_rounds=2, evaluate_fn=evaluate, first_round=3,
                   on_round=lambda record, arrays: seen["on_round"].append(record.round))
    assert seen == {"configure": [3, 4], "evaluate": [3, 4], "on_round": [3, 4]}
    assert [r.round for r in recorded.rounds] == [3, 4] and recorded.initial is None
