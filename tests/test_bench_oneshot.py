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


def test_the_zoo_cache_loads_without_unpickling_code(tmp_path: Path, tiny_data_dir: Path) -> None:
    """A cached model is read with torch.load(weights_only=True): a file holding code is refused."""
    import pickle  # pylint: disable=import-outside-toplevel

    import pytest  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    from fedcca.data import load_dataset  # pylint: disable=import-outside-toplevel
    from simulations import zoo  # pylint: disable=import-outside-toplevel

    dataset = load_dataset("fashion-mnist", tiny_data_dir)
    spec = zoo.ZooSpec(model="cnn", width=0.25, num_models=1, epochs=1, train_subset=40, calibration_size=20)
    model, record = zoo.load_or_train(dataset, spec, 0, directory=tmp_path)
    again, cached = zoo.load_or_train(dataset, spec, 0, directory=tmp_path)
    assert cached == record and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                        again.state_dict().values()))
    path = next(tmp_path.glob("*.pt"))
    torch.save({"state_dict": model.state_dict(), "record": record, "code": print}, path)
    with pytest.raises(pickle.UnpicklingError):
        zoo.load_or_train(dataset, spec, 0, directory=tmp_path)
