"""simulations.paired_rounds: runs of different results files paired by seed, per round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from simulations import paired_rounds


def _write(path: Path, runs: list[tuple[str, int, list[float]]]) -> Path:
    path.write_text(json.dumps({"settings": [{"runs": [{"strategy": s, "seed": seed, "accuracy": acc}
                                                       for s, seed, acc in runs]}]}))
    return path


def test_pairs_by_seed_and_reports_rounds_to_the_target(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [("fedavg", 0, [0.1, 0.2, 0.4, 0.5]), ("fedavg", 1, [0.1, 0.3, 0.4, 0.6]),
                                     ("fedavg", 2, [0.1, 0.2, 0.5, 0.55]), ("cca", 0, [0.1, 0.9, 0.9, 0.9])])
    b = _write(tmp_path / "b.json", [("fedavg", 2, [0.1, 0.6, 0.6, 0.7]), ("fedavg", 0, [0.1, 0.5, 0.6, 0.6]),
                                     ("fedavg", 1, [0.1, 0.4, 0.5, 0.62]), ("fedavg", 7, [0.1, 0.0, 0.0, 0.0])])
    base, other = paired_rounds.load_curves(a, "fedavg"), paired_rounds.load_curves(b, "fedavg")
    assert sorted(base) == [0, 1, 2] and 7 in other
    result = paired_rounds.paired(other, base, 3)
    x, y = np.array([0.5, 0.4, 0.6]), np.array([0.2, 0.3, 0.2])  # round 1, seeds 0, 1, 2 (seed 7 unpaired)
    assert result[0]["seeds"] == 3 and result[0]["mean"] == pytest.approx((x - y).mean())
    assert result[0]["p"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
    text = paired_rounds.main(["--run", f"base={a}:fedavg", "--run", f"new-one={b}:fedavg",
                               "--pair", "new-one-base", "--target", "base@3", "--rounds", "3",
                               "--out", str(tmp_path / "out.md")])
    target = np.mean([0.5, 0.6, 0.55])
    assert f"rounds to {100 * target:.1f}% (base @ 3)" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert rows["base"].endswith("| 3 |")  # its own round-3 mean is the target
    # a run's mean curve is over all its seeds (7 too): at round 3 (0.6 + 0.62 + 0.7 + 0) / 4 < 0.55
    assert rows["new-one"].endswith("| > 3 |")
    assert (tmp_path / "out.md").read_text() == text and "Command: `python -m simulations.paired_rounds --run" in text


def test_malformed_requests_are_named(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", [("fedavg", 0, [0.1, 0.2]), ("fedavg", 0, [0.1, 0.3])])
    with pytest.raises(ValueError, match="two runs of 'fedavg' with seed 0"):
        paired_rounds.load_curves(a, "fedavg")
    with pytest.raises(ValueError, match="no run of strategy 'cca'"):
        paired_rounds.load_curves(a, "cca")
    b = _write(tmp_path / "b.json", [("fedavg", 0, [0.1, 0.2]), ("fedavg", 1, [0.1, 0.3])])
    with pytest.raises(ValueError, match="fewer than 3 rounds"):
        paired_rounds.main(["--run", f"x={b}:fedavg", "--rounds", "3"])
    with pytest.raises(ValueError, match="expected NAME_A-NAME_B"):
        paired_rounds.main(["--run", f"x={b}:fedavg", "--pair", "x-y", "--rounds", "1"])
    with pytest.raises(ValueError, match="expected LEFT=RIGHT"):
        paired_rounds.main(["--run", f"{b}:fedavg", "--rounds", "1"])
