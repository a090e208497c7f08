"""A Flower strategy around another one: every call forwarded, for wrappers to override a few.

The base of :class:`~fedcca.flower.screen.ScreenReplies` and
:class:`~fedcca.flower.recording.RecordRounds`, in the style of Flower's differential-privacy
wrappers. What the wrapped strategy offers beyond ``Strategy`` (e.g. CCAMerge's
``round_record``) stays reachable as an attribute of the wrapper, through any depth of wrapping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Forwards every ``Strategy`` call to ``strategy``.

    Args:
        strategy: The wrapped strategy.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __getattr__(self, name: str) -> object:
        if name == "strategy":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's train instructions."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of the train replies."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's evaluation instructions."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's aggregation of the evaluation replies."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.strategy.summary()


def find_attribute(strategy: Strategy, name: str) -> Any:
    """``name`` of the outermost strategy in the chain ``strategy``, ``strategy.strategy``, ... that has it
    (fedcca's and Flower's wrappers all keep the wrapped strategy as ``.strategy``), or None.

    Flower's differential-privacy wrappers do not forward unknown attributes: this finds CCAMerge's
    ``round_record`` inside them.
    """
    seen: set[int] = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        found = strategy.__dict__.get(name) if not hasattr(type(strategy), name) else getattr(strategy, name)
        if found is not None:
            return found
        strategy = strategy.__dict__.get("strategy")
    return None
