"""Direct: no alignment, the plain weighted average of the models (FedAvg)."""

from __future__ import annotations

from fedcca.methods.registry import Aligner, AlignmentJob, register
from fedcca.spec.alignment import Transform


def transforms(_: AlignmentJob) -> dict[str, Transform]:
    """No transforms: every point is averaged as it is."""
    return {}


register(Aligner("direct", False, transforms, "no alignment: the plain (FedAvg) average"))
