"""examples/quickstart-ccamerge: Flower's PyTorch quickstart with CCAMerge, run as a user would.

In process (Flower's own ``Strategy.start`` over the in-process grid, 2 rounds) in the fast
suite; with ``flwr run`` against a private SuperLink in the slow one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedcca.flower.local_grid import InProcessGrid
from tests.test_apps_simulation import BIN, CONNECTION, superlink  # noqa: F401  (the fixture)
from tests.tiny_dataset import ROOT

EXAMPLE = ROOT / "examples" / "quickstart-ccamerge"


def _config(data_dir: Path, out_dir: Path) -> dict[str, object]:
    return {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "lr": 0.05, "batch-size": 16,
            "public-size": 40, "data-dir": str(data_dir), "out-dir": str(out_dir)}


@pytest.fixture
def example_modules() -> Iterator[tuple[object, object]]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from ccamerge_app import client_app, server_app  # pylint: disable=import-outside-toplevel

        yield client_app, server_app
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "ccamerge_app" or m.startswith("ccamerge_app.")]:
            del sys.modules[name]


def test_the_example_runs_two_rounds_through_flowers_loop(example_modules: tuple, tiny_data_dir: Path,
                                                          tmp_path: Path) -> None:
    client_app, server_app = example_modules
    config = _config(tiny_data_dir, tmp_path / "out")
    grid = InProcessGrid.of_app(client_app.app, config, 2)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [entry["round"] for entry in history["rounds"]] == [1, 2]
    assert all(entry["num_valid"] == 2 and entry["merge_choice"] for entry in history["rounds"])
    assert 0 <= history["rounds"][-1]["accuracy"] <= 1 and history["alignment"]["aligned"]
    assert (tmp_path / "out" / "final_model.pt").is_file() and (tmp_path / "out" / "accuracy.png").is_file()


@pytest.mark.slow
def test_the_example_runs_with_flwr_run(superlink: tuple[dict[str, str], Path],  # noqa: F811
                                        tiny_data_dir: Path, tmp_path: Path) -> None:
    env, _ = superlink
    out_dir = tmp_path / "out"
    command = [str(BIN / "flwr"), "run", str(EXAMPLE), CONNECTION, "--stream",
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    for key, value in _config(tiny_data_dir, out_dir).items():
        command += ["--run-config", f"{key}={json.dumps(value)}"]
    started = time.monotonic()
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert (out_dir / "history.json").is_file(), f"no history after {time.monotonic() - started:.0f} s:\n{log[-4000:]}"
    history = json.loads((out_dir / "history.json").read_text())
    assert [entry["round"] for entry in history["rounds"]] == [1, 2]
    assert "[fedcca] round 2/2: accuracy" in log
