"""Client-side alignment under Flower's SecAgg+ workflow: the secure sum gives the plain sum's merge."""

from __future__ import annotations

import pytest
import torch
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, RecordDict, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedcca.flower.local_grid import InProcessGrid, set_task_identity
from fedcca.flower.secure import SecureCCAMerge, aligned_parameters
from tests.tiny_clients import CALIBRATION, HELD_OUT, shard, teacher_labels
from tests.tiny_models import make_model

NODES = (1, 2, 3)
HOLDOUT = (HELD_OUT, teacher_labels(HELD_OUT))
CLIP = 16.0


class _Client(NumPyClient):
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        model = make_model()
        model.load_state_dict({k: torch.as_tensor(v) for k, v in zip(model.state_dict(), parameters)})
        x, y = shard(self.node_id)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        for _ in range(3):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
        return aligned_parameters(parameters, model, config, CALIBRATION, limit=CLIP, device="cpu"), len(x), {}


def _client_app(secure: bool) -> ClientApp:
    return ClientApp(client_fn=lambda context: _Client(context.node_id).to_client(),
                     mods=[secaggplus_mod] if secure else [])


def _run(secure: bool) -> SecureCCAMerge:
    torch.manual_seed(0)
    strategy = SecureCCAMerge(make_model, CALIBRATION, "cca", device="cpu",
                              fraction_evaluate=0.0, min_fit_clients=len(NODES), min_available_clients=len(NODES),
                              initial_parameters=ndarrays_to_parameters(
                                  [v.numpy() for v in make_model(1).state_dict().values()]))
    set_task_identity()
    app = _client_app(secure)
    grid = InProcessGrid(dict.fromkeys(NODES, app))
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    fit = SecAggPlusWorkflow(num_shares=len(NODES), reconstruction_threshold=2, clipping_range=CLIP) if secure \
        else None
    (DefaultWorkflow(fit_workflow=fit) if fit else DefaultWorkflow())(grid, context)
    return strategy


def test_secure_sum_merges_as_the_plain_sum() -> None:
    plain, secure = _run(False), _run(True)
    assert len(plain.results) == len(secure.results) == 1
    first, second = plain.results[0].model.state_dict(), secure.results[0].model.state_dict()
    assert any(float((first[k] - make_model(1).state_dict()[k]).abs().max()) > 1e-2 for k in first)  # it trained
    # SecAgg+ quantises each value to 2 * CLIP / 2^22 per client; CCA and REPAIR amplify little at this size
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-3, msg=key)


def test_a_value_beyond_the_clipping_range_is_refused_not_clipped() -> None:
    model = make_model()
    with torch.no_grad():
        model.fc2.bias.fill_(100.0)
    received = [v.numpy() for v in make_model(1).state_dict().values()]
    with pytest.raises(ValueError, match="fc2.bias.*clipping range"):
        aligned_parameters(received, model, {}, CALIBRATION, limit=8.0)
    assert len(aligned_parameters(received, model, {}, CALIBRATION, limit=None)) == len(received)
