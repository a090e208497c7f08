"""Smoke test of simulations/cost.py: K=2,4 clients, width 1, a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_dataset import run_benchmark

STRATEGIES = ["fedavg", "cca", "cca:global:server", "permute"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Run the CLI once on the tiny dataset; return its JSON and output folder."""
    return run_benchmark(tmp_path_factory.mktemp("cost"), "simulations.cost", [
        "--clients", "2,4", "--widths", "1", "--width-clients", "2",
        "--strategies", ",".join(STRATEGIES), "--repeats", "1", "--calibration-size", "20", "--holdout-size", "10",
        "--stats-examples", "16", "--local-steps", "1", "--client-examples", "20"], timeout=150)


def test_aggregation_rows(result: tuple[dict, Path]) -> None:
    payload, _ = result
    rows = payload["aggregation"]
    assert [(row["sweep"], row["num_clients"], row["width"]) for row in rows] == [
        ("clients", 2, 1), ("clients", 4, 1), ("width", 2, 1)]
    for row in rows:
        assert list(row["strategies"]) == STRATEGIES
        for entry in row["strategies"].values():
            assert len(entry["seconds"]) == 1 and entry["min_seconds"] == entry["seconds"][0] > 0
            assert entry["rss_peak_growth_mib"] >= 0 and entry["tracemalloc_peak_mib"] > 0
        base = row["strategies"]["fedavg"]["min_seconds"]
        for label, ratio in row["ratio_to_fedavg"].items():
            assert ratio == pytest.approx(row["strategies"][label]["min_seconds"] / base)


def test_client_costs_and_bytes(result: tuple[dict, Path]) -> None:
    payload, folder = result
    (client,) = payload["client"]
    assert client["width"] == 1 and client["num_examples"] == 20 and client["calibration_size"] == 20
    assert client["train_seconds"] > 0 and client["stats_seconds"] > 0
    # cnn width 1: 93,962 float32 parameters; statistics: float64 sums over points of 32, 64, 128 features.
    assert client["weights_bytes"] >= 93_962 * 4
    points = (32, 64, 128)
    assert client["statistics_bytes"] >= 8 * sum(3 * n * n + 2 * n + 1 for n in points)
    assert (folder / payload["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
