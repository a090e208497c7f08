"""The fedcca ServerApp on an in-process grid: outputs, strategies, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcca.app.federation import evaluation_loader, load_data, make_model
from fedcca.app.task import TaskConfig
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.strategy import CCAMerge
from fedcca.training import evaluate
from server.server_app import app as server_app
from server.server_app import build_strategy, run_federation
from tests.tiny_dataset import client_grid, tiny_run_config


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir: Path) -> Path:
    return tiny_data_dir


def _run(config: dict[str, Any]) -> tuple[dict[str, Any], InProcessGrid]:
    grid = client_grid(config)
    return run_federation(grid, config), grid


def _checkpoint(out_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, InProcessGrid]:
    """Two uninterrupted CCA rounds through ``server_app`` (as Flower calls it): (config, out-dir, grid)."""
    root = tmp_path_factory.mktemp("straight")
    config = tiny_run_config(data_dir, root / "{strategy}")
    grid = client_grid(config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return config, root / "cca", grid


def test_cca_run_writes_history_checkpoints_and_plot(straight_run: tuple[dict[str, Any], Path, InProcessGrid]) -> None:
    config, out, grid = straight_run
    history = json.loads((out / "history.json").read_text())
    assert [entry["round"] for entry in history["rounds"]] == [1, 2]
    for entry in history["rounds"]:
        assert 0.0 <= entry["accuracy"] <= 1.0 and np.isfinite(entry["loss"])
        assert not entry["skipped"] and entry["num_replies"] == 2 and entry["num_dropped"] == 0
        assert set(entry["bytes_received"]) == {"1", "2"} and min(entry["bytes_received"].values()) > 0
        assert entry["merge_seconds"] > entry["stats_seconds"] > 0
    first, second = history["rounds"]
    # Round 1 (reference "auto"): the largest client is the reference, the server computes statistics.
    assert first["reference"] in (1, 2) and first["client_statistics"] == 0
    # Round 2: aligned to the global model; both clients sent statistics, the server measured only
    # the global model's own moments (one pass), within the merge.
    assert second["reference"] == "global" and second["client_statistics"] == 2
    assert second["client_stats_seconds"] > 0
    # The checkpoint of the last round is the model whose accuracy the history reports.
    task = TaskConfig.from_run_config(config)
    model = make_model(task, load_data(task.dataset, task.data_dir))
    model.load_state_dict(_checkpoint(out, 2))
    loss, accuracy = evaluate(model, evaluation_loader(task, torch.device("cpu")), device="cpu")
    assert accuracy == history["rounds"][-1]["accuracy"] and loss == pytest.approx(history["rounds"][-1]["loss"])
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # atomic writes left nothing behind
    asked = {(m.content["config"]["server-round"], m.content["config"]["fedcca.compute-statistics"]) for m in grid.sent}
    assert asked == {(1, False), (2, True)}


def test_fedavg_is_flowers_weighted_average_of_the_client_models(data_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(data_dir, tmp_path, strategy="fedavg", num_server_rounds=1)
    task = TaskConfig.from_run_config(config)
    assert type(build_strategy(task, lambda: None)) is FedAvg  # type: ignore[arg-type,return-value]
    history, grid = _run(config)
    # Replay the round's messages through the (deterministic) ClientApps and average by hand.
    replies = client_grid(config).send_and_receive(grid.sent)
    assert all("fedcca.statistics" not in r.content for r in replies)
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    states = [r.content["arrays"].to_torch_state_dict() for r in replies]
    for key, value in _checkpoint(tmp_path, 1).items():
        expected = sum(w * s[key].double() for w, s in zip(weights, states)) / weights.sum()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    assert history["rounds"][0]["stats_seconds"] == 0.0 and "accuracy" in history["rounds"][0]


def test_client_side_alignment_through_the_apps(data_dir: Path, tmp_path: Path) -> None:
    """``alignment = "client"``: round 2's clients align themselves (the real ClientApp) and the server sums."""
    config = tiny_run_config(data_dir, tmp_path, alignment="client")
    history, grid = _run(config)
    first, second = history["rounds"]
    assert first["reference"] in (1, 2) and not first["skipped"]
    assert second["reference"] == "global" and second["client_statistics"] == 0 and second["num_dropped"] == 0
    assert second["merge_choice"] and second["candidates"]
    asked = {m.content["config"]["server-round"]: "fedcca.align-to-global" in m.content["config"] for m in grid.sent}
    assert asked == {1: False, 2: True}


@pytest.mark.parametrize("strategy", ["permute", "weight-matching"])
def test_other_methods_build_ccamerge(data_dir: Path, tmp_path: Path, strategy: str) -> None:
    config = tiny_run_config(data_dir, tmp_path, strategy=strategy)
    task = TaskConfig.from_run_config(config)
    dataset = load_data(task.dataset, task.data_dir)
    built = build_strategy(task, lambda: make_model(task, dataset), "cpu")
    assert isinstance(built, CCAMerge) and built.search.base.method == strategy
    assert built.search == task.merge_search()  # the run config's merge options, as one MergeSearch


