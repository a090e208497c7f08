"""Replies as they arrive: Flower's ``send_and_receive``, one reply at a time.

``Grid.send_and_receive`` returns when every reply (or the timeout) is in and holds all of
them, so aggregation cannot start before the slowest client and the server's memory grows with
the number of clients. :func:`stream_replies` pushes the same instructions and yields each
reply as a pull brings it, with the same timeout rule, so a strategy that consumes its
``replies`` iterable lazily (:class:`~fedcca.flower.strategy.CCAMerge` with the "global"
reference, :class:`~fedcca.flower.screen.ScreenReplies`,
:class:`~fedcca.flower.recording.RecordRounds`) merges while other clients still train.

:class:`RunningMedian` is the causal rule the lazy consumers bound replies with: the median of
the values seen so far, undecided until ``warmup`` values are in.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedcca.flower.protocol import record_bytes

DEFAULT_PULL_INTERVAL = 0.1
"""Seconds between pulls while no reply arrives, for grids that do not set ``pull_interval``."""

T = TypeVar("T")


def stream_replies(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None,
                   pull_interval: float | None = None) -> Iterator[Message]:
    """Push ``messages`` now and return an iterator over their replies as pulls bring them.

    The rule of ``Grid.send_and_receive``: pull until every instruction has a reply or
    ``timeout`` seconds (wall clock, from the push) have passed; None waits for all. Time the
    consumer spends on a reply counts towards the timeout, as it would while waiting.

    Args:
        grid: Any Flower grid (``push_messages`` / ``pull_messages``).
        messages: The instructions.
        timeout: Seconds to wait for replies (None: until all are in).
        pull_interval: Seconds between pulls that bring nothing (default: the grid's
            ``pull_interval``, else :data:`DEFAULT_PULL_INTERVAL`).
    """
    pending = set(grid.push_messages(messages))
    interval = pull_interval if pull_interval is not None else getattr(grid, "pull_interval", DEFAULT_PULL_INTERVAL)
    deadline = None if timeout is None else time.time() + timeout
    return _pulled(grid, pending, deadline, interval)


def _pulled(grid: Grid, pending: set[str], deadline: float | None, interval: float) -> Iterator[Message]:
    while pending and (deadline is None or time.time() < deadline):
        arrived = list(grid.pull_messages(pending))
        while arrived:  # popped, so a reply is released once its consumer is done with it
            reply = arrived.pop(0)
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending:
            time.sleep(interval)


class StreamingGrid(Grid):
    """A grid whose ``send_and_receive`` returns :func:`stream_replies`: Flower's own
    ``Strategy.start`` loop then hands each strategy its replies as they arrive.

    Everything else is the wrapped grid's. ``RecordRounds.start`` and ``CCAMerge.start`` use it.

    Args:
        grid: The grid to wrap.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies as they arrive (an iterator, read once), instead of a list after the last."""
        return stream_replies(self.grid, messages, timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """The wrapped grid's."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The wrapped grid's."""
        return self.grid.pull_messages(message_ids)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """The wrapped grid's."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's."""
        return self.grid.get_node_ids()

    def set_run(self, run: Any) -> None:
        """The wrapped grid's."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped grid's."""
        return self.grid.run

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["grid"], name)  # e.g. pull_interval


class RunningMedian(Generic[T]):
    """Decide items against the median of the values seen so far, once ``warmup`` values are in.

    Items arrive with a value (or None: not measured, decided at once). The first ones wait
    until ``warmup`` values are known and are then decided against their median; later ones
    against the median of every value so far, their own included. With ``warmup`` or fewer
    items in all, :meth:`flush` decides the waiting ones without a median (None), as a
    whole-round median of so few values would not bound anything either.

    Args:
        warmup: Values needed before a median is used.
    """

    def __init__(self, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"RunningMedian: warmup must be >= 1, got {warmup}")
        self.warmup = warmup
        self.values: list[float] = []
        self._sorted: list[float] = []  # the same values in order: each median is a look-up
        self._waiting: list[T] = []

    @property
    def median(self) -> float | None:
        """The median of the values so far (None before ``warmup`` values)."""
        n = len(self._sorted)
        if n < self.warmup:
            return None
        middle = n // 2
        return float(self._sorted[middle] if n % 2 else (self._sorted[middle - 1] + self._sorted[middle]) / 2)

    def push(self, item: T, value: float | None) -> list[tuple[T, float | None]]:
        """Add ``item``; return the items decided now, each with the median to decide it by."""
        if value is None:
            return [(item, self.median)]
        self.values.append(value)
        bisect.insort(self._sorted, value)
        if len(self.values) < self.warmup:
            self._waiting.append(item)
            return []
        median = self.median
        decided, self._waiting = [(waiting, median) for waiting in self._waiting], []
        return decided + [(item, median)]

    def flush(self) -> list[tuple[T, float | None]]:
        """The items still waiting (fewer than ``warmup`` values arrived), with no median."""
        decided, self._waiting = [(waiting, None) for waiting in self._waiting], []
        return decided


class ReplyTally:
    """Wraps one round's replies (read once, lazily) and notes what the round record needs.

    Attributes:
        bytes_received: Node id -> payload bytes of its reply, in arrival order.
        count: Replies read so far (duplicates from one node included).
        errors: Replies that carried an error.
        error_reasons: Node id -> ``"error reply (code C): reason"`` of each reply that carried an error.
        waited: Seconds spent waiting for the next reply (client training, for a stream).
        ended: When the replies ended, on ``time.perf_counter()``'s clock (None before): the last
            reply's arrival, later by what the end of the stream was waited for (a timeout for a
            node that never replied); the handling of the last reply counts after it.
    """

    def __init__(self, replies: Iterable[Message]) -> None:
        self._source = replies
        self.bytes_received: dict[int, int] = {}
        self.count = 0
        self.errors = 0
        self.error_reasons: dict[int, str] = {}
        self.waited = 0.0
        self.ended: float | None = None

    def __iter__(self) -> Iterator[Message]:
        iterator = iter(self._source)
        last: float | None = None  # arrival of the last reply
        while True:
            asked = time.perf_counter()
            try:
                reply = next(iterator)
            except StopIteration:
                wait = time.perf_counter() - asked
                self.waited += wait
                self.ended = (asked if last is None else last) + wait
                return
            last = time.perf_counter()
            self.waited += last - asked
            self.bytes_received[reply.metadata.src_node_id] = record_bytes(reply)
            self.count += 1
            if reply.has_error():
                self.errors += 1
                self.error_reasons[reply.metadata.src_node_id] = \
                    f"error reply (code {reply.error.code}): {reply.error.reason}"
            yield reply

