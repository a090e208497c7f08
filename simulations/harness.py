"""Shared pieces of the benchmarks: an in-process Grid running our real ClientApp, run configs, output.

``InProcessGrid.send_and_receive`` calls ``clients.client_app.app`` directly, once per
addressed node, with the node config a SuperNode would give it (``partition-id``,
``num-partitions``). Strategies therefore run through Flower's Message API
(``strategy.start(grid=...)``) exactly as under ``flwr run``, without a SuperLink or Ray,
whose start-up dominates short runs on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app

ROOT = Path(__file__).resolve().parents[1]
ClientFn = Callable[[Message, Context], Message]


def base_run_config(**overrides: Any) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of pyproject.toml with ``overrides`` (``_`` stands for ``-``).

    Args:
        **overrides: Run-config values to replace, e.g. ``local_epochs=5``.

    Raises:
        KeyError: An override names a key the app does not define.
    """
    with open(ROOT / "pyproject.toml", "rb") as file:
        config = dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])
    for key, value in overrides.items():
        name = key.replace("_", "-")
        if name not in config:
            raise KeyError(f"run config has no key {name!r} (see [tool.flwr.app.config])")
        config[name] = value
    return config


def node_context(run_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> Context:
    """The Context a SuperNode started with ``--node-config "partition-id=.. num-partitions=.."`` gives.

    Args:
        run_config: The run config of the federation.
        partition_id: The node's shard.
        num_partitions: Number of shards (nodes).
    """
    return Context(run_id=1, node_id=partition_id + 1, state=RecordDict(), run_config=dict(run_config),
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions})


class InProcessGrid(Grid):
    """A Grid whose nodes are our ClientApp called in this process; node id = partition id + 1.

    Replies come back sorted by node id (as the ServerApp sorts them), so aggregation does
    not depend on sampling order. A ClientApp exception becomes an error reply, as a
    SuperNode would report it.

    Args:
        run_config: Run config handed to every ClientApp call.
        num_partitions: Number of nodes.
        app: The ClientApp (default: ``clients.client_app.app``).
    """

    def __init__(self, run_config: Mapping[str, Any], num_partitions: int, app: ClientFn = client_app) -> None:
        # Messages created outside a Flower runtime need the ServerApp's task identity.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.run_config = dict(run_config)
        self.num_partitions = num_partitions
        self.app = app

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Unused: there is no SuperLink run."""

    @property
    def run(self) -> None:  # type: ignore[override]
        """Unused: there is no SuperLink run."""
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Create an instruction message for ``dst_node_id``."""
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        """All node ids."""
        return list(range(1, self.num_partitions + 1))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError("InProcessGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Run the ClientApp of every addressed node, in node-id order; return the replies."""
        replies = []
        for message in sorted(messages, key=lambda msg: msg.metadata.dst_node_id):
            node_id = message.metadata.dst_node_id
            context = node_context(self.run_config, node_id - 1, self.num_partitions)
            try:
                replies.append(self.app(message, context))
            except Exception as err:  # pylint: disable=broad-except  # a crashed ClientApp
                logging.getLogger(__name__).error("node %s failed: %r", node_id, err)
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=message))
        return replies


def add_runtime_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """Add the options every benchmark has: ``--data-dir``, ``--threads``, ``--out``.

    Args:
        parser: The benchmark's parser.
        default_out: Default JSON path.
    """
    parser.add_argument("--data-dir", default="", help="dataset folder ('' = default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON output (PNGs beside it)")


def apply_runtime(args: argparse.Namespace) -> str | None:
    """Set torch's threads, silence Flower's per-reply INFO lines; return ``$OPENBLAS_NUM_THREADS``.

    Args:
        args: Parsed options of :func:`add_runtime_arguments`.
    """
    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return check_blas_threads()


def check_blas_threads() -> str | None:
    """Return ``$OPENBLAS_NUM_THREADS``; warn when it is unset.

    scipy's OpenBLAS starts one spinning thread per core: on a busy 2-core machine a
    128x128 ``scipy.linalg.eigh`` then took 1.2 s instead of 3-11 ms with one thread,
    which turns CCA Merge's transforms into the dominant cost. It must be set before
    numpy is imported, hence an environment variable (see the module docstrings' commands).
    """
    value = os.environ.get("OPENBLAS_NUM_THREADS")
    if value is None:
        logging.getLogger(__name__).warning(
            "OPENBLAS_NUM_THREADS is unset: scipy may spin one thread per core and inflate CCA "
            "timings on a busy machine; run with OPENBLAS_NUM_THREADS=1")
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder.

    Args:
        path: Output file.
        payload: JSON-serialisable mapping.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 4 significant digits.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row.
    """
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list[Any]:
    """Comma-separated CLI list, e.g. ``"1,5"`` -> ``[1, 5]`` with ``kind=int``.

    Args:
        text: The argument.
        kind: Converter of one item.
    """
    return [kind(item.strip()) for item in text.split(",") if item.strip()]
