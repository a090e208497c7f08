"""Tiny ClientApps for the strategy tests: a fedcca-style client and a FedAvg-style one.

``stats_app`` trains, then sends statistics when the train config asks for them (the fedcca
protocol); ``fedavg_app`` has the flwr quickstart shape (one ArrayRecord "arrays" + one
MetricRecord "metrics"). Both train :func:`tests.tiny_models.make_model` on synthetic images
whose labels come from a fixed teacher. Grids: :class:`fedcca.flower.local_grid.InProcessGrid`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedcca.flower.local_grid import set_task_identity
from fedcca.flower.protocol import STATISTICS_KEY, read_train_instruction, train_instruction, train_reply
from fedcca.merging.repair import preactivation_statistics
from fedcca.statistics import collect_statistics
from tests.tiny_models import CLASSES, HIDDEN, IN_CHANNELS, TinyNet, calibration, make_model

CALIBRATION = calibration(48, seed=123)
HELD_OUT = calibration(40, seed=321)
_TEACHER = torch.randn(IN_CHANNELS, CLASSES, generator=torch.Generator().manual_seed(7))


def teacher_labels(x: torch.Tensor) -> torch.Tensor:
    """The labels the tiny clients learn: a fixed linear teacher on the channel means."""
    return (x.mean(dim=(2, 3)) @ _TEACHER).argmax(dim=1)


def shard(node_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A node's synthetic training data (20 + 10 * node_id images, labels from the teacher)."""
    x = calibration(20 + 10 * node_id, seed=1000 + node_id)
    return x, teacher_labels(x)


def train_locally(message: Message, node_id: int, steps: int = 3) -> tuple[TinyNet, TinyNet, float]:
    """Load the received model, train a copy a few SGD steps; return (received, trained, loss)."""
    received = make_model()
    received.load_state_dict(read_train_instruction(message).arrays.to_torch_state_dict())
    trained = make_model()
    trained.load_state_dict(received.state_dict())
    x, y = shard(node_id)
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.1)
    trained.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(trained(x), y)
        loss.backward()
        optimiser.step()
    return received, trained, loss.item()


def _node_id(message: Message) -> int:
    return message.metadata.dst_node_id


def _train_reply(message: Message, loss_key: str,
                 with_statistics: bool = False, with_preactivation: bool = False) -> RecordDict:
    """Train locally; the reply content (weights, metrics and, if asked for, statistics and pre-activation moments)."""
    received, trained, loss = train_locally(message, _node_id(message))
    statistics = collect_statistics(received, [trained], CALIBRATION)[0] if with_statistics else None
    pre = preactivation_statistics([trained], CALIBRATION, recompute_bn=False)[0] if with_preactivation else None
    return train_reply(trained.state_dict(), len(shard(_node_id(message))[0]), {loss_key: loss}, statistics, pre)


fedavg_app = ClientApp()
stats_app = ClientApp()


@fedavg_app.train()
def _fedavg_train(message: Message, context: Context) -> Message:
    # The flwr quickstart reports "train_loss"; the fedcca ClientApp "train-loss".
    return Message(_train_reply(message, "train_loss"), reply_to=message)


@stats_app.train()
def _stats_train(message: Message, context: Context) -> Message:
    instruction = read_train_instruction(message)
    return Message(_train_reply(message, "train-loss", with_statistics=instruction.compute_statistics,
                                with_preactivation=instruction.send_preactivation), reply_to=message)


def claiming_app(count: float) -> Callable[[Message, Context], Message]:
    """``stats_app`` whose replies claim ``count`` examples."""
    def app(message: Message, context: Context) -> Message:
        reply = stats_app(message, context)
        reply.content["metrics"]["num-examples"] = count
        return reply
    return app


@fedavg_app.evaluate()
@stats_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(message.content["arrays"].to_torch_state_dict())
    model.eval()
    x, y = shard(_node_id(message) + 100)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    return Message(RecordDict({"metrics": MetricRecord({"eval-loss": loss, "num-examples": len(x)})}),
                   reply_to=message)