def test_fedprox_is_flowers_with_the_run_configs_mu(data_dir: Path, tmp_path: Path) -> None:
    config = tiny_run_config(data_dir, tmp_path, strategy="fedprox", num_server_rounds=1)
    built = build_strategy(TaskConfig.from_run_config(config), lambda: None)  # type: ignore[arg-type,return-value]
    assert type(built) is FedProx and built.proximal_mu == config["proximal-mu"]
    history, grid = _run(config)
    assert {m.content["config"]["proximal-mu"] for m in grid.sent} == {config["proximal-mu"]}
    assert not history["rounds"][0]["skipped"]


def test_resume_gives_the_same_model_as_an_uninterrupted_run(
    straight_run: tuple[dict[str, Any], Path, InProcessGrid], tmp_path: Path
) -> None:
    config, straight_out, _ = straight_run
    straight = json.loads((straight_out / "history.json").read_text())
    # resume=true on an empty out-dir starts afresh; then 1 more round is resumed.
    interrupted = {**config, "out-dir": str(tmp_path), "num-server-rounds": 1, "resume": True}
    assert [entry["round"] for entry in _run(interrupted)[0]["rounds"]] == [1]
    resumed, _ = _run({**interrupted, "num-server-rounds": 2})
    for key, value in _checkpoint(straight_out, 2).items():
        assert torch.equal(value, _checkpoint(tmp_path, 2)[key]), key
    for got, want in zip([resumed["initial"], *resumed["rounds"]], [straight["initial"], *straight["rounds"]]):
        assert (got["accuracy"], got["loss"]) == (want["accuracy"], want["loss"])


def test_resume_refuses_a_different_config(straight_run: tuple[dict[str, Any], Path, InProcessGrid]) -> None:
    config, out, _ = straight_run
    with pytest.raises(ValueError, match=r"differs \(lr: 0.05 -> 0.1"):
        _run({**config, "out-dir": str(out), "num-server-rounds": 3, "resume": True, "lr": 0.1})


def test_a_new_run_never_overwrites_an_earlier_one(data_dir: Path, tmp_path: Path) -> None:
    """resume = false into a folder holding a run: the new run goes to '<out-dir>-2', the old one is untouched."""
    config = tiny_run_config(data_dir, tmp_path / "run", strategy="fedavg", num_server_rounds=2)
    _run(config)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    _run({**config, "num-server-rounds": 1})
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    second = json.loads((tmp_path / "run-2" / "history.json").read_text())
    assert [entry["round"] for entry in second["rounds"]] == [1]


def _interrupted_run(data_dir: Path, out: Path) -> dict[str, Any]:
    config = tiny_run_config(data_dir, out, strategy="fedavg", num_server_rounds=2, resume=True)
    _run(config)
    return config


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "nan", "wrong shape", "float64 1e300"])
def test_resume_falls_back_to_the_newest_usable_checkpoint(data_dir: Path, tmp_path: Path, damage: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    config = _interrupted_run(data_dir, tmp_path)
    last = tmp_path / "checkpoints" / "round-002.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:100])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "missing":
        last.unlink()
    else:
        checkpoint = torch.load(last, weights_only=True)
        key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
        value = checkpoint["state_dict"][key]
        checkpoint["state_dict"][key] = (value.fill_(float("nan")) if damage == "nan" else
                                         value.double().fill_(1e300) if damage == "float64 1e300" else
                                         value.reshape(-1)[:1])
        torch.save(checkpoint, last)
    with caplog.at_level(logging.WARNING):
        history, _ = _run({**config, "num-server-rounds": 3})
    assert [entry["round"] for entry in history["rounds"]] == [1, 2, 3]  # round 2 recomputed from round 1's model
    assert any("resuming after round 1" in r.getMessage() and "round-002.pt" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize(("content", "words"), [("{not json", "not readable JSON"),
                                                ('{"rounds": []}', "lacks 'run_config'"),
                                                ('{"run_config": {}, "initial": {}, "rounds": [1, 2]}', "")])
def test_resume_names_a_broken_history(data_dir: Path, tmp_path: Path, content: str, words: str) -> None:
    config = _interrupted_run(data_dir, tmp_path)
    if not words:  # rounds that are not dicts (an AttributeError traceback on main)
        history = json.loads((tmp_path / "history.json").read_text())
        content = json.dumps({**history, "rounds": [1, 2]})
        words = "rounds are not 1..2"
    (tmp_path / "history.json").write_text(content)
    with pytest.raises(ValueError, match=words) as error:
        _run({**config, "num-server-rounds": 3})
    assert "history.json" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"partitioning": "label-quantity", "labels-per-client": 11}, "'labels-per-client' = 11, but fashion-mnist has 10"),
    ({"holdout-size": 500}, "'calibration-size' = 20 and 'holdout-size' = 500 do not fit"),
    ({"seed": -1}, "'seed' must be >= 0"),
])
def test_an_infeasible_split_is_refused_at_start_naming_the_key(data_dir: Path, tmp_path: Path,
                                                                 overrides: dict, words: str) -> None:
    from fedcca.app.task import RunConfigError  # pylint: disable=import-outside-toplevel

    config = tiny_run_config(data_dir, tmp_path / "out", **overrides)
    with pytest.raises(RunConfigError, match=words.replace("(", r"\(")):
        run_federation(client_grid(config), config)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_an_out_dir_that_is_a_file_is_refused_before_round_1(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    config = tiny_run_config(data_dir, tmp_path / "taken", strategy="fedavg")
    grid = client_grid(config)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_federation(grid, config)
