"""Client-side alignment: clients send their share of every candidate merge, the server sums and chooses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcca.flower.client_alignment import ALIGN_KEY, ALIGNED_KEY, add_alignment, search_from_json, search_to_json
from fedcca.flower.local_grid import InProcessGrid
from fedcca.flower.protocol import COMPUTE_STATS_FLAG, read_train_instruction
from fedcca.flower.strategy import CCAMerge
from fedcca.merging.config import MergeSearch
from fedcca.merging.contribution import absorb, contribution
from fedcca.merging.merger import Merger
from fedcca.merging.selection import FEDERATED_SEARCH
from tests.tiny_clients import CALIBRATION, HELD_OUT, fedavg_app, teacher_labels, train_messages
from tests.tiny_models import make_model, make_tiny

GLOBAL = ArrayRecord(make_model(seed=1).state_dict())
NODES = (1, 2, 3, 4)
HOLDOUT = (HELD_OUT, teacher_labels(HELD_OUT))


def _aligning_app(edit=None):  # noqa: ANN001, ANN202
    """fedavg_app whose reply adds the client's contribution (the one line a user's ClientApp adds)."""
    def app(message: Message, context: Context) -> Message:
        reply = fedavg_app(message, context)
        trained = make_model()
        trained.load_state_dict(reply.content["arrays"].to_torch_state_dict())
        content = add_alignment(reply.content, message, trained, CALIBRATION, device="cpu")
        if edit is not None:
            edit(content)
        return Message(content, reply_to=message)
    return app


def _round(strategy: CCAMerge, app) -> ArrayRecord | None:  # noqa: ANN001
    grid = InProcessGrid(dict.fromkeys(NODES, app))
    messages = list(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(messages))
    return arrays


def _max_difference(a: ArrayRecord, b: ArrayRecord) -> float:
    first, second = a.to_torch_state_dict(), b.to_torch_state_dict()
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_summed_contributions_equal_the_server_side_merge(batchnorm: bool) -> None:
    """Every candidate's model from summed contributions equals the one from adding the models (same statistics)."""
    reference = make_tiny(1, batchnorm)
    models = [make_tiny(seed, batchnorm) for seed in (2, 3, 4)]
    weights = [1.0, 2.5, 4.0]
    whole = Merger(reference, CALIBRATION, FEDERATED_SEARCH, holdout=HOLDOUT, device="cpu")
    for model, weight in zip(models, weights):
        whole.add(model, weight)
    expected = whole.finish()
    shares = [contribution(Merger(reference, CALIBRATION, FEDERATED_SEARCH, device="cpu", contributes=True), model)
              for model in models]
    summed = {name: sum(w * share[name].double() for w, share in zip(weights, shares)) for name in shares[0]}
    merger = Merger(reference, CALIBRATION, FEDERATED_SEARCH, holdout=HOLDOUT, device="cpu")
    absorb(merger, summed, sum(weights))
    got = merger.finish()
    assert [s.label for s in got.scores] == [s.label for s in expected.scores]
    assert [s.accuracy for s in got.scores] == [s.accuracy for s in expected.scores]
    assert got.config == expected.config
    for key, value in expected.model.state_dict().items():
        torch.testing.assert_close(got.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_contribution_needs_a_fresh_mean_merger() -> None:
    merger = Merger(make_tiny(1), CALIBRATION, "cca", device="cpu", contributes=True)
    contribution(merger, make_tiny(2))
    with pytest.raises(ValueError, match="fresh"):
        contribution(merger, make_tiny(3))
    with pytest.raises(ValueError, match="additive"):
        contribution(Merger(make_tiny(1), CALIBRATION, "cca", device="cpu", average="median", contributes=True),
                     make_tiny(2))


def test_search_travels_as_data() -> None:
    assert search_from_json(search_to_json(FEDERATED_SEARCH)) == FEDERATED_SEARCH
    for bad in ("{", json.dumps({"base": {"method": "os:abort"}, "grid": [], "min_z": 0}),
                json.dumps({"base": {}, "grid": [["__import__", ["os"]]], "min_z": 0}), "x" * 70_000):
        with pytest.raises(ValueError, match=ALIGN_KEY):
            search_from_json(bad)


def test_client_mode_equals_server_mode_through_flower() -> None:
    """The same round merged by the server (statistics it computes) and from the clients' summed shares."""
    server = CCAMerge(make_model, CALIBRATION, "cca", repair="affine", reference="global", stats="server",
                      device="cpu")
    client = CCAMerge(make_model, CALIBRATION, "cca", repair="affine", reference="global", alignment="client",
                      device="cpu")
    expected = _round(server, fedavg_app)
    got = _round(client, _aligning_app())
    assert expected is not None and got is not None
    assert _max_difference(expected, got) < 1e-4
    record = client.rounds[-1]
    assert record.num_valid == len(NODES) and record.client_statistics == 0 and record.merge_choice == "cca +affine"


def test_a_summed_round_reads_the_replies_weights_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A summed round only reads the replies' weights: screened and merged, each is decoded once, as views
    of its bytes (no copy); a server-side round decodes copies, which its merge may write into."""
    import fedcca.flower.protocol as protocol_module
    decode = protocol_module._decode_weights
    asked: list[bool] = []

    def recording(record, template, views=False):  # noqa: ANN001, ANN202
        asked.append(views)
        return decode(record, template, views=views)

    monkeypatch.setattr(protocol_module, "_decode_weights", recording)
    expected = _round(CCAMerge(make_model, CALIBRATION, "cca", reference="global", device="cpu"), fedavg_app)
    assert asked == [False] * len(NODES)
    asked.clear()
    got = _round(CCAMerge(make_model, CALIBRATION, "cca", reference="global", alignment="client", device="cpu"),
                 _aligning_app())
    assert asked == [True] * len(NODES)
    assert expected is not None and got is not None and _max_difference(expected, got) < 1e-4


def test_client_mode_asks_for_alignment_not_statistics_and_keeps_round_one_on_the_server() -> None:
    strategy = CCAMerge(make_model, CALIBRATION, holdout=HOLDOUT, alignment="client", device="cpu")
    grid = InProcessGrid(dict.fromkeys(NODES, _aligning_app()))
    first = list(strategy.configure_train(1, GLOBAL, ConfigRecord(), grid))
    second = list(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid))
    assert all(ALIGN_KEY not in m.content["config"] for m in first)
    assert all(search_from_json(m.content["config"][ALIGN_KEY]) == strategy.search for m in second)
    assert not any(read_train_instruction(m).config[COMPUTE_STATS_FLAG] for m in second)
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(second))
    assert arrays is not None
    record = strategy.rounds[-1]
    assert len(record.candidates) == len(strategy.search.candidates()) and not record.dropped


def _drop_entry(content) -> None:  # noqa: ANN001
    record = content[ALIGNED_KEY]
    del record[next(iter(record))]


def _reshape_entry(content) -> None:  # noqa: ANN001
    record = content[ALIGNED_KEY]
    name = next(iter(record))
    record[name] = Array(np.zeros((3, 3), dtype=np.float32))


def _scale_aligned_weights(content) -> None:  # noqa: ANN001
    record = content[ALIGNED_KEY]
    for name in [n for n in record if "/weights/" in n]:
        record[name] = Array(record[name].numpy() * 1e6)


def _no_record(content) -> None:  # noqa: ANN001
    del content[ALIGNED_KEY]


@pytest.mark.parametrize(("edit", "reason"), [
    (_drop_entry, "aligned entries differ"),
    (_reshape_entry, "declares dtype float32 and shape (3, 3)"),
    (_scale_aligned_weights, "norm of the reply's own"),
    (_no_record, f"missing ArrayRecord '{ALIGNED_KEY}'"),
])
def test_a_malformed_share_is_dropped_alone(edit, reason: str) -> None:  # noqa: ANN001
    # The default search: its first form is FedAvg's, so the aligned forms' weights travel in ALIGNED_KEY.
    strategy = CCAMerge(make_model, CALIBRATION, holdout=HOLDOUT, reference="global", alignment="client",
                        device="cpu")
    apps = {node: _aligning_app(edit if node == NODES[-1] else None) for node in NODES}
    grid = InProcessGrid(apps)
    messages = list(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(messages))
    record = strategy.rounds[-1]
    assert arrays is not None and record.num_valid == len(NODES) - 1
    assert list(record.dropped) == [NODES[-1]] and reason in record.dropped[NODES[-1]]


def test_client_mode_refuses_what_cannot_be_summed() -> None:
    with pytest.raises(ValueError, match="average='mean'"):
        CCAMerge(make_model, CALIBRATION, "cca", alignment="client", average="median", device="cpu")
    with pytest.raises(ValueError, match="alignment must be one of"):
        CCAMerge(make_model, CALIBRATION, "cca", alignment="clients", device="cpu")


def test_add_alignment_is_a_no_op_unless_asked() -> None:
    message = train_messages(GLOBAL, [1])[0]
    reply = fedavg_app(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert ALIGNED_KEY not in add_alignment(reply.content, message, make_model(), CALIBRATION, device="cpu")


def test_search_of_the_default_federation_round_trips() -> None:
    search = MergeSearch.of(None)
    assert search_from_json(search_to_json(search)) == search


def test_a_single_aligned_merge_sends_its_aligned_weights_as_the_reply_weights() -> None:
    """With "cca" alone the reply's ``arrays`` are the aligned weights (FedAvg's bytes) and the screen bounds them."""
    strategy = CCAMerge(make_model, CALIBRATION, "cca", reference="global", alignment="client", device="cpu")
    message = list(strategy.configure_train(2, GLOBAL, ConfigRecord(), InProcessGrid(dict.fromkeys(NODES))))[0]
    reply = _aligning_app()(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    plain = fedavg_app(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    trained = make_model()
    trained.load_state_dict(plain.content["arrays"].to_torch_state_dict())
    share = contribution(Merger(make_model(seed=1), CALIBRATION, "cca", device="cpu", contributes=True), trained)
    sent = reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == set(trained.state_dict())
    for key, value in sent.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, share[f"form0/weights/{key}"], msg=key)
    assert not any("/weights/" in name for name in reply.content[ALIGNED_KEY])
    assert reply.content["arrays"].count_bytes() == plain.content["arrays"].count_bytes()

    def scale(content) -> None:  # noqa: ANN001
        content["arrays"] = ArrayRecord({k: v * 1e6 if v.is_floating_point() else v
                                         for k, v in content["arrays"].to_torch_state_dict().items()})

    apps = {node: _aligning_app(scale if node == NODES[-1] else None) for node in NODES}
    grid = InProcessGrid(apps)
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(
        list(strategy.configure_train(2, GLOBAL, ConfigRecord(), grid))))
    assert arrays is not None and list(strategy.rounds[-1].dropped) == [NODES[-1]]
