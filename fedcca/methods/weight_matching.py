"""Git Re-Basin weight matching (Ainsworth et al., 2023): permutations from the weights alone (data free)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedcca.methods.common import block_mask, scaled_permutation
from fedcca.methods.registry import Aligner, AlignmentJob, register
from fedcca.spec.alignment import AlignmentSpec, ParamAxis, Transform


def weight_matching(
    reference_state: Mapping[str, torch.Tensor],
    other_state: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Transform]:
    """Git Re-Basin weight matching: permutations making ``other``'s weights closest to the reference's.

    Coordinate descent over the spec's points: for one point, with the other points'
    current permutations applied, the permutation maximising the summed inner product of all
    tensors along the point's axes is a linear assignment (every axis role is permuted
    alike). Points are visited in a random order each iteration; the descent stops after an
    iteration without improvement or after ``max_iter`` iterations. Data free.

    Args:
        reference_state: State dict of the reference model.
        other_state: State dict of the model to align (same keys and shapes).
        spec: Alignment spec; only its points are permuted.
        max_iter: Largest number of sweeps over the points.
        seed: Seed of the point order.

    Returns:
        ``{point name: Transform}`` (permutation matrices) for every point of ``spec``.
    """
    axes_of = _axes_by_key(spec)
    ref = {key: _float64(reference_state, key) for key in axes_of}
    other = {key: _float64(other_state, key) for key in axes_of}
    for key in axes_of:
        if ref[key].shape != other[key].shape:
            raise ValueError(f"weight_matching: '{key}' has shape {tuple(other[key].shape)}, "
                             f"the reference {tuple(ref[key].shape)}")
    perms = {point.name: torch.arange(point.size) for point in spec.points}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(spec.points)):
            point = spec.points[index]
            cost = torch.zeros(point.size, point.size, dtype=torch.float64)
            for axis in point.axes:
                mine = axis.rows(ref[axis.key])
                theirs = _permuted(other[axis.key], axes_of[axis.key], perms, skip=point.name)
                cost += mine @ axis.rows(theirs).T
            if point.groups is not None:  # permutations within a GroupNorm's groups only
                cost[~block_mask(point.size, point.groups)] = -1e12
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.from_numpy(cols)
            rows = torch.arange(point.size)
            old_score, new_score = cost[rows, perms[point.name]].sum(), cost[rows, new].sum()
            if new_score > old_score + 1e-12 * abs(old_score):
                perms[point.name], improved = new, True
        if not improved:
            break
    ones = torch.ones(1, dtype=torch.float64)
    return {name: scaled_permutation(np.arange(len(perm)), perm.numpy(), ones.expand(len(perm)))
            for name, perm in perms.items()}


def _axes_by_key(spec: AlignmentSpec) -> dict[str, list[tuple[ParamAxis, str]]]:
    """state-dict key -> [(axis, point name)] over all points of the spec."""
    axes: dict[str, list[tuple[ParamAxis, str]]] = {}
    for point in spec.points:
        for axis in point.axes:
            axes.setdefault(axis.key, []).append((axis, point.name))
    return axes


def _permuted(tensor: torch.Tensor, axes: list[tuple[ParamAxis, str]], perms: Mapping[str, torch.Tensor],
              skip: str) -> torch.Tensor:
    """``tensor`` with every point's permutation applied along its axis, except point ``skip``."""
    for axis, name in axes:
        if name != skip:
            tensor = axis.restore(axis.features(tensor).index_select(axis.axis, perms[name]))
    return tensor


def _float64(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"weight_matching: state dict has no key '{key}' named by the spec")
    return state[key].detach().cpu().double()


# ----------------------------------------------------------------------------- the method

def transforms(job: AlignmentJob) -> dict[str, Transform]:
    """Weight matching's permutations for ``job.spec`` (from the weights; no statistics)."""
    return weight_matching(job.reference_state, job.state, job.spec)


register(Aligner("weight-matching", False, transforms, "Git Re-Basin weight matching (data free)", shrinkable=False,
                 permutation=True))
