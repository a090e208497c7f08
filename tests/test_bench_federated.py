"""Smoke test of simulations/federated.py: 2 clients, 2 rounds, a tiny dataset, all strategies,
through the ServerApp's own round loop (a subprocess, as a user runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.federated import rounds_to_reach, summarise
from simulations.harness import StrategySpec
from tests.tiny_dataset import run_benchmark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STRATEGIES = ["fedavg", "cca", "cca:global:server", "permute:largest:server+shrinkage='1'+repair=none", "fedprox"]


def _arguments(strategies: list[str], rounds: int = 2) -> list[str]:
    return ["--partitioning", "dirichlet", "--alpha", "1.0",
            "--local-epochs", "1", "--strategies", ",".join(strategies), "--rounds", str(rounds),
            "--num-clients", "2", "--seeds", "0", "--train-subset", "0", "--calibration-size", "20",
            "--holdout-size", "10", "--test-examples", "0", "--set", "batch-size=25", "--set", "model='cnn'",
            "--threads", "1"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Run the CLI once on the tiny dataset; return its JSON and output folder."""
    return run_benchmark(tmp_path_factory.mktemp("federated"), "simulations.federated", [
        *_arguments(STRATEGIES), "--runs-dir", str(tmp_path_factory.mktemp("federated-runs"))], timeout=180)


def test_fedavg_runs_are_taken_from_an_earlier_file_of_the_same_setting_only(
        result: tuple[dict, Path], tmp_path: Path) -> None:
    """--baseline-from pairs new runs with FedAvg's earlier ones (nothing is run here); another setting is refused."""
    payload, folder = result
    earlier = folder / "federated.json"
    reused, _ = run_benchmark(tmp_path / "same", "simulations.federated", [
        *_arguments(["fedavg"]), "--baseline-from", str(earlier), "--report-only"], timeout=120)
    (setting,) = reused["settings"]
    assert setting["runs"] == [run for run in payload["settings"][0]["runs"] if run["strategy"] == "fedavg"]
    assert reused["baseline_from"]["command"] == payload["command"]
    with pytest.raises(AssertionError, match="ran another setting .num_server_rounds differ"):
        run_benchmark(tmp_path / "other", "simulations.federated", [
            *_arguments(["fedavg"], rounds=3), "--baseline-from", str(earlier), "--report-only"], timeout=120)


