"""A reply screen around any Flower strategy: outlying updates are dropped before aggregation.

:class:`ScreenReplies` wraps a strategy (FedAvg, FedProx, CCAMerge, ...) the way Flower's
differential-privacy wrappers do. Every reply's update ``d_k = w_k - g`` (its weights minus
the global model ``g`` it was sent) is measured, and a reply is dropped when

* ``|d_k| > max_update_norm * |g|`` — a bound centred on the global model, which holds at
  any number of replies (two included: a median of two is their mean); or
* at least three replies arrived and ``|d_k| > max_ratio * median_j |d_j|``, the median of the
  updates measured so far (replies are screened as they arrive; the first three wait for each
  other).

Every reply is validated before anything is decoded (:func:`fedcca.flower.protocol.validate_reply`:
declared shapes, dtypes and byte sizes of the global model's keys, finite values, exactly one
``MetricRecord`` with a positive ``num-examples``, no foreign record), so a reply the screen
cannot measure is dropped, never passed on unmeasured; one reply's failure, whatever it is,
drops that reply alone. Dropped replies are taken out of the stream, so a wrapped strategy
never sees them (Flower's differential-privacy wrappers skip a whole round when any reply is an
error); :meth:`ScreenReplies.screened_out` lists them with their reasons, and a round record of
the wrapped strategy (CCAMerge's, through any wrapper) gets the screen's reason. With a global
model of norm 0 (e.g. zero-initialised) the ``|g|`` bound cannot scale and is not applied (logged):
the median bound alone holds, with three replies or more.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcca.flower.protocol import (
    NUM_EXAMPLES_KEY,
    WEIGHTS_KEY,
    DecodedWeights,
    InvalidReplyError,
    validate_reply,
)
from fedcca.flower.streaming import RunningMedian
from fedcca.flower.wrapper import StrategyWrapper, find_attribute

SCREEN_ERROR_CODE = 4000
"""``Error.code`` of a reply the screen dropped (:meth:`ScreenReplies.screen` yields them; the wrapped
strategy never sees them)."""

DEFAULT_MAX_UPDATE_NORM = 10.0
"""Default bound on ``|w_k - g| / |g|``: an honest round of local SGD moves the weights by a
fraction of their norm to a few times it (measured: docs/robustness.md)."""

DEFAULT_MAX_RATIO = 10.0
"""Default bound on ``|d_k|`` in median update norms (three replies or more)."""


@dataclass(frozen=True)
class UpdateScreen:
    """The bounds on a reply's update ``|w_k - g|`` (see the module docstring), for any strategy's replies.

    Used by :class:`ScreenReplies` around any Flower strategy and by
    :class:`~fedcca.flower.strategy.CCAMerge` itself.

    Args:
        max_update_norm: Largest ``|w_k - g| / |g|`` (None: no such bound).
        max_ratio: Largest ``|w_k - g| / median_j |w_j - g|`` with three replies or more (None: off).
    """

    max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM
    max_ratio: float | None = DEFAULT_MAX_RATIO

    def __post_init__(self) -> None:
        for name, value in (("max_update_norm", self.max_update_norm), ("max_ratio", self.max_ratio)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (None: off), got {value!r}")

    def screen(self, replies: Iterable[Message], template: Mapping[str, torch.Tensor], key: str = WEIGHTS_KEY,
               weighted_by: str = NUM_EXAMPLES_KEY, decoded: DecodedWeights | None = None) -> Iterator[Message]:
        """``replies`` with every reply that breaks a bound or cannot be measured replaced by an error reply
        (code :data:`SCREEN_ERROR_CODE`) naming why, lazily; a client's own error reply is passed on.

        The median bound is causal (:class:`~fedcca.flower.streaming.RunningMedian`): the first
        three measured replies wait and are judged against their median, every later one against
        the median of all measured so far, its own included; with fewer than three, no median.

        Args:
            replies: One round's replies (any iterable, read once).
            template: The global model's state dict (keys, shapes, dtypes a reply must have; its
                floating-point entries are the center).
            key: Record name of the weights (else a reply's only ``ArrayRecord``).
            weighted_by: Metric holding the number of examples.
            decoded: Where the weights of the replies passed on are kept for the strategy that
                merges them (each reply decoded once; None: not kept).
        """
        center = _floats(template)
        scale = float(torch.linalg.vector_norm(_flat(center).double()))
        if scale == 0 and self.max_update_norm is not None:
            log(WARNING, "[fedcca] screen: the global model's norm is 0: the bound max_update_norm x |g| is not "
                "applied this round (the median bound still is, with three replies or more)")
        medians: RunningMedian[tuple[Message, float | None]] = RunningMedian(warmup=3)
        scratch: dict[str, torch.Tensor] = {}
        for reply in replies:
            if reply.has_error():
                yield reply
                continue
            try:
                norm = _update_norm(reply, template, center, key, weighted_by, decoded, scratch)
            except InvalidReplyError as err:
                yield _dropped(reply, f"cannot be measured: {err}")
                continue
            except Exception as err:  # pylint: disable=broad-except  # one reply never ends the round
                yield _dropped(reply, f"cannot be measured: {type(err).__name__}: {err}")
                continue
            for (decided, measured), typical in medians.push((reply, norm), norm):
                yield self._judged(decided, measured, scale, typical, decoded)
        for (decided, measured), _ in medians.flush():
            yield self._judged(decided, measured, scale, None, decoded)
        if medians.values and scale > 0:
            ratios = [norm / scale for norm in medians.values]
            typical = medians.median
            spread = f", largest {max(medians.values) / typical:.3g}x the median" if typical else ""
            log(INFO, "[fedcca] screen: %d update(s) of %.3g-%.3gx the global model's norm%s", len(ratios),
                min(ratios), max(ratios), spread)

    def _judged(self, reply: Message, norm: float | None, scale: float, typical: float | None,
                decoded: DecodedWeights | None = None) -> Message:
        """``reply``, or an error reply in its place when ``norm`` breaks a bound (its decoded weights forgotten)."""
        if norm is None:
            return reply
        reason = None
        if self.max_update_norm is not None and scale > 0 and not norm <= self.max_update_norm * scale:
            reason = (f"update norm {norm:.3g} is {norm / scale:.3g}x the global model's "
                      f"norm (screen bound max_update_norm={self.max_update_norm:g})")
        elif self.max_ratio is not None and typical is not None and not norm <= self.max_ratio * typical:
            reason = (f"update norm {norm:.3g} is {norm / typical if typical else math.inf:.3g}x the median update "
                      f"norm {typical:.3g} (screen bound max_ratio={self.max_ratio:g})")
        if reason is None:
            return reply
        if decoded is not None:
            decoded.take(reply)
        return _dropped(reply, reason)

    def describe(self) -> str:
        """The bounds, for a summary line."""
        return (f"|w - g| <= {'inf' if self.max_update_norm is None else f'{self.max_update_norm:g}'} x |g|, "
                f"<= {'inf' if self.max_ratio is None else f'{self.max_ratio:g}'} x median (3+ replies)")


class ScreenReplies(StrategyWrapper):
    """Wrap ``strategy`` so that replies with outlying updates are dropped before it aggregates.

    Args:
        strategy: The wrapped strategy.
        max_update_norm: Largest ``|w_k - g| / |g|`` (None: no such bound).
        max_ratio: Largest ``|w_k - g| / median_j |w_j - g|`` with three replies or more (None: off).
    """

    def __init__(self, strategy: Strategy, *, max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM,
                 max_ratio: float | None = DEFAULT_MAX_RATIO) -> None:
        try:
            self.bounds = UpdateScreen(max_update_norm, max_ratio)
        except ValueError as err:
            raise ValueError(f"ScreenReplies: {err}") from None
        super().__init__(strategy)
        self._global: tuple[int, dict[str, torch.Tensor]] | None = None
        self._dropped: dict[int, dict[int, str]] = {}  # round -> node id -> reason

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's instructions; the global model sent is kept as the screen's center."""
        self._global = (server_round, {key: value.detach().cpu() for key, value in arrays.to_torch_state_dict().items()})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of the replies the screen kept.

        ``replies`` is read lazily (it may be :func:`~fedcca.flower.streaming.stream_replies`):
        a reply is passed on as soon as it is decided, at most two wait for the median. Dropped
        replies are not passed on; after the aggregation, the wrapped strategy's round record (if
        it keeps one) lists them with the screen's reasons.
        """
        if self._global is None or self._global[0] != server_round:
            raise RuntimeError(f"ScreenReplies: aggregate_train of round {server_round} without its configure_train "
                               "(the screen measures updates from the global model that was sent)")
        dropped: dict[int, str] = {}
        self._dropped[server_round] = dropped
        template = self._global[1]

        def screened() -> Iterator[Message]:
            key = getattr(self.strategy, "arrayrecord_key", None) or WEIGHTS_KEY
            weighted_by = getattr(self.strategy, "weighted_by_key", None) or NUM_EXAMPLES_KEY
            for reply in self.bounds.screen(replies, template, key, weighted_by):
                if reply.has_error() and reply.error.code == SCREEN_ERROR_CODE:
                    dropped[reply.metadata.src_node_id] = reply.error.reason
                    continue
                yield reply

        # a strategy that does not declare it reads a stream once gets a list (Flower's adaptive clipping reads twice)
        kept: Iterable[Message] = screened() if getattr(self.strategy, "accepts_stream", False) else list(screened())
        result = self.strategy.aggregate_train(server_round, kept)
        own = find_attribute(self.strategy, "round_record")
        record = own(server_round) if callable(own) else None
        if record is not None:
            for node_id, reason in dropped.items():
                record.dropped[node_id] = reason  # not "no reply": the screen took it out
        return result

    def screened_out(self, server_round: int) -> dict[int, str]:
        """Node id -> why the screen dropped its reply in ``server_round`` (empty when none was)."""
        return dict(self._dropped.get(server_round, {}))

    def summary(self) -> None:
        """The wrapped strategy's summary and the screen's bounds."""
        self.strategy.summary()
        log(INFO, "\t├──> Reply screen: %s", self.bounds.describe())


def _floats(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in state.items() if value.is_floating_point()}


def _flat(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in state.values()]) if state else torch.zeros(0)


def _dropped(reply: Message, reason: str) -> Message:
    """An error reply from the same sender, with the same ids, naming why the screen dropped ``reply``."""
    log(INFO, "[fedcca] screen: reply of node %d dropped: %s", reply.metadata.src_node_id, reason)
    return Message(error=Error(code=SCREEN_ERROR_CODE, reason=reason), metadata=copy.copy(reply.metadata))


def _update_norm(reply: Message, template: Mapping[str, torch.Tensor], center: Mapping[str, torch.Tensor],
                 key: str, weighted_by: str, decoded: DecodedWeights | None = None,
                 scratch: dict[str, torch.Tensor] | None = None) -> float:
    """``|w - g|`` over the global model's floating-point keys.

    The reply is validated first as a strategy would (no array decoded before its declared
    shape, dtype and size are checked); InvalidReplyError names what is wrong. ``scratch`` keeps
    one buffer per key for ``w - g`` across the replies of a round (None: allocated per call).
    """
    update = validate_reply(reply, template, None, weights_key=key, weighted_by_key=weighted_by, decoded=decoded)
    if decoded is not None:  # the merge takes them instead of decoding the reply again
        decoded.put(reply, update.state_dict)
    scratch = {} if scratch is None else scratch
    total = 0.0
    for name, value in center.items():
        weights = update.state_dict[name]
        if name not in scratch:
            scratch[name] = torch.empty_like(value)
        difference = torch.sub(weights, value, out=scratch[name]).reshape(-1)  # in the model's dtype: no float64 copy
        if difference.dtype in (torch.float32, torch.float64):
            squared = float(torch.dot(difference, difference))
        else:
            squared = float(torch.linalg.vector_norm(difference)) ** 2
        if not math.isfinite(squared):  # overflowed there (a half-precision model, or a huge update): exactly
            squared = float(torch.dist(weights.double(), value.double())) ** 2
        total += squared
    return math.sqrt(total) if math.isfinite(total) else math.inf
