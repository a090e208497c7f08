"""In-process Flower harness for the strategy tests: a tiny model, two ClientApps, a fake Grid.

``FakeGrid.send_and_receive`` calls a ClientApp directly (no SuperLink, no Ray), so a round
takes milliseconds. ``stats_app`` is a fedcca-style client (trains, then sends statistics
when the train config asks for them); ``fedavg_app`` has the flwr quickstart shape
(one ArrayRecord "arrays" + one MetricRecord "metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from fedcca.alignment import AlignmentPoint, AlignmentSpec, ParamAxis
from fedcca.protocol import COMPUTE_STATS_FLAG, STATISTICS_KEY, statistics_to_record
from fedcca.statistics import collect_statistics
from simulations.harness import LocalGrid, set_task_identity

IN_FEATURES, HIDDEN1, HIDDEN2, CLASSES = 4, 6, 5, 3


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: on 2 shared, busy cores, tiny ops are ~15x faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CALIBRATION = torch.randn(48, IN_FEATURES, generator=torch.Generator().manual_seed(123))
_TEACHER = torch.randn(IN_FEATURES, CLASSES, generator=torch.Generator().manual_seed(7))


class TinyNet(nn.Module):
    """Linear-ReLU-Linear-BatchNorm-ReLU-Linear with an alignment spec (two points)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu1 = nn.Linear(IN_FEATURES, HIDDEN1), nn.ReLU()
        self.fc2, self.bn2, self.relu2 = nn.Linear(HIDDEN1, HIDDEN2), nn.BatchNorm1d(HIDDEN2), nn.ReLU()
        self.fc3 = nn.Linear(HIDDEN2, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for inputs ``x`` of shape [N, 4]."""
        return self.fc3(self.relu2(self.bn2(self.fc2(self.relu1(self.fc1(x))))))

    def alignment_spec(self) -> AlignmentSpec:
        """The hidden features after each ReLU."""
        out = [ParamAxis(key, 0, "out") for key in ("fc2.weight", "fc2.bias", "bn2.weight",
                                                   "bn2.bias", "bn2.running_mean")]
        return AlignmentSpec(points=(
            AlignmentPoint("fc1", HIDDEN1, ("relu1",), (
                ParamAxis("fc1.weight", 0, "out"), ParamAxis("fc1.bias", 0, "out"),
                ParamAxis("fc2.weight", 1, "in"))),
            AlignmentPoint("fc2", HIDDEN2, ("relu2",), (
                *out, ParamAxis("bn2.running_var", 0, "var"), ParamAxis("fc3.weight", 1, "in"))),
        ), fixed=(("fc1.weight", 1), ("fc3.weight", 0), ("fc3.bias", 0)))


def make_model(seed: int = 0) -> TinyNet:
    """A TinyNet initialised from ``seed``."""
    torch.manual_seed(seed)
    return TinyNet()


def shard(node_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A node's synthetic training data (20 + 10 * node_id examples, labels from a teacher)."""
    x = torch.randn(20 + 10 * node_id, IN_FEATURES, generator=torch.Generator().manual_seed(node_id))
    return x, (x @ _TEACHER).argmax(dim=1)


def train_locally(message: Message, node_id: int, steps: int = 3) -> tuple[TinyNet, TinyNet, float]:
    """Load the received model, train a copy a few SGD steps; return (received, trained, loss)."""
    received = make_model()
    received.load_state_dict(message.content["arrays"].to_torch_state_dict())
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


def _train_reply(message: Message, loss_key: str) -> tuple[TinyNet, TinyNet, RecordDict]:
    """Train locally; return (received, trained, reply content with weights and metrics)."""
    received, trained, loss = train_locally(message, _node_id(message))
    num_examples = len(shard(_node_id(message))[0])
    return received, trained, RecordDict({
        "arrays": ArrayRecord(trained.state_dict()),
        "metrics": MetricRecord({loss_key: loss, "num-examples": num_examples}),
    })


fedavg_app = ClientApp()
stats_app = ClientApp()


@fedavg_app.train()
def _fedavg_train(message: Message, context: Context) -> Message:
    # The flwr quickstart reports "train_loss"; the fedcca ClientApp "train-loss".
    return Message(_train_reply(message, "train_loss")[2], reply_to=message)


@stats_app.train()
def _stats_train(message: Message, context: Context) -> Message:
    received, trained, content = _train_reply(message, "train-loss")
    if message.content["config"].get(COMPUTE_STATS_FLAG, False):
        stats = collect_statistics(received, [trained], CALIBRATION)[0]
        content[STATISTICS_KEY] = statistics_to_record(stats)
    return Message(content, reply_to=message)


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
    return app(message, Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(),
                                run_config={}))


