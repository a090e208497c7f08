"""A Flower ``Grid`` whose nodes are ClientApps called in this process: no SuperLink, no Ray.

Strategies and the ServerApp's round loop run over it exactly as under ``flwr run`` (the
same Message API calls), in milliseconds per round for small models: the tests and the
benchmarks use it, and so can a user debugging a ClientApp.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

ClientFn = Callable[[Message, Context], Message]
"""A ClientApp, or anything called like one."""

logger = logging.getLogger(__name__)


def node_context(run_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> Context:
    """The Context a SuperNode started with ``--node-config "partition-id=.. num-partitions=.."`` gives.

    Args:
        run_config: The run config of the federation.
        partition_id: The node's shard.
        num_partitions: Number of shards (nodes).
    """
    return Context(run_id=1, node_id=partition_id + 1, state=RecordDict(), run_config=dict(run_config),
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions})


def set_task_identity() -> None:
    """Give this process the ServerApp identity Flower needs to create instruction messages."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class InProcessGrid(Grid):
    """A Grid whose nodes' ClientApps run in this process, when their replies are asked for.

    ``send_and_receive`` runs them all; ``pull_messages`` runs one per call (after
    ``push_messages``), so :func:`fedcca.flower.streaming.stream_replies` sees replies arrive
    one at a time.

    Replies come back sorted by node id (as the ServerApp sorts them), so aggregation does not
    depend on sampling order. A ClientApp exception becomes an error reply, as a SuperNode
    would report it. Every instruction is kept in ``sent``.

    Args:
        nodes: Node id -> ClientApp (or any ``(Message, Context) -> Message``).
        contexts: Node id -> the Context its ClientApp gets (default: an empty one).
        silent: Node ids that never reply (dropouts).
    """

    def __init__(self, nodes: Mapping[int, ClientFn], contexts: Mapping[int, Context] | None = None,
                 silent: Iterable[int] = ()) -> None:
        set_task_identity()  # messages created outside a Flower runtime need it
        self.nodes = dict(nodes)
        self.contexts = dict(contexts or {})
        self.silent = set(silent)
        self.sent: list[Message] = []
        self.pull_interval = 0.01  # replies are computed when pulled; only silent nodes are waited for
        self._pending: dict[str, Message] = {}

    @classmethod
    def of_app(cls, app: ClientFn, run_config: Mapping[str, Any], num_partitions: int) -> InProcessGrid:
        """``num_partitions`` nodes running ``app``; node ``i + 1`` holds partition ``i``.

        Args:
            app: The ClientApp.
            run_config: The run config every node receives.
            num_partitions: Number of nodes.
        """
        nodes = {p + 1: app for p in range(num_partitions)}
        return cls(nodes, {p + 1: node_context(run_config, p, num_partitions) for p in range(num_partitions)})

    def get_node_ids(self) -> list[int]:
        """All node ids, replying or not."""
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Run the ClientApp of every addressed node, in node-id order; return the replies."""
        return [self._reply(message) for message in sorted(messages, key=lambda msg: msg.metadata.dst_node_id)
                if not self._record(message)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue the instructions (ids assigned as a SuperLink does); their ClientApps run when pulled."""
        ids = []
        for message in sorted(messages, key=lambda msg: msg.metadata.dst_node_id):
            message.metadata.__dict__["_message_id"] = str(uuid4())  # what Flower's own grids do on push
            self._pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The reply to the first requested instruction still queued (node-id order), computed now.

        One reply per pull, so a loop over pulls sees replies arrive one at a time; a silent
        node's instruction stays queued and never brings a reply.
        """
        wanted = set(message_ids)
        for message_id, message in list(self._pending.items()):  # pushed in node-id order
            if message_id not in wanted or message.metadata.dst_node_id in self.silent:
                continue
            del self._pending[message_id]
            self._record(message)
            return [self._reply(message)]
        return []

    def _record(self, message: Message) -> bool:
        """Keep ``message`` in ``sent``; whether its node is silent."""
        self.sent.append(message)
        return message.metadata.dst_node_id in self.silent

    def _reply(self, message: Message) -> Message:
        """The node's ClientApp's reply to ``message`` (an error reply if it raises)."""
        node_id = message.metadata.dst_node_id
        # One Context per node for the whole run, as a SuperNode keeps it (mods such as SecAgg+ keep state in it).
        context = self.contexts.setdefault(node_id, Context(run_id=1, node_id=node_id, node_config={},
                                                            state=RecordDict(), run_config={}))
        try:  # a copy, as a transport delivers it: instructions may share records a mod edits in place (SecAgg+)
            return self.nodes[node_id](copy.deepcopy(message), context)
        except Exception as err:  # pylint: disable=broad-except  # a crashed ClientApp
            logger.error("node %s failed: %r", node_id, err)
            return Message(Error(code=1, reason=repr(err)), reply_to=message)

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Unused: there is no SuperLink run."""

    @property
    def run(self) -> SimpleNamespace:  # type: ignore[override]
        """A stand-in of the SuperLink run: only its ``run_id`` (1) is read, by Flower's legacy workflows."""
        return SimpleNamespace(run_id=1)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Create an instruction message for ``dst_node_id``."""
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

