"""The structure of a network described as data: where features can be aligned.

An :class:`AlignmentSpec` lists the network's *alignment points*. A point is a feature
space inside the network (the channels after one conv + ReLU, or a residual stream shared
by several layers). For each point the spec names the modules whose output carries that
feature (``taps``, where statistics are collected) and every parameter axis indexed by it
(``axes``): producers, consumers and BatchNorm vectors. Generic algorithms — statistics,
transforms, weight matching, applying a transform — work over this description alone, in
the spirit of Git Re-Basin's ``PermutationSpec``.

Convention: a :class:`Transform` ``T`` for model B at a point maps B's features into the
reference's coordinates, ``f_ref ≈ T f_B``. Applying it rewrites B's parameters so that B's
feature at the point becomes ``T f_B`` while the function is kept wherever ``T`` commutes
with the nonlinearity (exactly so for positive scaled permutations and ReLU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Role = Literal["out", "in", "var"]
ROLES: tuple[str, ...] = ("out", "in", "var")

# Layers whose parameters must be described by a spec; anything else with parameters is
# unknown to the library and reported, never silently left unaligned.
_KNOWN_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


class UnsupportedModelError(ValueError):
    """The library cannot describe (or the spec does not match) a model's structure."""


@dataclass(frozen=True)
class Transform:
    """An invertible linear map of one point's features, with its inverse.

    Args:
        matrix: ``T``, shape ``[n, n]``, float64; maps model features to reference coordinates.
        inverse: ``T^-1``, shape ``[n, n]``, float64 (closed form where the method knows it).
    """

    matrix: torch.Tensor
    inverse: torch.Tensor

    @property
    def size(self) -> int:
        """Number of features ``n``."""
        return self.matrix.shape[0]


@dataclass(frozen=True)
class ParamAxis:
    """One axis of one parameter or buffer that a point's transform acts on.

    Args:
        key: The ``state_dict`` key.
        axis: The tensor axis indexed by the point's features.
        role: ``"out"``: ``x <- T x`` along the axis (producing weights and biases,
            BatchNorm weight/bias/running_mean). ``"in"``: ``x <- x T^-1`` along the axis
            (consuming weights). ``"var"``: ``x <- (T*T) x`` along the axis (BatchNorm
            running_var: exact for scaled permutations and never negative).
    """

    key: str
    axis: int
    role: Role

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ParamAxis {self.key!r}: role {self.role!r} is not one of {ROLES}")


@dataclass(frozen=True)
class AlignmentPoint:
    """A feature space inside the network that can be aligned as one unit.

    Args:
        name: Unique name, e.g. ``"conv1"`` or ``"stage2"``.
        size: Number of features ``n`` (channels).
        taps: Names (as in ``model.named_modules()``) of the modules whose output is this
            feature, channels on dim 1; with several taps their statistics are summed.
        axes: Every parameter axis indexed by the point.
    """

    name: str
    size: int
    taps: tuple[str, ...]
    axes: tuple[ParamAxis, ...]


