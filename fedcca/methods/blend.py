"""Blend: ``(1 - l) P + l C``, a convex combination of Permute's and CCA's transforms.

Parameters: CCA's and Permute's, and ``blend`` (``l``).
"""

from __future__ import annotations

from fedcca.methods import cca, permute
from fedcca.methods.common import with_inverse
from fedcca.methods.registry import Aligner, AlignmentJob, Parameter, number, register
from fedcca.spec.alignment import Transform


def blend_transform(first: Transform, second: Transform, weight: float, *, point: str = "?") -> Transform:
    """``T = (1 - weight) * first + weight * second`` with a numerically computed inverse.

    Args:
        first: E.g. the rescaled permutation (``weight = 0`` returns it exactly).
        second: E.g. the CCA transform (``weight = 1`` returns it exactly).
        weight: Blend weight in [0, 1].
        point: The point's name, for error messages.

    Raises:
        ValueError: The blend is singular or ill-conditioned (condition number > 1e12).
    """
    if weight == 0:
        return first
    if weight == 1:
        return second
    return with_inverse((1 - weight) * first.matrix + weight * second.matrix, f"blend {weight:g}", point)


# ----------------------------------------------------------------------------- the method

BLEND = Parameter("blend", 0.5, number("blend", 0.0, 1.0), "weight l of CCA in (1 - l) P + l C", label="l",
                  always_label=True)


def transforms(job: AlignmentJob) -> dict[str, Transform]:
    """The blend of Permute's and CCA's transforms at every point of ``job.spec``."""
    permuted, canonical = permute.transforms(job), cca.transforms(job)
    return {p.name: blend_transform(permuted[p.name], canonical[p.name], job.options["blend"], point=p.name)
            for p in job.spec.points}


register(Aligner("blend", True, transforms, "(1 - l) Permute + l CCA",
                 parameters=(cca.RIDGE, cca.RIDGE_MODE, permute.MAX_SCALE, BLEND), check_options=cca.check_ridge))
