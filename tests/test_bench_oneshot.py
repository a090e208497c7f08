"""Smoke test of the one-shot benchmark script: JSON shape and PNG (tiny data, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from simulations import oneshot


def test_oneshot_writes_rows_and_plot(tmp_path: Path, tiny_data_dir: Path) -> None:
    out = tmp_path / "res.json"
    result = oneshot.main([
        "--num-models", "2", "--epochs", "1", "--split", "same", "--methods", "direct,permute,cca-trace",
        "--seeds", "0", "--train-subset", "100", "--calibration-size", "10", "--test-subset", "40",
        "--data-dir", str(tiny_data_dir),
        "--threads", "1", "--zoo-dir", str(tmp_path / "zoo"), "--cache", "", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    methods = {row["method"] for row in saved["rows"]}
    assert methods == {"direct", "permute", "cca-trace", "ensemble", "base-average"}
    for row in saved["rows"]:
        assert row["num_models"] == 2 and row["seeds"] == [0]
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0
    cca = next(row for row in saved["rows"] if row["method"] == "cca-trace")
    # picked on held-out data; the Procrustes limit is written "inf" (standard JSON has no infinity)
    assert float(cca["chosen"][0]["ridge"]) in dict(oneshot.VARIANTS["cca-trace"].grid)["ridge"]
    assert saved["config"]["methods"] == ["direct", "permute", "cca-trace"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "zoo").glob("*.pt"))) == 2  # K checkpoints cached
