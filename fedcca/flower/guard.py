"""A guard across rounds: a round's chosen merge never strands the federation.

The candidate choice (:func:`fedcca.merging.selection.choose`) looks at one round: the most
accurate merge on the held-out set. Under label skew a merge can win its round and still be a
model that local SGD cannot train from (docs/results.md; every client came back dead, and the
federation stayed at chance while FedAvg trained on). What the clients do with a model shows
only in the next round, so :class:`CollapseGuard` compares each round's chosen merge with the
global model the clients started from, on the same held-out examples:

* when the global model was a non-baseline candidate (e.g. ``cca +affine``) and the merge is worse
  than it by more than ``min_z`` paired standard errors, that candidate did not train well: the
  guard **rolls back** to the baseline merge of the global model's round (FedAvg's average, which
  FedAvg would have broadcast) when that average is at least as accurate on the hold-out set as the
  new merge, and keeps the baseline in the next round too (**probation**) unless a merge is better
  than it by ``min_z`` standard errors;
* when the global model was the baseline, only a **collapse** acts — the merge lost more than half
  of the global model's gain over chance *and* is worse by ``min_z`` standard errors (ordinary
  non-IID oscillation loses less): the guard **keeps** the global model once (never twice in a
  row, so that a run cannot stall).

Every action is logged at WARNING with its reason and returned as a dict for the round's record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from fedcca.flower.records import RoundRecord
from fedcca.merging.merger import MergeResult
from fedcca.merging.selection import holdout_losses, paired_z


@dataclass
class _Accepted:
    """What a round broadcast: its model's held-out correctness and, when a non-baseline candidate won,
    that round's baseline merge (the fallback)."""

    round: int
    label: str
    baseline: dict[str, torch.Tensor] | None
    baseline_label: str | None
    kept: bool = False


