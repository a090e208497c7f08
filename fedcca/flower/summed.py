"""A round of client-side alignment: the replies' contributions are summed, the server only finishes the merge.

Each valid reply carries its weights (its first form's) and the rest of its contribution
(:mod:`fedcca.flower.client_alignment`), checked against the layout the search implies before anything is decoded. The weighted sum is streamed
(one reply held at a time) with the same weight cap as a server-side round; then
:func:`fedcca.merging.contribution.absorb` hands it to a merger onto the global model, whose
``finish`` recomputes BatchNorm, applies REPAIR and chooses among the candidates on the hold-out set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedcca.flower.aggregation import RoundAggregation
from fedcca.flower.client_alignment import (
    ALIGNED_KEY,
    decode_aligned,
    reply_weight_names,
    with_reply_weights,
)
from fedcca.flower.protocol import ClientUpdate, InvalidReplyError
from fedcca.merging.contribution import absorb
from fedcca.merging.merger import Merger, MergeResult


class SummedAggregation(RoundAggregation):
    """The aggregation of one client-aligned round (same arguments as :class:`RoundAggregation`)."""

    @property
    def streams(self) -> bool:
        """Always: the global model is the reference and the contributions are summed."""
        return True

    def run(self, replies: Iterable[Message]) -> MergeResult:
        """Sum the valid replies' contributions and finish the merge; SkipRound when no model can be made."""
        record = self.record
        global_model = self._model_from(self._global().to_torch_state_dict())
        record.reference = "global"
        started = time.perf_counter()
        total: dict[str, torch.Tensor] = {}
        weight_sum = 0.0
        merger = Merger(global_model, self.settings.calibration, self.settings.search, holdout=self.settings.holdout,
                        spec=self.settings.spec, device=self.settings.device, batch_size=self.settings.batch_size)
        names = reply_weight_names(merger)
        with self._merging(started):
            for update, weight in self._capped(self._updates(replies)):
                assert update.aligned is not None
                whole = with_reply_weights(names, update.aligned, update.state_dict)
                for name, value in whole.items():
                    if name in total:
                        total[name].add_(value, alpha=weight)  # in place: no tensor per reply and entry
                    else:
                        # float32 at least, as FedAvg: a relative error of about K x 2^-24, far below one
                        # local step's change; a float64 sum costs 4-8x the time of the addition itself
                        total[name] = value.to(torch.promote_types(value.dtype, torch.float32)) * weight
                weight_sum += weight
                self.metrics.append(RecordDict({"metrics": update.metrics}))
            if self.metrics:
                absorb(merger, total, weight_sum)
            return self._finish(merger)

    def _updates(self, replies: Iterable[Message]) -> Iterator[ClientUpdate]:
        """Valid replies whose contribution fits the search's layout, decoded one at a time."""
        for msg in replies:
            for update in super()._updates([msg]):
                record = msg.content.get(ALIGNED_KEY)  # validated: a reply's only records of that name are arrays
                try:
                    if not isinstance(record, ArrayRecord):
                        raise InvalidReplyError(f"missing ArrayRecord '{ALIGNED_KEY}' (client-side alignment was "
                                                "asked for)")
                    update.aligned = decode_aligned(record, self.settings.aligned_layout)
                    self._check_growth(update)
                except InvalidReplyError as err:
                    self._drop(update.node_id, str(err))
                    continue
                yield update

    def _check_growth(self, update: ClientUpdate) -> None:
        """Each aligned form's weights within ``max_norm_growth`` of the reply's own weights' norm (the bound
        a server-side alignment puts on them): honest alignment moves features, not the weights' scale.
        When every form aligns, the reply's weights are aligned ones, bounded by the screen as any reply."""
        bound = self.settings.max_norm_growth
        if bound is None or update.aligned is None:
            return
        forms: dict[str, list[torch.Tensor]] = {}
        for name, value in update.aligned.items():
            form, kind, _ = name.split("/", 2) if name.count("/") >= 2 else (name, "", "")
            if kind == "weights":
                forms.setdefault(form, []).append(value)
        if not forms:
            return
        plain = _norm(value for value in update.state_dict.values() if value.is_floating_point())
        for form, values in forms.items():
            growth = _norm(values) / plain if plain > 0 else float("inf")
            if not 1 / bound <= growth <= bound:
                raise InvalidReplyError(f"aligned {form} weights have {growth:.3g}x the norm of the reply's own "
                                        f"(bound {bound:g}x)")


def _norm(values: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(v.float())) ** 2 for v in values))
