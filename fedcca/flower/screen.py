"""A reply screen around any Flower strategy: outlying updates are dropped before aggregation.

:class:`ScreenReplies` wraps a strategy (FedAvg, FedProx, CCAMerge, ...) the way Flower's
differential-privacy wrappers do. Every reply's update ``d_k = w_k - g`` (its weights minus
the global model ``g`` it was sent) is measured, and a reply is dropped when

* ``|d_k| > max_update_norm * |g|`` — a bound centred on the global model, which holds at
  any number of replies (two included: a median of two is their mean); or
* at least three replies arrived and ``|d_k| > max_ratio * median_j |d_j|``, the median of the
  updates measured so far (replies are screened as they arrive; the first three wait for each
  other).

A dropped reply reaches the wrapped strategy as an error reply whose reason says which bound
it broke and by how much: FedAvg counts it among its failures and logs the reason, CCAMerge
records it as dropped. Only floating-point entries are measured; a reply without a
weights record (the wrapped strategy's ``arrayrecord_key``, or the reply's only ``ArrayRecord``)
with the global model's keys and shapes is passed on unchanged, for the wrapped strategy's own
validation to reject.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcca.flower.streaming import RunningMedian
from fedcca.flower.wrapper import StrategyWrapper

SCREEN_ERROR_CODE = 4000
"""``Error.code`` of a reply the screen dropped."""

DEFAULT_MAX_UPDATE_NORM = 10.0
"""Default bound on ``|w_k - g| / |g|``: an honest round of local SGD moves the weights by a
fraction of their norm to a few times it (measured: README, Reliability)."""

DEFAULT_MAX_RATIO = 10.0
"""Default bound on ``|d_k|`` in median update norms (three replies or more)."""


class ScreenReplies(StrategyWrapper):
    """Wrap ``strategy`` so that replies with outlying updates are dropped before it aggregates.

    Args:
        strategy: The wrapped strategy.
        max_update_norm: Largest ``|w_k - g| / |g|`` (None: no such bound).
        max_ratio: Largest ``|w_k - g| / median_j |w_j - g|`` with three replies or more (None: off).
    """

    def __init__(self, strategy: Strategy, *, max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM,
                 max_ratio: float | None = DEFAULT_MAX_RATIO) -> None:
        for name, value in (("max_update_norm", max_update_norm), ("max_ratio", max_ratio)):
            if value is not None and not value > 0:
                raise ValueError(f"ScreenReplies: {name} must be positive (None: off), got {value!r}")
        super().__init__(strategy)
        self.max_update_norm = max_update_norm
        self.max_ratio = max_ratio
        self._global: tuple[int, dict[str, torch.Tensor]] | None = None
        self._dropped: dict[int, dict[int, str]] = {}  # round -> node id -> reason

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's instructions; the global model sent is kept as the screen's center."""
        self._global = (server_round, _floats(arrays.to_torch_state_dict()))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of the replies, outliers turned into error replies.

        ``replies`` is read lazily (it may be :func:`~fedcca.flower.streaming.stream_replies`):
        a reply is passed on as soon as it is decided, at most two wait for the median.
        """
        if self._global is None or self._global[0] != server_round:
            raise RuntimeError(f"ScreenReplies: aggregate_train of round {server_round} without its configure_train "
                               "(the screen measures updates from the global model that was sent)")
        dropped: dict[int, str] = {}
        self._dropped[server_round] = dropped
        center = self._global[1]

        def screened() -> Iterator[Message]:
            for reply in self.screen(replies, center):
                if reply.has_error() and reply.error.code == SCREEN_ERROR_CODE:
                    dropped[reply.metadata.src_node_id] = reply.error.reason
                yield reply

        return self.strategy.aggregate_train(server_round, screened())

    def screened_out(self, server_round: int) -> dict[int, str]:
        """Node id -> why the screen dropped its reply in ``server_round`` (empty when none was)."""
        return dict(self._dropped.get(server_round, {}))

    def screen(self, replies: Iterable[Message], center: Mapping[str, torch.Tensor]) -> Iterator[Message]:
        """``replies`` with every outlier replaced by an error reply naming the bound it broke, lazily.

        The median bound is causal (:class:`~fedcca.flower.streaming.RunningMedian`): the first
        three measured replies wait and are judged against their median, every later one against
        the median of all measured so far, its own included; with fewer than three, no median.

        Args:
            replies: One round's replies (any iterable, read once).
            center: The global model's floating-point entries.
        """
        key = getattr(self.strategy, "arrayrecord_key", None)  # Flower strategies name their weights record
        scale = float(torch.linalg.vector_norm(_flat(center)))
        medians: RunningMedian[tuple[Message, float | None]] = RunningMedian(warmup=3)
        for reply in replies:
            norm = _update_norm(reply, center, key)
            for (decided, measured), typical in medians.push((reply, norm), norm):
                yield self._judged(decided, measured, scale, typical)
        for (decided, measured), _ in medians.flush():
            yield self._judged(decided, measured, scale, None)
        if medians.values and scale > 0:
            ratios = [norm / scale for norm in medians.values]
            typical = medians.median
            spread = f", largest {max(medians.values) / typical:.3g}x the median" if typical else ""
            log(INFO, "[fedcca] screen: %d update(s) of %.3g-%.3gx the global model's norm%s", len(ratios),
                min(ratios), max(ratios), spread)

    def _judged(self, reply: Message, norm: float | None, scale: float, typical: float | None) -> Message:
        """``reply``, or an error reply in its place when ``norm`` breaks a bound."""
        if norm is None:
            return reply
        reason = None
        if self.max_update_norm is not None and not norm <= self.max_update_norm * scale:
            reason = (f"update norm {norm:.3g} is {norm / scale if scale else math.inf:.3g}x the global model's "
                      f"norm (screen bound max_update_norm={self.max_update_norm:g})")
        elif self.max_ratio is not None and typical is not None and not norm <= self.max_ratio * typical:
            reason = (f"update norm {norm:.3g} is {norm / typical if typical else math.inf:.3g}x the median update "
                      f"norm {typical:.3g} (screen bound max_ratio={self.max_ratio:g})")
        if reason is None:
            return reply
        log(INFO, "[fedcca] screen: reply of node %d dropped: %s", reply.metadata.src_node_id, reason)
        # the same sender and ids, an error instead of the content
        return Message(error=Error(code=SCREEN_ERROR_CODE, reason=reason), metadata=copy.copy(reply.metadata))

    def summary(self) -> None:
        """The wrapped strategy's summary and the screen's bounds."""
        self.strategy.summary()
        log(INFO, "\t├──> Reply screen: |w - g| <= %s x |g|, <= %s x median (3+ replies)",
            "inf" if self.max_update_norm is None else f"{self.max_update_norm:g}",
            "inf" if self.max_ratio is None else f"{self.max_ratio:g}")


def _floats(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().double().cpu() for key, value in state.items() if value.is_floating_point()}


def _flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in state.values()]) if state else torch.zeros(0)


def _update_norm(reply: Message, center: Mapping[str, torch.Tensor], key: str | None) -> float | None:
    """``|w - g|`` over the global model's floating-point keys, or None when the reply cannot be measured.

    The weights are the ``ArrayRecord`` named ``key`` (else the reply's only one).
    """
    if reply.has_error() or not reply.has_content():
        return None
    records = reply.content.array_records
    if key is not None and key in records:
        record = records[key]
    elif len(records) == 1:
        record = next(iter(records.values()))
    else:
        return None
    if not set(center) <= set(record):
        return None
    total = 0.0
    for key, value in center.items():
        array = record[key]
        if tuple(array.shape) != tuple(value.shape):
            return None
        try:
            theirs = torch.from_numpy(np.asarray(array.numpy(), dtype=np.float64))
        except (TypeError, ValueError):
            return None
        total += float(torch.sum((theirs - value) ** 2))
    return math.sqrt(total) if math.isfinite(total) else math.inf