def run_app(app: Callable[[Message, Context], Message], message: Message) -> Message:
    """Run a ClientApp on ``message`` as the node it is addressed to."""
    node_id = message.metadata.dst_node_id
    return app(message, Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={}))


def train_messages(arrays: ArrayRecord, node_ids: Iterable[int], compute_stats: bool = True,
                   server_round: int = 1) -> list[Message]:
    """Train instructions as a strategy would send them (for calling ClientApps directly)."""
    set_task_identity()
    return [Message(train_instruction(arrays, server_round, compute_stats), node_id, MessageType.TRAIN)
            for node_id in node_ids]


# ---------------------------------------------------------------------- malformed replies


def _replace_array(record: ArrayRecord, key: str, value: np.ndarray) -> None:
    record[key] = Array(value)


def _set_num_examples(value: object) -> Callable[[RecordDict], None]:
    def mutate(content: RecordDict) -> None:
        metrics = content["metrics"]
        if value is _MISSING:
            del metrics["num-examples"]
        else:
            metrics["num-examples"] = value
    return mutate


def _poison_weight(value: float) -> Callable[[RecordDict], None]:
    def mutate(content: RecordDict) -> None:
        array = content["arrays"]["fc2.weight"].numpy().copy()
        array[0, 0] = value
        _replace_array(content["arrays"], "fc2.weight", array)
    return mutate


def _poison_statistics(content: RecordDict) -> None:
    record = content[STATISTICS_KEY]
    key = next(key for key in record if key.endswith("/cross"))
    array = record[key].numpy().copy()
    array.flat[0] = np.nan
    _replace_array(record, key, array)


def _resize_statistics(content: RecordDict) -> None:
    record = content[STATISTICS_KEY]
    key = next(key for key in record if key.endswith("/comoment"))
    _replace_array(record, key, np.zeros(3, dtype=np.float32))


