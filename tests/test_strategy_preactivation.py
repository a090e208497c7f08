"""Clients send their pre-activation moments (REPAIR's targets): the server runs no client model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

import fedcca.merging.merger as merger_module
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import (
    PREACTIVATION_FLAG,
    PREACTIVATION_PREFIX,
    STATISTICS_KEY,
    decode_statistics,
    read_train_instruction,
    statistics_to_record,
)
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.repair import preactivation_spec, preactivation_statistics
from fedcca.spec.tracing import spec_for
from fedcca.statistics import StatisticsError, collect_statistics
from tests.tiny_clients import CALIBRATION, make_model, stats_app

GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
NODES = (1, 2, 3, 4)
SPEC = spec_for(make_model(1))
SIZES = {point.name: point.size for point in preactivation_spec(SPEC, make_model(1))[0].points}


def _strategy(**kwargs: object) -> CCAMerge:
    return CCAMerge(make_model, CALIBRATION, config="cca", repair="affine", reference="global", device="cpu",
                    **kwargs)  # type: ignore[arg-type]


def _edited(edit):  # noqa: ANN001, ANN202
    def app(message: Message, context: Context) -> Message:
        reply = stats_app(message, context)
        record = reply.content[STATISTICS_KEY]
        for key in [k for k in record if k.startswith(PREACTIVATION_PREFIX)]:
            edit(record, key)
        return reply
    return app


def _strip(record: ArrayRecord, key: str) -> None:
    del record[key]


def _round(nodes: dict) -> tuple[ArrayRecord, CCAMerge]:
    strategy = _strategy()
    grid = InProcessGrid(nodes)
    messages = list(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid))
    assert all(read_train_instruction(m).send_preactivation for m in messages)
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(messages))
    assert arrays is not None
    return arrays, strategy


def _close(a: ArrayRecord, b: ArrayRecord) -> None:
    left, right = a.to_torch_state_dict(), b.to_torch_state_dict()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-5, msg=key)


def test_preactivation_moments_round_trip() -> None:
    received, trained = make_model(1), make_model(2)
    stats = collect_statistics(received, [trained], CALIBRATION)[0]
    pre = preactivation_statistics([trained], CALIBRATION, SPEC, recompute_bn=False)[0]
    assert pre.keys() == SIZES.keys() and SIZES
    statistics, back = decode_statistics(statistics_to_record(stats, pre), SPEC, SIZES)
    assert statistics.keys() == set(SPEC.names()) and back is not None
    for point, (mean, covariance) in pre.items():
        torch.testing.assert_close(back[point][0], mean)
        torch.testing.assert_close(back[point][1], covariance, rtol=1e-6, atol=1e-6)
    assert decode_statistics(statistics_to_record(stats), SPEC, SIZES)[1] is None  # not sent: measured by the server


@pytest.mark.parametrize(("edit", "words"), [
    (lambda record, key: record.pop(key) if key.endswith("/covariance") else None, "is missing"),
    (lambda record, key: record.__setitem__(key, Array(np.full_like(record[key].numpy(), np.nan))), "non-finite"),
    (lambda record, key: record.__setitem__(key, Array(-np.abs(record[key].numpy()) - 1))
     if key.endswith("/covariance") else None, "negative variance"),
    (lambda record, key: record.__setitem__(key, Array(np.zeros(10**3, dtype=np.float32))), "shape"),
])
def test_malformed_preactivation_moments_are_refused_naming_the_key(edit, words: str) -> None:  # noqa: ANN001
    received, trained = make_model(1), make_model(2)
    record = statistics_to_record(collect_statistics(received, [trained], CALIBRATION)[0],
                                  preactivation_statistics([trained], CALIBRATION, SPEC, recompute_bn=False)[0])
    for key in [k for k in record if k.startswith(PREACTIVATION_PREFIX)]:
        edit(record, key)
    with pytest.raises(StatisticsError, match=words):
        decode_statistics(record, SPEC, SIZES)
    with pytest.raises(StatisticsError, match="unexpected statistics key 'preactivation/"):
        decode_statistics(record, SPEC, None)  # a server that does not repair reads none


def test_a_round_with_client_moments_runs_no_client_model_and_equals_the_server_measured_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, list[int]] = {"preactivation_statistics": [], "norm_output_statistics": []}
    for name, runs in calls.items():
        def counted(models, *args, _original=getattr(merger_module, name), _runs=runs, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            _runs.append(len(models))
            return _original(models, *args, **kwargs)
        monkeypatch.setattr(merger_module, name, counted)
    sent, strategy = _round({n: stats_app for n in NODES})
    # no client model ran on the server, for REPAIR's targets nor for the folded BatchNorm's restore
    assert calls == {"preactivation_statistics": [], "norm_output_statistics": []}
    assert strategy.rounds[-1].client_statistics == len(NODES)
    measured, _ = _round({n: _edited(_strip) for n in NODES})
    assert len(calls["preactivation_statistics"]) == len(calls["norm_output_statistics"]) == len(NODES)
    _close(sent, measured)  # the same round measuring each client model here: the same merge


def test_forged_preactivation_moments_are_measured_on_the_server_instead(caplog: pytest.LogCaptureFixture) -> None:
    def inflate(record: ArrayRecord, key: str) -> None:
        record[key] = Array(record[key].numpy() * (1e4 if key.endswith("/covariance") else 1e2))

    honest, _ = _round({n: _edited(_strip) for n in NODES})
    with caplog.at_level(logging.WARNING):
        forged, strategy = _round({**{n: stats_app for n in NODES[1:]}, NODES[0]: _edited(inflate)})
    assert f"node {NODES[0]} sent pre-activation moments" in caplog.text and "measured on the server" in caplog.text
    assert strategy.rounds[-1].num_valid == len(NODES)
    assert list(strategy.rounds[-1].preactivation_refused) == [NODES[0]]
    assert "global model's RMS" in strategy.rounds[-1].preactivation_refused[NODES[0]]
    _close(forged, honest)


def test_no_moments_are_asked_for_without_repair_or_in_round_one() -> None:
    grid = InProcessGrid({n: stats_app for n in NODES})
    plain = CCAMerge(make_model, CALIBRATION, config="cca", repair="none", reference="global", device="cpu")
    assert not any(m.content["config"][PREACTIVATION_FLAG] for m in plain.configure_train(2, GLOBAL, ConfigRecord(), grid))
    auto = CCAMerge(make_model, CALIBRATION, config="cca", repair="affine", device="cpu")  # round 1: server statistics
    assert not any(m.content["config"][PREACTIVATION_FLAG] for m in auto.configure_train(1, GLOBAL, ConfigRecord(), grid))
    assert all(m.content["config"][PREACTIVATION_FLAG] for m in auto.configure_train(2, GLOBAL, ConfigRecord(), grid))
