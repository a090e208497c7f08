"""Every strategy and wrapper Flower 1.41 ships composes with fedcca's: the recorder and the screen are exact
around each (honest replies), and Flower's DP wrappers work around CCAMerge; each against the strategy's own
computation on the same replies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_clip_model_update

from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.recording import RecordRounds
from fedcca.flower.screen import ScreenReplies
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.config import MergeConfig
from tests.tiny_clients import CALIBRATION, _fedavg_train, fedavg_app, make_model

NODES = (1, 2, 3, 4, 5)
GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
COMMON = {"fraction_evaluate": 0.0, "min_available_nodes": len(NODES), "min_train_nodes": len(NODES)}

FLOWER: dict[str, Callable[[], Strategy]] = {
    "FedAvg": lambda: FedAvg(**COMMON),
    "FedAvgM": lambda: FedAvgM(server_momentum=0.9, **COMMON),
    "FedProx": lambda: FedProx(proximal_mu=0.1, **COMMON),
    "FedMedian": lambda: FedMedian(**COMMON),
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2, **COMMON),
    "Krum": lambda: Krum(num_malicious_nodes=1, **COMMON),
    "MultiKrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=2, **COMMON),
    "Bulyan": lambda: Bulyan(num_malicious_nodes=0, **COMMON),
    "DP server fixed(FedAvg)": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(**COMMON), noise_multiplier=0.0, clipping_norm=0.05, num_sampled_clients=len(NODES)),
    "DP server adaptive(FedAvg)": lambda: DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(**COMMON), noise_multiplier=0.0, num_sampled_clients=len(NODES), initial_clipping_norm=0.05),
}


def _replies(app: Callable[[Message, Context], Message] = fedavg_app,
             strategy: Strategy | None = None) -> list[Message]:
    grid = InProcessGrid({node: app for node in NODES})
    strategy = strategy or FedAvg(**COMMON)
    return list(grid.send_and_receive(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)))


REPLIES = _replies()


def _aggregate(strategy: Strategy, replies: list[Message], lazily: bool = False) -> dict[str, torch.Tensor]:
    grid = InProcessGrid({node: fedavg_app for node in NODES})
    strategy.configure_train(1, GLOBAL, ConfigRecord(), grid)  # the round's state (global model, sampled count)
    given = copy.deepcopy(replies)
    arrays, _ = strategy.aggregate_train(1, iter(given) if lazily else given)
    assert arrays is not None
    return arrays.to_torch_state_dict()


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


@pytest.mark.parametrize("name", sorted(FLOWER))
@pytest.mark.parametrize("wrapping", ["RecordRounds", "ScreenReplies", "RecordRounds(ScreenReplies)"])
def test_fedcca_wrappers_are_exact_around_every_flower_strategy(name: str, wrapping: str) -> None:
    expected = _aggregate(FLOWER[name](), REPLIES)
    wrapped = {"RecordRounds": lambda s: RecordRounds(s), "ScreenReplies": lambda s: ScreenReplies(s),
               "RecordRounds(ScreenReplies)": lambda s: RecordRounds(ScreenReplies(s))}[wrapping](FLOWER[name]())
    _assert_equal(_aggregate(wrapped, REPLIES, lazily=True), expected)
    if isinstance(wrapped, RecordRounds):
        record = wrapped.rounds[-1]
        assert record.num_valid == len(NODES) and record.dropped == {}


def _ccamerge() -> CCAMerge:
    return CCAMerge(make_model, CALIBRATION, MergeConfig("cca", zero_dead=False), stats="server", reference="global",
                    device="cpu", screen=None, **COMMON)


def _clipping_app(mod) -> ClientApp:  # noqa: ANN001
    app = ClientApp(mods=[mod])
    app.train()(_fedavg_train)
    return app


@pytest.mark.parametrize("name", ["server fixed", "server adaptive", "client fixed", "client adaptive"])
def test_flowers_dp_wrappers_around_ccamerge_inside_the_recorder(name: str) -> None:
    """Noise 0: each wrapper's aggregate is CCAMerge's merge of the replies as the wrapper (or the clients' mod)
    clipped them; CCAMerge's record is the one the recorder keeps."""
    n = len(NODES)
    build = {
        "server fixed": lambda s: DifferentialPrivacyServerSideFixedClipping(s, 0.0, 0.05, n),
        "server adaptive": lambda s: DifferentialPrivacyServerSideAdaptiveClipping(s, 0.0, n, initial_clipping_norm=0.05),
        "client fixed": lambda s: DifferentialPrivacyClientSideFixedClipping(s, 0.0, 0.05, n),
        "client adaptive": lambda s: DifferentialPrivacyClientSideAdaptiveClipping(s, 0.0, n, initial_clipping_norm=0.05),
    }[name]
    dp = build(_ccamerge())
    recorded = RecordRounds(dp)
    if name.startswith("client"):  # the clients clip with Flower's mod, as the wrapper's docs say
        grid = InProcessGrid({node: _clipping_app(fixedclipping_mod if "fixed" in name else adaptiveclipping_mod)
                              for node in NODES})
        replies = list(grid.send_and_receive(recorded.configure_train(1, GLOBAL, ConfigRecord(), grid)))
        clipped = copy.deepcopy(replies)  # what the clients sent is already clipped
        arrays, _ = recorded.aggregate_train(1, iter(replies))
    else:
        grid = InProcessGrid({node: fedavg_app for node in NODES})
        recorded.configure_train(1, GLOBAL, ConfigRecord(), grid)
        clipped = copy.deepcopy(REPLIES)
        arrays, _ = recorded.aggregate_train(1, iter(copy.deepcopy(REPLIES)))
        # the same clipping (Flower's function, over every array as the wrapper does): what CCAMerge was handed
        for reply in clipped:
            record = reply.content["arrays"]
            values = record.to_numpy_ndarrays()
            compute_clip_model_update(values, GLOBAL.to_numpy_ndarrays(), 0.05)
            reply.content["arrays"] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(record.keys(), values)})
    assert arrays is not None
    expected = _ccamerge()
    expected.configure_train(1, GLOBAL, ConfigRecord(), InProcessGrid({node: fedavg_app for node in NODES}))
    reference, _ = expected.aggregate_train(1, clipped)
    _assert_equal(arrays.to_torch_state_dict(), reference.to_torch_state_dict())
    assert recorded.rounds[-1].num_valid == len(NODES) and recorded.rounds[-1].reference == "global"