def test_json_shape_and_plot(result: tuple[dict, Path]) -> None:
    payload, folder = result
    assert payload["config"]["strategies"] == STRATEGIES
    (setting,) = payload["settings"]
    assert setting["local_epochs"] == 1 and setting["partitioning"] == "dirichlet"
    assert list(setting["summary"]) == STRATEGIES
    assert sorted(run["strategy"] for run in setting["runs"]) == sorted(STRATEGIES)
    for run in setting["runs"]:
        assert len(run["accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in run["accuracy"])
        assert run["accuracy"] == setting["summary"][run["strategy"]]["mean_accuracy"]  # one seed
    for plot in setting["plots"]:
        assert (folder / plot).read_bytes()[:8] == PNG_MAGIC
    assert len(setting["plots"]) == 2  # accuracy, and the paired difference to FedAvg
    assert (folder / "federated.md").read_text().count("| cca |") == 1


def test_merge_choices_are_recorded_per_round(result: tuple[dict, Path]) -> None:
    runs = {run["strategy"]: run for run in result[0]["settings"][0]["runs"]}
    assert len(runs["cca"]["merge_choice"]) == 2 and all(runs["cca"]["merge_choice"])
    assert runs["permute:largest:server+shrinkage='1'+repair=none"]["merge_choice"] == ["permute", "permute"]
    assert runs["fedavg"]["merge_choice"] == [None, None]


def test_same_start_and_the_product_did_the_work(result: tuple[dict, Path]) -> None:
    runs = {run["strategy"]: run for run in result[0]["settings"][0]["runs"]}
    # One seed: every strategy starts from the same initial model.
    assert len({run["accuracy"][0] for run in runs.values()}) == 1
    # Our ClientApp computed statistics only when CCAMerge asked it to (client stats, global
    # reference: from round 2 under "auto"); otherwise the strategy computed them on the server.
    first, second = runs["cca"]["client_stats_seconds"]
    assert first == 0.0 and second > 0
    # With client statistics the server measures only the global model's moments, once per round.
    assert 0 < runs["cca"]["server_stats_seconds"][1] < runs["cca:global:server"]["server_stats_seconds"][1]
    for label in ("fedavg", "fedprox", "cca:global:server", "permute:largest:server+shrinkage='1'+repair=none"):
        assert runs[label]["client_stats_seconds"] == [0.0, 0.0]
    for label in ("cca:global:server", "permute:largest:server+shrinkage='1'+repair=none"):
        assert all(s > 0 for s in runs[label]["server_stats_seconds"])


def test_rounds_to_reach() -> None:
    curve = [0.1, 0.3, 0.5, 0.45]
    assert rounds_to_reach(curve, 0.45) == 2
    assert rounds_to_reach(curve, 0.3) == 1
    assert rounds_to_reach(curve, 0.6) is None
    assert rounds_to_reach([0.9, 0.2], 0.5) is None  # the initial model (round 0) does not count


def test_summary_against_hand_computation() -> None:
    runs = [{"strategy": "fedavg", "seed": 0, "accuracy": [0.1, 0.4, 0.6]},
            {"strategy": "fedavg", "seed": 1, "accuracy": [0.1, 0.2, 0.4]},
            {"strategy": "cca", "seed": 0, "accuracy": [0.1, 0.6, 0.7]},
            {"strategy": "cca", "seed": 1, "accuracy": [0.1, 0.1, 0.3]}]
    summary = summarise(runs, ["fedavg", "cca"])
    assert summary["cca"]["mean_accuracy"] == pytest.approx([0.1, 0.35, 0.5])
    assert summary["cca"]["std_accuracy"] == pytest.approx([0.0, 0.25, 0.2])
    assert summary["cca"]["rounds_to_baseline_final"] == 2  # fedavg's mean final is 0.5
    assert summary["cca"]["seed_rounds_to_baseline_final"] == {"0": 1, "1": None}


def test_strategy_spec_parsing() -> None:
    assert StrategySpec.parse("fedavg").run_config() == {"strategy": "fedavg"}
    assert StrategySpec.parse("fedprox+proximal-mu=0.1").run_config() == {"strategy": "fedprox", "proximal_mu": 0.1}
    assert StrategySpec.parse("cca") == StrategySpec("cca", "cca", "auto", "client")
    assert StrategySpec.parse("feddf+distill-teacher=logits").run_config() == {
        "strategy": "feddf", "reference": "auto", "stats": "client", "distill_teacher": "logits"}
    assert StrategySpec.parse("permute:largest") == StrategySpec("permute:largest", "permute", "largest", "client")
    spec = StrategySpec.parse("cca:largest+zero-dead=false+repair=affine+ridge=0.5")
    assert spec.overrides == (("zero-dead", False), ("repair", "affine"), ("ridge", 0.5))
    assert spec.run_config() == {"strategy": "cca", "reference": "largest", "stats": "client",
                                 "zero_dead": False, "repair": "affine", "ridge": 0.5}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        StrategySpec.parse("cca+guard")
    assert StrategySpec.parse("cca:first:server").run_config() == {
        "strategy": "cca", "reference": "first", "stats": "server"}
    for bad in ("avg", "cca:biggest", "cca:global:gpu", "cca:global:client:x"):
        with pytest.raises(ValueError, match="strategy"):
            StrategySpec.parse(bad)


def test_stress_summary_counts_collapses_both_ways_and_where_fedavg_is_healthy() -> None:
    """A collapse is a round at chance beside a FedAvg round above it; the mirrored count and the seeds
    where FedAvg never is at chance are reported beside it."""
    from simulations.stress import summarise as stress_summary

    def run(strategy: str, seed: int, accuracy: list[float]) -> dict:
        return {"split": "C1", "lr": 0.05, "local_epochs": 2, "seed": seed, "strategy": strategy,
                "accuracy": accuracy, "diverged": 0, "round1_screened": 0, "guard": []}

    runs = [run("fedavg", 0, [0.09, 0.10, 0.20, 0.30]), run("cca", 0, [0.09, 0.20, 0.10, 0.30]),
            run("fedavg", 1, [0.09, 0.50, 0.60, 0.70]), run("cca", 1, [0.09, 0.10, 0.60, 0.12])]
    rows = {row["strategy"]: row for row in stress_summary(runs)}
    cca = rows["cca"]
    assert cca["collapses"] == 3  # seed 0 round 2, seed 1 rounds 1 and 3
    assert cca["fedavg_runs_at_chance"] == 1  # seed 0's FedAvg is at chance in round 1
    assert cca["collapses_fedavg_healthy"] == 2  # seed 1 only
    assert cca["fedavg_collapses_mirrored"] == 1  # seed 0 round 1: FedAvg at chance, cca not
