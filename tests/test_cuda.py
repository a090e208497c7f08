"""On CUDA, when present: a client's training and statistics and the server's merge run on the device.

Skipped on machines without CUDA (as every CI machine of this project so far). Run alone with
``pytest tests/test_cuda.py -s`` to see the times.
"""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.strategy import CCAMerge
from fedcca.statistics import collect_statistics
from fedcca.training import TrainingConfig, train
from tests.tiny_clients import CALIBRATION, HELD_OUT, stats_app, teacher_labels
from tests.tiny_models import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_training_statistics_and_merge_on_cuda() -> None:
    device = torch.device("cuda")
    started = time.perf_counter()
    model = make_model(1)
    x, y = HELD_OUT, teacher_labels(HELD_OUT)
    result = train(model, [(x.to(device), y.to(device))], TrainingConfig(epochs=3, lr=0.05), device=device)
    assert next(model.parameters()).device.type == "cuda" and result["steps"] == 3
    stats = collect_statistics(make_model(2).to(device), [model], CALIBRATION, device=device)[0]
    assert all(torch.isfinite(pair.covariances()[2]).all() for pair in stats.values())
    strategy = CCAMerge(make_model, CALIBRATION, reference="global", device=device)
    grid = InProcessGrid({node: stats_app for node in (1, 2, 3)})
    messages = strategy.configure_train(1, ArrayRecord(make_model(1).state_dict()), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, list(grid.send_and_receive(messages)))
    assert arrays is not None and strategy.rounds[-1].num_valid == 3
    print(f"CUDA: train + statistics + one merge in {time.perf_counter() - started:.2f} s "
          f"on {torch.cuda.get_device_name(device)}")