class CollapseGuard:
    """Decides, per round, whether the chosen merge is broadcast, rolled back or the global model kept.

    Args:
        holdout: Labelled held-out ``(inputs, labels)`` (the data the candidates are chosen on).
        min_z: Paired standard errors by which a collapse must be significant.
        device: Where the held-out forwards run.
        batch_size: Held-out batch size.
    """

    def __init__(self, holdout: tuple[torch.Tensor, torch.Tensor], *, min_z: float = 2.0,
                 device: torch.device | str | None = None, batch_size: int = 256) -> None:
        self.holdout = holdout
        self.min_z = min_z
        self.device = device
        self.batch_size = batch_size
        self._last: _Accepted | None = None
        self._probation: int | None = None  # the round that must keep the baseline

    def in_probation(self, server_round: int) -> bool:
        """Whether ``server_round`` follows a rollback (its baseline merge is broadcast, whatever won)."""
        return self._probation == server_round

    def decide(self, server_round: int, sent: nn.Module | None, chosen: nn.Module, label: str,
               baseline: nn.Module | None, baseline_label: str | None,
               chosen_z: float = 0.0) -> tuple[nn.Module, dict[str, Any] | None]:
        """The model to broadcast after ``server_round``, and the guard's action for the record (None: none).

        Args:
            server_round: The round.
            sent: The global model the clients trained from (None: unknown).
            chosen: The round's chosen merge.
            label: Its label.
            baseline: The round's baseline merge (None when there was no choice).
            baseline_label: Its label.
            chosen_z: The chosen merge's paired accuracy gain over the baseline, in standard errors.
        """
        action: dict[str, Any] | None = None
        out, out_label = chosen, label
        # probation keeps the baseline unless the chosen merge is clearly better than it this round
        if self.in_probation(server_round) and baseline is not None and label != baseline_label \
                and not chosen_z > self.min_z:
            out, out_label = baseline, str(baseline_label)
            action = {"action": "probation", "reason": f"the round after a rollback keeps the baseline "
                      f"{baseline_label} (chosen was {label})"}
        elif self._last is not None and sent is not None and not self._last.kept:
            action = self._collapse(server_round, sent, chosen, label)
            if action is not None:
                out, out_label = self._fallback(server_round, sent, chosen, label, action)
        if action is not None:
            log(WARNING, "[fedcca] guard: round %s: %s", server_round, action["reason"])
        keeps_baseline = baseline is None or out_label == baseline_label
        self._last = _Accepted(server_round, out_label,
                               None if keeps_baseline else {k: v.detach().cpu().clone()
                                                            for k, v in baseline.state_dict().items()},
                               baseline_label, kept=action is not None and action["action"] == "keep")
        return out, action

    def apply(self, record: RoundRecord, sent: nn.Module | None, result: MergeResult) -> nn.Module:
        """:meth:`decide` for one round's merge result; the action goes to ``record.guard`` (and, when the chosen
        merge is not what is broadcast, to its ``merge_choice``, e.g. ``"cca +affine -> rollback"``)."""
        baseline = result.baseline_config.label() if result.baseline_config is not None else None
        chosen_z = next((score.z for score in result.scores if score.chosen), 0.0)
        model, record.guard = self.decide(record.round, sent, result.model, result.config.label(), result.baseline,
                                          baseline, chosen_z)
        if record.guard is not None and record.guard["action"] in ("rollback", "keep", "probation"):
            record.merge_choice = f"{result.config.label()} -> {record.guard['action']}"
        return model

    def _collapse(self, server_round: int, sent: nn.Module, chosen: nn.Module, label: str) -> dict[str, Any] | None:
        """A record of the collapse when ``chosen`` is significantly worse than ``sent`` on the hold-out set and
        either ``sent`` was a non-baseline candidate or ``chosen`` lost more than half of ``sent``'s gain over chance."""
        inputs, labels = self.holdout
        _, before = holdout_losses(sent, inputs, labels, device=self.device, batch_size=self.batch_size)
        _, after = holdout_losses(chosen, inputs, labels, device=self.device, batch_size=self.batch_size)
        before_acc, after_acc = before.double().mean().item(), after.double().mean().item()
        chance = 1.0 / max(int(labels.max()) + 1, 2)  # the classes the hold-out set shows
        z = paired_z(after.double() - before.double())
        assert self._last is not None
        declined = z < -self.min_z and self._last.baseline is not None  # a non-baseline model did not train well
        collapsed = z < -self.min_z and after_acc - chance < (before_acc - chance) / 2
        if not (declined or collapsed):
            return None
        return {"action": "collapse", "accuracy": after_acc, "previous_accuracy": before_acc, "z": z,
                "reason": f"{label} scores {after_acc:.4f} on the hold-out set against {before_acc:.4f} for the "
                          f"global model the clients trained from (z {z:.2f})"}

    def _fallback(self, server_round: int, sent: nn.Module, chosen: nn.Module, label: str,
                  action: dict[str, Any]) -> tuple[nn.Module, str]:
        """Roll back to the previous round's baseline (a non-baseline model was broadcast) when it is at least as
        accurate on the hold-out set as ``chosen``; keep ``sent`` after a collapse from a baseline; else
        ``chosen`` stands (action "none": the fallback would be worse)."""
        last = self._last
        assert last is not None
        if last.baseline is not None:
            model = _like(sent, last.baseline)
            inputs, labels = self.holdout
            fallback = holdout_losses(model, inputs, labels, device=self.device, batch_size=self.batch_size)[1]
            fallback_acc = fallback.double().mean().item()
            if fallback_acc < action["accuracy"]:
                action.update(action="none", fallback_accuracy=fallback_acc)
                action["reason"] += (f"; round {last.round}'s baseline {last.baseline_label} scores "
                                     f"{fallback_acc:.4f}, lower: {label} is kept")
                return chosen, label
            self._probation = server_round + 1
            action.update(action="rollback", to=f"round {last.round} {last.baseline_label}",
                          fallback_accuracy=fallback_acc)
            action["reason"] += (f": round {last.round}'s {last.label} did not train well; rolled back to that "
                                 f"round's baseline {last.baseline_label} ({fallback_acc:.4f}), kept next round "
                                 "unless a merge is clearly better")
            return model, f"{last.baseline_label} (round {last.round})"
        action.update(action="keep")
        action["reason"] += "; the global model is kept this round"
        return sent, last.label


def _like(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding ``state``."""
    out = copy.deepcopy(model)
    out.load_state_dict(state)
    return out
