"""What a reply adds to the distillation teacher: its outputs on the public images and its label counts.

A client reports its per-class training-example counts as the list metric
:data:`LABEL_COUNTS_KEY` only when the train config sets :data:`LABEL_COUNTS_FLAG` (the strategy
sets it when a ``"label-counts"`` teacher is configured): the server then learns every client's
label histogram, a privacy cost a deployment may refuse by not configuring that teacher.
"""

from __future__ import annotations

import math
from logging import WARNING

import torch
from flwr.app import MetricRecord
from flwr.common.logger import log
from torch import nn

from fedcca.flower.protocol import LABEL_COUNTS_FLAG, LABEL_COUNTS_KEY  # noqa: F401  (documented here)
from fedcca.merging.selection import holdout_logits
from fedcca.merging.teachers import TeacherSum


def label_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """A client's training examples per class, as it reports them."""
    return torch.bincount(labels.long().cpu(), minlength=num_classes)[:num_classes].tolist()


def reported_counts(metrics: MetricRecord, num_classes: int, node_id: int) -> torch.Tensor | None:
    """The reply's label counts, or None (logged) when it sent none or they are malformed."""
    value = metrics.get(LABEL_COUNTS_KEY)
    if value is None:
        log(WARNING, "teacher: node %s sent no '%s': its votes count as even over the classes",
            node_id, LABEL_COUNTS_KEY)
        return None
    counts = list(value) if isinstance(value, list) else [value]
    if len(counts) != num_classes or not all(math.isfinite(c) and c >= 0 for c in counts) or sum(counts) <= 0:
        log(WARNING, "teacher: node %s sent malformed '%s' (%d values for %d classes, or negative, non-finite or "
            "all zero): its votes count as even over the classes", node_id, LABEL_COUNTS_KEY, len(counts), num_classes)
        return None
    return torch.tensor(counts, dtype=torch.float64)


def teacher_inputs(teacher: TeacherSum, model: nn.Module, images: torch.Tensor,
                   holdout: tuple[torch.Tensor, torch.Tensor] | None, metrics: MetricRecord, node_id: int,
                   device: torch.device | str | None) -> dict:
    """The keyword arguments of ``teacher.add`` for one client model (all but the weight): its outputs on
    ``images`` (the strategy's ``distill_images``) and, as the teacher needs, on the hold-out set and its
    label counts.

    Raises:
        ValueError: The model's outputs are not finite.
    """
    logits = _finite(holdout_logits(model, images, device=device), "calibration")
    inputs: dict = {"logits": logits}
    if teacher.needs_label_counts:
        inputs["label_counts"] = reported_counts(metrics, logits.shape[1], node_id)
    if teacher.needs_holdout_logits:
        assert holdout is not None
        inputs["holdout_logits"] = _finite(holdout_logits(model, holdout[0], device=device), "hold-out")
    return inputs


def _finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise ValueError(f"the model's outputs on the {where} data are not finite (distillation teacher)")
    return logits