@functools.lru_cache(maxsize=1)
def _bomb_bytes(declared: tuple[int, ...]) -> bytes:
    """An .npy file header declaring ``declared`` elements of dtype V0, with no data (np.save of such an
    array takes ~50 s: it iterates over the 10^12 empty items)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|V0", "fortran_order": False, "shape": declared})
    return buffer.getvalue()


def _bomb(declared: tuple[int, ...] = (10**12,)) -> Array:
    """A 128-byte Array whose header declares 10^12 elements of a zero-size dtype (decodes without
    allocating; converting it to float64 asks for terabytes)."""
    return Array(dtype="|V0", shape=declared, stype="numpy.ndarray", data=_bomb_bytes(declared))


def _set_statistics(suffix: str, value: Callable[[np.ndarray], Array]) -> Callable[[RecordDict], None]:
    def mutate(content: RecordDict) -> None:
        record = content[STATISTICS_KEY]
        key = next(key for key in record if key.endswith(suffix))
        record[key] = value(record[key].numpy())
    return mutate


def _scale_statistics(factors: dict[str, float]) -> Callable[[RecordDict], None]:
    """Every statistics array whose key ends with a suffix of ``factors`` multiplied by its factor (forgery)."""
    def mutate(content: RecordDict) -> None:
        record = content[STATISTICS_KEY]
        for key in list(record):
            for suffix, factor in factors.items():
                if key.endswith(suffix):
                    array = record[key].numpy()
                    record[key] = Array((array * factor).astype(array.dtype))
    return mutate


_MISSING = object()

# name -> (mutation of a valid reply's content, words the rejection reason must contain)
MUTATIONS: dict[str, tuple[Callable[[RecordDict], None], str]] = {
    "missing weights": (lambda c: c.__delitem__("arrays"), "missing ArrayRecord"),
    "extra ArrayRecord": (lambda c: c.__setitem__("extra", ArrayRecord()), "unexpected ArrayRecord"),
    "extra ConfigRecord": (lambda c: c.__setitem__("cfg", ConfigRecord({"a": 1})), "unexpected ConfigRecord"),
    "no MetricRecord": (lambda c: c.__delitem__("metrics"), "exactly one MetricRecord"),
    "two MetricRecords": (lambda c: c.__setitem__("more", MetricRecord({"num-examples": 1})),
                          "exactly one MetricRecord"),
    "missing weight key": (lambda c: c["arrays"].__delitem__("fc2.bias"), "weight keys differ"),
    "extra weight key": (lambda c: _replace_array(c["arrays"], "fc3.weight", np.zeros(3, np.float32)),
                         "weight keys differ"),
    "wrong shape": (lambda c: _replace_array(c["arrays"], "fc1.bias", np.zeros(7, np.float32)), "shape"),
    "wrong dtype": (lambda c: _replace_array(c["arrays"], "fc1.bias", np.zeros(HIDDEN, np.float64)),
                    "dtype"),
    "undecodable weight": (lambda c: c["arrays"].__setitem__("fc1.bias", Array(
        dtype="float32", shape=(HIDDEN,), stype="numpy.ndarray", data=b"not an npy file")),
        "cannot be decoded"),
    "NaN weight": (_poison_weight(float("nan")), "non-finite"),
    "inf weight": (_poison_weight(float("inf")), "non-finite"),
    "non-finite statistics": (_poison_statistics, "invalid statistics"),
    "statistics of the wrong size": (_resize_statistics, "invalid statistics"),
    "statistics missing a point": (lambda c: [c[STATISTICS_KEY].__delitem__(k) for k in list(
        c[STATISTICS_KEY]) if k.startswith("fc1/")], "invalid statistics"),
    "statistics size bomb": (_set_statistics("/cross", lambda a: _bomb()), "declares"),
    "statistics in bool": (_set_statistics("/cross", lambda a: Array(a.astype(bool))), "declares dtype bool"),
    "statistics in float16": (_set_statistics("/mean", lambda a: Array(a.astype(np.float16))), "declares dtype float16"),
    "statistics in complex": (_set_statistics("/cross", lambda a: Array(a.astype(np.complex64))), "declares dtype complex"),
    "statistics count 1e300": (_set_statistics("/count", lambda a: Array(np.asarray(1e300))), "positive integer of at most"),
    "statistics padded with extra bytes": (_set_statistics("/mean", lambda a: Array(
        dtype="float64", shape=a.shape, stype="numpy.ndarray", data=Array(a).data + bytes(10**6))), "bytes for"),
    "weight size bomb": (lambda c: c["arrays"].__setitem__("fc1.bias", _bomb()), "declares"),
    "num-examples missing": (_set_num_examples(_MISSING), "lacks 'num-examples'"),
    "num-examples zero": (_set_num_examples(0), "positive"),
    "num-examples negative": (_set_num_examples(-5.0), "positive"),
    "num-examples NaN": (_set_num_examples(float("nan")), "positive"),
    "num-examples inf": (_set_num_examples(float("inf")), "positive"),
    "num-examples a list": (_set_num_examples([1, 2]), "not a number"),
}

# Replies that decode but whose statistics cannot be those of the client's model: caught while
# merging (against what the server measures, or by the aligned-norm bound), not by the protocol.
ROUND_MUTATIONS: dict[str, tuple[Callable[[RecordDict], None], str]] = {
    "cross moment beyond Cauchy-Schwarz": (_scale_statistics({"/cross": 1e3}), "(Cauchy-Schwarz)"),
    "negative variances": (_scale_statistics({"/comoment": -1.0}), "variances include negative values"),
    "forged statistics that scale the weights": (_scale_statistics({"/mean": 0.0, "/comoment": 1e-12, "/cross": 1e-12}),
                                                 "AlignmentBoundError"),
}
