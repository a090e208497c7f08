"""Smoke test of simulations/cost.py: cnn at K=2,4, a tiny dataset (a subprocess, as a user runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_dataset import run_benchmark

STRATEGIES = ["fedavg", "cca+shrinkage='1'+repair=none", "cca", "cca:global:server"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Run the CLI once on the tiny dataset; return its JSON and output folder."""
    return run_benchmark(tmp_path_factory.mktemp("cost"), "simulations.cost", [
        "--models", "cnn:0.5:2,4", "--strategies", ",".join(STRATEGIES), "--repeats", "1",
        "--calibration-size", "20", "--holdout-size", "10", "--local-steps", "1", "--client-examples", "20",
        "--threads", "1", "--profile"], timeout=240)


def test_aggregation_rows(result: tuple[dict, Path]) -> None:
    payload, _ = result
    (model,) = payload["models"]
    assert model["model"] == "cnnx0.5" and [row["num_clients"] for row in model["aggregation"]] == [2, 4]
    for row in model["aggregation"]:
        assert list(row["strategies"]) == STRATEGIES
        for entry in row["strategies"].values():
            assert len(entry["seconds"]) == 1 and entry["min_seconds"] == entry["seconds"][0] > 0
            # memory in MiB (a unit slip to KiB or bytes would exceed this for any model), BatchNorm time timed apart
            assert 0 <= entry["rss_peak_growth_mib"] < 1024 and 0 <= entry["bn_seconds"] <= 60
            assert 0 <= entry["stream_rss_peak_growth_mib"] < 1024
            # the time after the last streamed reply is part of the streamed aggregation's own time
            assert 0 < entry["finish_seconds"] <= entry["stream_seconds"] + 1e-3
        base = row["strategies"]["fedavg"]["min_seconds"]
        for label, ratio in row["ratio_to_fedavg"].items():
            assert ratio == pytest.approx(row["strategies"][label]["min_seconds"] / base)


def test_statistics_forward_and_bytes(result: tuple[dict, Path]) -> None:
    payload, folder = result
    (model,) = payload["models"]
    stats = model["statistics"]
    assert stats["client_forward_seconds"] > 0 and stats["client_ratio"] > 0 and stats["server_models"] == 2
    # cnn x0.5: 16, 32, 64 features; the client's triangle and cross block in float32.
    assert 0 < model["bytes_per_client"]["statistics"] < model["bytes_per_client"]["weights"]
    assert model["client"]["train_seconds"] > 0 and model["client"]["stats_seconds"] > 0
    assert (folder / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "server stats / (K+1) forwards" in (folder / "cost.md").read_text()


def test_profile_names_where_the_time_goes(result: tuple[dict, Path]) -> None:
    payload, folder = result
    for row in payload["models"][0]["aggregation"]:
        assert "profile" not in row["strategies"]["fedavg"]
        for label in STRATEGIES[1:]:
            profile = row["strategies"][label]["profile"]
            seconds = [entry["seconds"] for entry in profile]
            assert profile and seconds == sorted(seconds, reverse=True)
            assert all(entry["function"].startswith("fedcca.") and 0 < entry["share"] <= 1.0 for entry in profile)
    assert "spends its time" in (folder / "cost.md").read_text()


def test_client_alignment_cost_rows_and_profile(tmp_path: Path) -> None:
    """simulations/client_alignment_cost.py: FedAvg and the client-side `cca` row, each reply's bytes, and the
    profile of the client-side aggregation naming its fedcca functions (slowest first)."""
    payload, folder = run_benchmark(tmp_path, "simulations.client_alignment_cost", [
        "--model", "cnn", "--width", "0.5", "--clients", "3", "--local-steps", "1", "--client-examples", "20",
        "--calibration-size", "20", "--holdout-size", "10",
        "--repeats", "3", "--strategies", "client cca", "--threads", "1", "--profile"], timeout=240)
    assert list(payload["strategies"]) == ["fedavg", "client cca"]
    base, client = payload["strategies"]["fedavg"], payload["strategies"]["client cca"]
    assert base["aggregate_seconds"] > 0 and client["aggregate_seconds"] > 0 and client["client_seconds"] > 0
    for entry in (base, client):  # the minimum and the median of the same repeats
        assert 0 < entry["aggregate_seconds"] <= entry["aggregate_seconds_median"]
    # one aligned candidate: the reply is the aligned weights plus a few targets, about FedAvg's bytes
    assert base["reply_bytes"] <= client["reply_bytes"] < 1.1 * base["reply_bytes"]
    seconds = [row["seconds"] for row in client["profile"]]
    assert seconds and seconds == sorted(seconds, reverse=True)
    assert client["profile"][0]["function"] == "fedcca.flower.summed.run"  # the client-side round, top of the list
    assert "where aggregate_train's time goes" in (folder / "client_alignment_cost.md").read_text()
