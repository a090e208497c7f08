"""Smoke test of simulations/oneshot_fl.py on the tiny dataset: clients trained once, every strategy's
own aggregate_train on the same replies, the ensemble beside them, a rerun that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_dataset import run_benchmark

STRATEGIES = ["fedavg", "cca", "feddf+distill-teacher=logits", "cca+distill=true",
              "cca+distill=true+distill-teacher=label-counts|fitted"]
ARGUMENTS = ["--splits", "dirichlet:0.5", "--seeds", "0", "--clients", "2", "--max-examples-per-client", "0",
             "--strategies", ",".join(STRATEGIES), "--threads", "1",
             "--set", "local-epochs=1", "--set", "calibration-size=20", "--set", "holdout-size=10",
             "--set", "batch-size=25", "--set", "model='cnn'", "--set", "distill-steps=4", "--set", "min-nodes=2"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    return run_benchmark(tmp_path_factory.mktemp("oneshot-fl"), "simulations.oneshot_fl", ARGUMENTS, timeout=240)


def test_every_strategy_merged_the_same_replies(result: tuple[dict, Path]) -> None:
    payload, folder = result
    (run,) = payload["runs"]
    assert list(run["strategies"]) == STRATEGIES and len(run["clients"]) == 2
    assert 0.0 <= run["ensemble"] <= 1.0 and 0.0 <= run["ensemble_logits"] <= 1.0
    cca = run["strategies"]["cca"]
    assert cca["reference"] in (1, 2)  # round 1 of "auto": a client, not the untrained global model
    assert sum(c["chosen"] for c in cca["candidates"]) == 1
    for label in ("feddf+distill-teacher=logits", "cca+distill=true"):
        distillation = run["strategies"][label]["distillation"]
        assert distillation["holdout_after"] >= distillation["holdout_before"]
    assert {t["teacher"] for t in run["strategies"]["feddf+distill-teacher=logits"]["distillation"]["trials"]} \
        == {"logits"}
    assert {t["teacher"] for t in run["strategies"][STRATEGIES[-1]]["distillation"]["trials"]} \
        == {"label-counts", "fitted"}
    assert 0.0 <= run["ensemble_label_counts"] <= 1.0 and 0.0 <= run["ensemble_fitted"] <= 1.0
    assert "DENSE" in (folder / "oneshot_fl.md").read_text() and "fitted teacher" in (folder / "oneshot_fl.md").read_text()


def test_a_rerun_with_another_setting_is_refused(result: tuple[dict, Path]) -> None:
    """Resuming would mix two settings' runs in one table."""
    _, folder = result
    changed = [a if a != "local-epochs=1" else "local-epochs=2" for a in ARGUMENTS]
    with pytest.raises(AssertionError, match="holds runs of setting"):
        run_benchmark(folder.parent, "simulations.oneshot_fl", changed, timeout=120)