class FakeGrid(LocalGrid):
    """A Grid whose ``send_and_receive`` runs each node's ClientApp in this process.

    Args:
        apps: ClientApp (or any ``(Message, Context) -> Message``) per node id.
        silent: Node ids that never reply (dropouts).
    """

    def __init__(self, apps: dict[int, Callable[[Message, Context], Message]],
                 silent: Iterable[int] = ()) -> None:
        super().__init__()
        self.apps, self.silent = apps, set(silent)
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        """All node ids, replying or not."""
        return list(self.apps)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Run every addressed ClientApp; an exception becomes an error reply."""
        replies = []
        for message in messages:
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if node_id in self.silent:
                continue
            try:
                replies.append(run_app(self.apps[node_id], message))
            except Exception as err:  # what a SuperNode reports for a crashed ClientApp
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=message))
        return replies


def train_messages(arrays: ArrayRecord, node_ids: Iterable[int], compute_stats: bool = True,
                   server_round: int = 1) -> list[Message]:
    """Train instructions as a strategy would send them (for calling ClientApps directly)."""
    set_task_identity()
    config = ConfigRecord({"server-round": server_round, COMPUTE_STATS_FLAG: compute_stats})
    return [Message(RecordDict({"arrays": arrays, "config": config}), node_id, MessageType.TRAIN)
            for node_id in node_ids]


# ---------------------------------------------------------------------- malformed replies


def _replace_array(record: ArrayRecord, key: str, value: np.ndarray) -> None:
    record[key] = Array(value)


def _first_key(record: ArrayRecord) -> str:
    return next(iter(record))


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
    key = next(key for key in record if key.endswith("/sq_b"))
    _replace_array(record, key, np.zeros((2, 2)))


_MISSING = object()

# name -> (mutation of a valid reply's content, words the rejection reason must contain)
MUTATIONS: dict[str, tuple[Callable[[RecordDict], None], str]] = {
    "missing weights": (lambda c: c.__delitem__("arrays"), "missing ArrayRecord"),
    "extra ArrayRecord": (lambda c: c.__setitem__("extra", ArrayRecord()), "unexpected ArrayRecord"),
    "extra ConfigRecord": (lambda c: c.__setitem__("cfg", ConfigRecord({"a": 1})), "unexpected ConfigRecord"),
    "no MetricRecord": (lambda c: c.__delitem__("metrics"), "exactly one MetricRecord"),
    "two MetricRecords": (lambda c: c.__setitem__("more", MetricRecord({"num-examples": 1})),
                          "exactly one MetricRecord"),
    "missing weight key": (lambda c: c["arrays"].__delitem__("fc3.bias"), "weight keys differ"),
    "extra weight key": (lambda c: _replace_array(c["arrays"], "fc4.weight", np.zeros(3, np.float32)),
                         "weight keys differ"),
    "wrong shape": (lambda c: _replace_array(c["arrays"], "fc1.bias", np.zeros(7, np.float32)), "shape"),
    "wrong dtype": (lambda c: _replace_array(c["arrays"], "fc1.bias", np.zeros(HIDDEN1, np.float64)),
                    "dtype"),
    "undecodable weight": (lambda c: c["arrays"].__setitem__("fc1.bias", Array(
        dtype="float32", shape=(HIDDEN1,), stype="numpy.ndarray", data=b"not an npy file")),
        "cannot be decoded"),
    "NaN weight": (_poison_weight(float("nan")), "non-finite"),
    "inf weight": (_poison_weight(float("inf")), "non-finite"),
    "non-finite statistics": (_poison_statistics, "invalid statistics"),
    "statistics of the wrong size": (_resize_statistics, "invalid statistics"),
    "statistics missing a point": (lambda c: [c[STATISTICS_KEY].__delitem__(k) for k in list(
        c[STATISTICS_KEY]) if k.startswith("fc2/")], "invalid statistics"),
    "num-examples missing": (_set_num_examples(_MISSING), "lacks 'num-examples'"),
    "num-examples zero": (_set_num_examples(0), "positive"),
    "num-examples negative": (_set_num_examples(-5.0), "positive"),
    "num-examples NaN": (_set_num_examples(float("nan")), "positive"),
    "num-examples inf": (_set_num_examples(float("inf")), "positive"),
    "num-examples a list": (_set_num_examples([1, 2]), "not a number"),
}
