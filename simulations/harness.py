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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from clients.task import REFERENCES, STATISTICS_SOURCES
from fedcca.merging import METHODS

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


def set_task_identity() -> None:
    """Give this process the ServerApp identity Flower needs to create instruction messages."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class LocalGrid(Grid):
    """Base of the Grids that answer ``send_and_receive`` in this process (no SuperLink).

    Subclasses implement ``get_node_ids`` and ``send_and_receive``; the SuperLink-facing
    methods are unused here and say so.
    """

    def __init__(self) -> None:
        set_task_identity()  # messages created outside a Flower runtime need it

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

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Unused: see ``send_and_receive``."""
        raise NotImplementedError(f"{type(self).__name__} only supports send_and_receive")


class InProcessGrid(LocalGrid):
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
        super().__init__()
        self.run_config = dict(run_config)
        self.num_partitions = num_partitions
        self.app = app

    def get_node_ids(self) -> list[int]:
        """All node ids."""
        return list(range(1, self.num_partitions + 1))

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


BASELINE = "fedavg"


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of the comparison.

    Args:
        label: The name given on the command line (used in tables, plots and JSON).
        method: CCAMerge method, or None for Flower's FedAvg.
        reference: CCAMerge reference policy.
        stats: CCAMerge statistics source.
        overrides: Further run-config keys (``(key, value)`` pairs, keys with dashes).
    """

    label: str
    method: str | None
    reference: str = "global"
    stats: str = "client"
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        """Parse ``fedavg`` or ``METHOD[:REFERENCE[:STATS]][+KEY=VALUE...]``.

        Args:
            text: e.g. ``"cca:largest:server"`` or ``"cca+merge-guard=false"``.

        Raises:
            ValueError: Unknown method, reference or statistics source; a malformed override.
        """
        if text == BASELINE:
            return cls(text, None)
        head, *extra = text.split("+")
        overrides = tuple(_override(text, item) for item in extra)
        parts = head.split(":")
        if len(parts) > 3:
            raise ValueError(f"strategy {text!r}: expected METHOD[:REFERENCE[:STATS]]")
        method, reference, stats = (parts + ["global", "client"][len(parts) - 1:])[:3]
        for what, value, choices in (("method", method, METHODS), ("reference", reference, REFERENCES),
                                     ("stats", stats, STATISTICS_SOURCES)):
            if value not in choices:
                raise ValueError(f"strategy {text!r}: {what} must be one of {choices}, got {value!r}")
        return cls(text, method, reference, stats, overrides)

    def run_config(self) -> dict[str, Any]:
        """The run-config keys this strategy sets (underscores for dashes, as ``base_run_config`` takes them)."""
        if self.method is None:
            return {"strategy": BASELINE}
        return {"strategy": self.method, "reference": self.reference, "stats": self.stats,
                **{key.replace("-", "_"): value for key, value in self.overrides}}


def _override(text: str, item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML (``false``, ``0.5``, ``"affine"``; bare words are strings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"strategy {text!r}: override {item!r} is not KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def parse_strategies(text: str) -> list[StrategySpec]:
    """Parse a comma-separated ``--strategies`` value.

    Args:
        text: e.g. ``"fedavg,cca,permute"``.

    Raises:
        ValueError: An unknown or repeated strategy.
    """
    specs = [StrategySpec.parse(item) for item in parse_list(text)]
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--strategies lists a strategy twice: {labels}")
    return specs


def parse_benchmark(parser: argparse.ArgumentParser,
                    argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[StrategySpec], str | None]:
    """Parse a benchmark's command line (with ``--strategies``) and apply its runtime options.

    Returns:
        ``(args, strategies, $OPENBLAS_NUM_THREADS)``.
    """
    args = parser.parse_args(argv)
    blas_threads = apply_runtime(args)
    return args, parse_strategies(args.strategies), blas_threads


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