@dataclass(frozen=True)
class AlignmentSpec:
    """All alignment points of a network, plus the parameter axes that are never aligned.

    Args:
        points: The alignment points, in forward order.
        fixed: ``(key, axis)`` pairs that legitimately belong to no point: the input channels
            of the first layer and the outputs of the classifier.
    """

    points: tuple[AlignmentPoint, ...]
    fixed: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"AlignmentSpec: duplicate point names in {names}")

    def names(self) -> list[str]:
        """Names of all points, in forward order."""
        return [p.name for p in self.points]

    def point(self, name: str) -> AlignmentPoint:
        """The point called ``name``; ``KeyError`` listing the known names otherwise."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"no alignment point {name!r}; the spec has {self.names()}")

    def validate(self, model: nn.Module) -> None:
        """Check that this spec describes ``model`` completely and consistently.

        Raises:
            UnsupportedModelError: naming the point and key of any missing key or tap, any
                axis whose length differs from the point's size, any layer of a type the
                library cannot align, and any parameter axis the spec does not cover.
        """
        state = model.state_dict()
        modules = dict(model.named_modules())
        covered: set[tuple[str, int]] = set(self.fixed)
        for p in self.points:
            for tap in p.taps:
                if tap not in modules:
                    raise UnsupportedModelError(f"point {p.name!r}: tap {tap!r} is not a module of the model")
            for ax in p.axes:
                if ax.key not in state:
                    raise UnsupportedModelError(f"point {p.name!r}: key {ax.key!r} is not in the state dict")
                shape = tuple(state[ax.key].shape)
                if ax.axis >= len(shape) or shape[ax.axis] != p.size:
                    raise UnsupportedModelError(
                        f"point {p.name!r}: {ax.key!r} has shape {shape}, axis {ax.axis} "
                        f"does not have the point's size {p.size}"
                    )
                covered.add((ax.key, ax.axis))
        for module_name, module in modules.items():
            own = list(module.named_parameters(recurse=False))
            if own and not isinstance(module, _KNOWN_LAYERS):
                raise UnsupportedModelError(
                    f"layer {module_name!r} ({type(module).__name__}) has parameters but fedcca "
                    "cannot align layers of this type"
                )
            for param_name, tensor in own:
                key = f"{module_name}.{param_name}" if module_name else param_name
                # Weights are indexed by features on their output and input axes; biases
                # and BatchNorm vectors on axis 0 only.
                for axis in range(min(tensor.dim(), 2)):
                    if (key, axis) not in covered:
                        raise UnsupportedModelError(
                            f"layer {module_name!r} ({type(module).__name__}): axis {axis} of "
                            f"{key!r} is covered by no alignment point (the spec does not describe this layer)"
                        )


def spec_for(model: nn.Module) -> AlignmentSpec:
    """Return the validated alignment spec of ``model``.

    Models describe themselves through an ``alignment_spec()`` method (all of
    :mod:`fedcca.models` do). Anything else is refused with a message naming the model type
    and its first layer, since aligning it by guesswork would silently be wrong.

    Raises:
        UnsupportedModelError: when the model has no spec or the spec does not match it.
    """
    describe = getattr(model, "alignment_spec", None)
    if not callable(describe):
        first = next(
            (f"{n!r} ({type(m).__name__})" for n, m in model.named_modules() if n and list(m.parameters(False))),
            "none",
        )
        raise UnsupportedModelError(
            f"model type {type(model).__name__} has no alignment spec (first layer with parameters: "
            f"{first}); use a model from fedcca.build_model or give the model an "
            "alignment_spec() method returning a fedcca.AlignmentSpec"
        )
    spec = describe()
    spec.validate(model)
    return spec


def _apply_along(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """``new[.., i, ..] = sum_j matrix[i, j] tensor[.., j, ..]`` along ``axis``."""
    moved = tensor.movedim(axis, 0)
    out = torch.tensordot(matrix, moved, dims=([1], [0]))
    return out.movedim(0, axis)


def apply_transforms(
    state_dict: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    transforms: Mapping[str, Transform],
) -> dict[str, torch.Tensor]:
    """Rewrite a model's parameters so that its features at each point become ``T f``.

    Args:
        state_dict: The model's state dict; it is not modified.
        spec: The model's alignment spec.
        transforms: Point name -> :class:`Transform`; points absent are left unchanged.

    Returns:
        A new state dict. Arithmetic is in float64 and every tensor keeps its dtype;
        integer buffers (``num_batches_tracked``) are copied.
    """
    unknown = set(transforms) - set(spec.names())
    if unknown:
        raise KeyError(f"transforms for unknown points {sorted(unknown)}; the spec has {spec.names()}")
    work = {k: v.detach().to(torch.float64) if v.is_floating_point() else v.detach().clone() for k, v in state_dict.items()}
    for point in spec.points:
        t = transforms.get(point.name)
        if t is None:
            continue
        if t.matrix.shape != (point.size, point.size):
            raise ValueError(f"point {point.name!r}: transform of shape {tuple(t.matrix.shape)}, expected {(point.size, point.size)}")
        for ax in point.axes:
            x = work[ax.key]
            if ax.role == "out":
                m = t.matrix.to(x)
            elif ax.role == "var":
                m = t.matrix.to(x).square()
            else:  # "in": x T^-1 along the axis == (T^-1)^T applied along it
                m = t.inverse.to(x).T
            work[ax.key] = _apply_along(x, m, ax.axis)
    return {k: work[k].to(v.dtype) if v.is_floating_point() else work[k] for k, v in state_dict.items()}


def random_symmetry(
    spec: AlignmentSpec,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> dict[str, Transform]:
    """Draw a random positive scaled permutation ``T = D P`` for every point.

    Such transforms commute with ReLU, so applying them preserves the network's function;
    tests use them to build models whose exact alignment is known.

    Args:
        spec: The model's alignment spec.
        generator: Source of randomness.
        scale_range: Range of the positive diagonal scales.
    """
    low, high = scale_range
    out: dict[str, Transform] = {}
    for p in spec.points:
        perm = torch.randperm(p.size, generator=generator)
        scale = low + (high - low) * torch.rand(p.size, generator=generator, dtype=torch.float64)
        eye = torch.eye(p.size, dtype=torch.float64)
        matrix = scale[:, None] * eye[perm]
        inverse = eye[perm].T / scale[None, :]
        out[p.name] = Transform(matrix, inverse)
    return out
