"""The structure of a network described as data: where features can be aligned.

An :class:`AlignmentSpec` lists the network's *alignment points*. A point is a feature
space inside the network (the channels after one conv + ReLU, or a residual stream shared
by several layers). For each point the spec names the modules whose output carries that
feature (``taps``, where statistics are collected) and every parameter axis indexed by it
(``axes``): producers, consumers and BatchNorm vectors. Generic algorithms — statistics,
transforms, weight matching, applying a transform — work over this description alone, in
the spirit of Git Re-Basin's ``PermutationSpec``; nothing walks the module graph. A model
without a hand-written ``alignment_spec()`` gets one derived from its ``torch.fx`` graph
(:mod:`fedcca.spec.tracing`).

Convention: a :class:`Transform` ``T`` for model B at a point maps B's features into the
reference's coordinates, ``f_ref ≈ T f_B``. Applying it rewrites B's parameters so that B's
feature at the point becomes ``T f_B``; the function is kept wherever ``T`` commutes with
the nonlinearity (exactly so for positive scaled permutations and ReLU, up to BatchNorm's
``eps``, which the ``"var"`` role cannot rescale).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import nn

Role = Literal["out", "in", "var"]
ROLES: tuple[str, ...] = get_args(Role)

PRODUCERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)
"""Layers whose output features an alignment point can transform (convs with groups=1)."""
CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)
"""The producers that are convolutions (a grouped one is refused)."""
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
"""Normalisation layers a spec can carry through (per-channel vectors)."""

# Layers whose tensors a spec can describe. Any other layer with float parameters or buffers
# is refused: a general T cannot be pushed through e.g. LayerNorm or a grouped conv.
KNOWN_LAYERS = PRODUCERS + NORMS

GROUP_NORMS: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm)
"""Normalisations over groups of features: their points are aligned by permutations within groups
(:attr:`AlignmentPoint.groups`); their weight and bias vectors are indexed by the point."""

RELU_TAP_SUFFIX = "+relu"
"""A tap ``"<module>+relu"`` is ReLU applied to ``<module>``'s output: the feature after a functional
ReLU (``F.relu``, ``x.relu()``, ...), which has no module of its own to hook."""

INPUT_TAP_SUFFIX = ":input"
"""A tap ``"<module>:input"`` is the first input of ``<module>`` (a forward pre-hook): the feature
where no module outputs it, e.g. a functional ReLU of a residual sum, read where it is consumed."""


class Tap(NamedTuple):
    """What a tap hooks: ``module``'s output (ReLU applied when ``relu``), or its first input."""

    module: str
    relu: bool = False
    input: bool = False


@dataclass(frozen=True)
class LeftOut:
    """A feature group the spec leaves unaligned (its parameters are averaged as FedAvg does), and why.

    Args:
        where: The layer or graph node that prevents aligning it, as error messages name it.
        reason: Why a transform cannot be pushed through there.
        layers: The conv/linear layers whose outputs form the group (empty for a layer left
            out on its own, e.g. a LayerNorm).
    """

    where: str
    reason: str
    layers: tuple[str, ...] = ()


class UnsupportedModelError(ValueError):
    """The library cannot describe a model's structure, or a spec does not match the model."""


@dataclass(frozen=True)
class Transform:
    """An invertible linear map of one point's features, with its inverse.

    Args:
        matrix: ``T``, shape ``[n, n]``, float64; maps a model's features to reference coordinates.
        inverse: ``T^-1``, shape ``[n, n]``, float64 (closed form where the method knows it).
    """

    matrix: torch.Tensor
    inverse: torch.Tensor

    def __post_init__(self) -> None:
        shape = tuple(self.matrix.shape)
        if len(shape) != 2 or shape[0] != shape[1] or tuple(self.inverse.shape) != shape:
            raise ValueError(
                f"Transform: matrix {shape} and inverse {tuple(self.inverse.shape)} must be the same square shape"
            )

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
            BatchNorm weight/bias/running_mean). ``"in"``: ``x <- x T^-1`` along the axis,
            ``new[.., j, ..] = sum_i x[.., i, ..] Tinv[i, j]`` (consuming weights).
            ``"var"``: ``x <- (T*T) x`` along the axis (BatchNorm running_var: exact for
            scaled permutations and never negative; for a dense ``T`` an approximation that
            the inverse transform does not undo — recompute BatchNorm statistics after).
        block: Entries per feature along the axis. A linear layer reading flattened conv
            features ``[C, H, W]`` has ``C * H * W`` inputs, feature ``c`` owning the contiguous
            block ``[c * H * W, (c + 1) * H * W)``: its axis has ``block = H * W``.
    """

    key: str
    axis: int
    role: Role
    block: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ParamAxis {self.key!r}: role {self.role!r} is not one of {ROLES}")
        if self.axis < 0:
            raise ValueError(f"ParamAxis {self.key!r}: axis must be >= 0, got {self.axis}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"ParamAxis {self.key!r}: block must be a positive integer, got {self.block!r}")

    def features(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` viewed with the features alone on dim ``axis`` (a block, if any, on ``axis + 1``)."""
        if self.block == 1:
            return tensor
        return tensor.unflatten(self.axis, (tensor.shape[self.axis] // self.block, self.block))

    def restore(self, view: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`features`: the tensor in the parameter's own shape."""
        return view if self.block == 1 else view.flatten(self.axis, self.axis + 1)

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as ``[features, everything else]`` (for norms and weight matching)."""
        view = self.features(tensor)
        return view.movedim(self.axis, 0).reshape(view.shape[self.axis], -1)


@dataclass(frozen=True)
class AlignmentPoint:
    """A feature space inside the network that is aligned as one unit.

    Args:
        name: Unique name, e.g. ``"features.0"`` or ``"layer2"``.
        size: Number of features ``n`` (channels).
        taps: Names (as in ``model.named_modules()``) of the modules whose output is this
            feature, channels on dim 1, or ``"<module>+relu"`` when the feature is ReLU applied
            to that module's output (see :func:`resolve_tap`); with several taps their
            statistics are summed.
        axes: Every parameter axis indexed by the point.
        groups: The features are normalised in ``groups`` contiguous groups (a GroupNorm, or a
            LayerNorm with ``groups = 1``): only permutations within each group keep the
            function, without rescaling. None: any invertible transform that commutes with the
            point's activation (dense CCA transforms included).
    """

    name: str
    size: int
    taps: tuple[str, ...]
    axes: tuple[ParamAxis, ...]
    groups: int | None = None


@dataclass(frozen=True)
class AlignmentSpec:
    """All alignment points of a network, plus the parameter axes that are never aligned.

    Args:
        points: The alignment points, in forward order.
        fixed: ``(key, axis)`` pairs that belong to no point on purpose: the input channels
            of the first layer and the outputs of the classifier.
        norms: ``(producer, batchnorm)`` module-name pairs: each BatchNorm and the conv/linear
            layer whose output it normalises (used to fold BatchNorm before aligning).
        left: What partial alignment left unaligned and why (:class:`LeftOut`); the axes of
            those groups and of layers fedcca cannot transform are in ``fixed``.
    """

    points: tuple[AlignmentPoint, ...]
    fixed: tuple[tuple[str, int], ...] = ()
    norms: tuple[tuple[str, str], ...] = ()
    left: tuple[LeftOut, ...] = ()

    def __post_init__(self) -> None:
        names = self.names()
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

        Every tap must be a module, every key a state-dict entry whose axis has the point's
        size, no axis may belong to two points, and every axis of every Conv2d/Linear/
        BatchNorm tensor must belong to a point or be ``fixed``.

        Args:
            model: The model the spec claims to describe.

        Raises:
            UnsupportedModelError: naming the point and key, or the layer, that is wrong.
        """
        state = model.state_dict()
        modules = dict(model.named_modules())
        owner: dict[tuple[str, int], str] = {}
        for p in self.points:
            _check_point(p, state, modules)
            for ax in p.axes:
                _claim(owner, (ax.key, ax.axis), f"point {p.name!r}")
        for key, axis in self.fixed:
            if key not in state:
                raise UnsupportedModelError(f"fixed axis: key {key!r} is not in the state dict")
            _claim(owner, (key, axis), "the fixed axes")
        for producer, norm in self.norms:
            _check_norm_pair(producer, norm, modules)
        for name, module in modules.items():
            _check_layer_covered(name, module, state, owner)


def _check_point(p: AlignmentPoint, state: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> None:
    """Taps and keys of one point exist and every axis has the point's size."""
    if not p.taps or not p.axes:
        raise UnsupportedModelError(f"point {p.name!r} needs at least one tap and one axis")
    if p.groups is not None and not (p.groups >= 1 and p.size % p.groups == 0):
        raise UnsupportedModelError(f"point {p.name!r}: {p.groups} groups do not divide its {p.size} features")
    for tap in p.taps:
        if resolve_tap(tap, modules) is None:
            raise UnsupportedModelError(f"point {p.name!r}: tap {tap!r} is not a module of the model "
                                        f"(nor '<module>{RELU_TAP_SUFFIX}' or '<module>{INPUT_TAP_SUFFIX}')")
    for ax in p.axes:
        if ax.key not in state:
            raise UnsupportedModelError(f"point {p.name!r}: key {ax.key!r} is not in the state dict")
        shape = tuple(state[ax.key].shape)
        if ax.axis >= len(shape) or shape[ax.axis] != p.size * ax.block:
            raise UnsupportedModelError(
                f"point {p.name!r}: {ax.key!r} has shape {shape}; its axis {ax.axis} should have "
                f"the point's size {p.size}" + (f" x block {ax.block}" if ax.block > 1 else "")
            )


def _check_norm_pair(producer: str, norm: str, modules: Mapping[str, nn.Module]) -> None:
    """``norm`` is a BatchNorm normalising the output of the conv/linear ``producer``."""
    layer, bn = modules.get(producer), modules.get(norm)
    if not isinstance(bn, NORMS):
        raise UnsupportedModelError(f"norm pair ({producer!r}, {norm!r}): {norm!r} is not a BatchNorm module")
    if not isinstance(layer, PRODUCERS):
        raise UnsupportedModelError(f"norm pair ({producer!r}, {norm!r}): {producer!r} is not a conv/linear module")
    if layer.weight.shape[0] != bn.num_features:
        raise UnsupportedModelError(f"norm pair ({producer!r}, {norm!r}): {layer.weight.shape[0]} outputs "
                                    f"for {bn.num_features} BatchNorm features")


def _claim(owner: dict[tuple[str, int], str], slot: tuple[str, int], who: str) -> None:
    """Record that ``who`` transforms ``slot``; an axis transformed twice is an error."""
    if slot in owner:
        raise UnsupportedModelError(f"{who}: axis {slot[1]} of {slot[0]!r} is already claimed by {owner[slot]}")
    owner[slot] = who


def own_tensors(path: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(state-dict key, tensor)`` of ``module``'s own floating-point parameters and buffers.

    Args:
        path: The module's name in its model ("" for the model itself).
        module: The module.
    """
    for local, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if tensor is not None and tensor.is_floating_point():
            yield (f"{path}.{local}" if path else local), tensor


def _check_layer_covered(
    name: str, module: nn.Module, state: Mapping[str, torch.Tensor], owner: Mapping[tuple[str, int], str]
) -> None:
    """A layer with float tensors is of a known type and the spec covers all of its feature axes.

    A layer fedcca cannot transform (a LayerNorm, a grouped conv, ...) is allowed when every
    feature axis of its tensors is fixed: it is then averaged as it is (partial alignment).
    """
    keys = [key for key, _ in own_tensors(name, module) if key in state]
    if not keys:
        return
    kind = type(module).__name__
    feature_axes = [(key, axis) for key in keys for axis in range(min(state[key].dim(), 2))]
    if all(owner.get(slot) == "the fixed axes" for slot in feature_axes):
        return
    if not isinstance(module, KNOWN_LAYERS + GROUP_NORMS):
        raise UnsupportedModelError(
            f"layer {name!r} ({kind}) has parameters or buffers but fedcca can only align "
            f"{', '.join(t.__name__ for t in KNOWN_LAYERS + GROUP_NORMS)}"
        )
    if isinstance(module, CONVS) and module.groups != 1:
        raise UnsupportedModelError(f"layer {name!r} ({kind}) is a grouped conv (groups={module.groups}); "
                                    "a general transform cannot be applied to it")
    for key in keys:
        # Weights are indexed by features on their output and input axes (0, 1); biases and
        # BatchNorm vectors on axis 0 only.
        for axis in range(min(state[key].dim(), 2)):
            if (key, axis) not in owner:
                raise UnsupportedModelError(
                    f"layer {name!r} ({kind}): axis {axis} of {key!r} belongs to no alignment point "
                    "and is not fixed; the spec does not describe this layer"
                )


def describe_left(spec: AlignmentSpec) -> str:
    """One line naming what ``spec`` leaves unaligned, grouped by reason, e.g. for a log."""
    by_reason: dict[str, list[LeftOut]] = {}
    for entry in spec.left:
        by_reason.setdefault(entry.reason, []).append(entry)
    parts = []
    for reason, entries in by_reason.items():
        names = [name for entry in entries for name in entry.layers] or [entries[0].where]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(f"{shown} (at {entries[0].where}{' and others' if len(entries) > 1 else ''}: {reason})")
    return "; ".join(parts) if parts else "nothing"


def resolve_tap(tap: str, modules: Mapping[str, nn.Module]) -> Tap | None:
    """What a tap hooks; None if it names no module.

    A tap is a module name (the module's output is the feature), ``"<module>+relu"``
    (:data:`RELU_TAP_SUFFIX`: the feature is ``relu(<module>'s output)``) or
    ``"<module>:input"`` (:data:`INPUT_TAP_SUFFIX`: the module's first input). A module name wins.

    Args:
        tap: The tap, as in :attr:`AlignmentPoint.taps`.
        modules: ``dict(model.named_modules())``.
    """
    if tap in modules:
        return Tap(tap)
    for suffix, kind in ((RELU_TAP_SUFFIX, "relu"), (INPUT_TAP_SUFFIX, "input")):
        if tap.endswith(suffix) and tap[:-len(suffix)] in modules:
            return Tap(tap[:-len(suffix)], **{kind: True})
    return None


def _along(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """``new[.., i, ..] = sum_j matrix[i, j] tensor[.., j, ..]`` along ``axis``."""
    nonzero = matrix != 0
    if bool((nonzero.sum(0) == 1).all()) and bool((nonzero.sum(1) == 1).all()):
        # A scaled permutation (Permute, weight matching, random symmetries): the row's one
        # term, gathered in O(numel) instead of a dense product; the same values exactly.
        source = nonzero.to(torch.float64).argmax(1)
        scale = matrix.gather(1, source[:, None]).reshape([-1 if d == axis else 1 for d in range(tensor.dim())])
        return tensor.index_select(axis, source) * scale
    return torch.tensordot(matrix, tensor.movedim(axis, 0), dims=([1], [0])).movedim(0, axis)


def _role_matrix(t: Transform, role: Role, like: torch.Tensor) -> torch.Tensor:
    """The matrix applied along the axis for ``role``, as float64 on ``like``'s device."""
    if role == "out":
        return t.matrix.to(like)
    if role == "var":
        return t.matrix.to(like).square()
    return t.inverse.to(like).T  # "in": x T^-1 along the axis is (T^-1)^T applied along it


def apply_transforms(
    state_dict: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    transforms: Mapping[str, Transform],
) -> dict[str, torch.Tensor]:
    """Rewrite a model's parameters so that its feature at each point becomes ``T f``.

    Args:
        state_dict: The model's state dict; it is not modified.
        spec: The model's alignment spec.
        transforms: Point name -> :class:`Transform`; points absent are left unchanged.

    Returns:
        A new state dict (no tensor shared with the input). Arithmetic is in float64, every
        tensor keeps its dtype and device; integer buffers (``num_batches_tracked``) are copied.

    Raises:
        KeyError: a transform names a point the spec does not have.
        ValueError: a transform's size differs from its point's or it is not finite.
        UnsupportedModelError: a spec key is missing from the state dict or has the wrong size.
    """
    unknown = sorted(set(transforms) - set(spec.names()))
    if unknown:
        raise KeyError(f"transforms for unknown points {unknown}; the spec has {spec.names()}")
    work: dict[str, torch.Tensor] = {}  # float64 copies of the tensors touched so far
    for point in spec.points:
        t = transforms.get(point.name)
        if t is None:
            continue
        if t.size != point.size:
            raise ValueError(f"point {point.name!r}: transform of size {t.size}, the point has {point.size}")
        if not (torch.isfinite(t.matrix).all() and torch.isfinite(t.inverse).all()):
            raise ValueError(f"point {point.name!r}: the transform is not finite")
        for ax in point.axes:
            if ax.key not in state_dict:
                raise UnsupportedModelError(f"point {point.name!r}: key {ax.key!r} is not in the state dict")
            x = work.get(ax.key)
            if x is None:
                x = state_dict[ax.key].detach().to(torch.float64)
            if ax.axis >= x.dim() or x.shape[ax.axis] != point.size * ax.block:
                raise UnsupportedModelError(
                    f"point {point.name!r}: {ax.key!r} has shape {tuple(x.shape)}; axis {ax.axis} "
                    f"should have size {point.size * ax.block}"
                )
            work[ax.key] = ax.restore(_along(ax.features(x), _role_matrix(t, ax.role, x), ax.axis))
    return {
        k: work[k].to(v.dtype) if k in work else v.detach().clone()
        for k, v in state_dict.items()
    }


def zero_features(
    state_dict: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    masks: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Zero every parameter slice of the masked features along all of their point's axes.

    For a feature that is identically zero where it is tapped (a dead ReLU unit), this keeps
    the network's function on those inputs: its producers then output 0 (ReLU(0) = 0, and a
    BatchNorm with zero scale and shift outputs 0) and its consumers ignore it. Merging
    uses it so that a dead unit's strongly negative bias and arbitrary weights are not mixed
    into live units by a dense transform, nor averaged into a matched live unit.

    Args:
        state_dict: The model's state dict; it is not modified.
        spec: The model's alignment spec.
        masks: Point name -> boolean mask of the features to zero (points absent: unchanged).

    Returns:
        A new state dict (as :func:`apply_transforms` returns it).
    """
    projections = {}
    for name, mask in masks.items():
        keep = (~mask.to(torch.bool).cpu()).to(torch.float64)
        if keep.shape != (spec.point(name).size,):
            raise ValueError(f"point {name!r}: mask of shape {tuple(mask.shape)}, the point has {spec.point(name).size}")
        # A projection applied as a transform: D on producers, D^T = D on consumers, D^2 = D on variances.
        projections[name] = Transform(matrix=torch.diag(keep), inverse=torch.diag(keep))
    return apply_transforms(state_dict, spec, projections)


def balance_norms(
    state_dict: Mapping[str, torch.Tensor],
    spec: AlignmentSpec,
    like: Mapping[str, torch.Tensor] | None = None,
    sweeps: int = 3,
) -> dict[str, torch.Tensor]:
    """Rescale every feature so that the ratio of its incoming to outgoing weight norms is ``like``'s.

    A positive per-feature scale ``c`` (producers ``x c``, consumers ``/ c``) commutes with
    ReLU, so the network's function is unchanged (up to BatchNorm's ``eps``). A merge whose
    transforms move scale between layers (a dense CCA ``T`` on producers, ``T^-1`` on
    consumers) leaves layers whose balance later SGD steps treat very differently; restoring
    the reference's balance (the model the merge is expressed in) undoes that and is a no-op
    when nothing moved. Without ``like`` every ratio becomes 1 (cross-layer equalisation).
    Points are visited in order ``sweeps`` times, since a layer feeds one point and consumes
    another.

    Args:
        state_dict: The model's state dict; it is not modified.
        spec: The model's alignment spec.
        like: A state dict of the same architecture whose per-feature ratios are the target.
        sweeps: Passes over the points.

    Returns:
        A new state dict.
    """
    targets = {point.name: torch.ones(point.size, dtype=torch.float64) if like is None else _norm_ratio(like, point)
               for point in spec.points}
    work: dict[str, torch.Tensor] = {}  # float64 copies of the tensors the points touch, rescaled in place
    for point in spec.points:
        for ax in point.axes:
            if ax.key not in state_dict:
                raise UnsupportedModelError(f"point {point.name!r}: key {ax.key!r} is not in the state dict")
            work.setdefault(ax.key, state_dict[ax.key].detach().to(torch.float64, copy=True))
    for _ in range(sweeps):
        for point in spec.points:
            ratio, target = _norm_ratio(work, point), targets[point.name]
            # A zeroed (dead) feature, here or in the target, keeps its scale.
            usable = torch.isfinite(ratio) & (ratio > 0) & torch.isfinite(target) & (target > 0)
            scale = torch.where(usable, (target / torch.where(usable, ratio, 1.0)).sqrt(), 1.0)
            # diag(scale) as a transform: producers x c, consumers / c, running variances x c^2.
            factors = {"out": scale, "in": 1.0 / scale, "var": scale.square()}
            for ax in point.axes:
                view = ax.features(work[ax.key])
                shape = [-1 if d == ax.axis else 1 for d in range(view.dim())]
                view.mul_(factors[ax.role].to(view.device).reshape(shape))
    return {k: work[k].to(v.dtype) if k in work else v.detach().clone() for k, v in state_dict.items()}


_RUNNING_STATISTICS = (".running_mean", ".running_var")  # torch's BatchNorm buffer names


def _norm_ratio(state: Mapping[str, torch.Tensor], point: AlignmentPoint) -> torch.Tensor:
    """Per feature: norm of its incoming weights over norm of its outgoing weights."""
    return _axis_norms(state, point, "out") / _axis_norms(state, point, "in")


def _axis_norms(state: Mapping[str, torch.Tensor], point: AlignmentPoint, role: str) -> torch.Tensor:
    """Per-feature Euclidean norm over the point's weight slices with ``role``.

    BatchNorm running statistics are data, not weights (merging recomputes them), so they
    are left out: the norms then depend on the parameters alone.
    """
    total = torch.zeros(point.size, dtype=torch.float64)
    for ax in point.axes:
        if ax.role == role and not ax.key.endswith(_RUNNING_STATISTICS):
            total += ax.rows(state[ax.key].detach().to(torch.float64).cpu()).square().sum(1)
    return total.sqrt()


def random_symmetry(
    spec: AlignmentSpec,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> dict[str, Transform]:
    """Draw a random positive scaled permutation ``T = D P`` for every point.

    Such transforms commute with ReLU, so applying them keeps the network's function; tests
    use them to build models whose exact alignment is known. At a point normalised in groups
    (:attr:`AlignmentPoint.groups`) ``T`` is a permutation within each group, unscaled.

    Args:
        spec: The model's alignment spec.
        generator: Source of randomness (CPU).
        scale_range: ``(low, high)`` of the positive diagonal ``D``, ``0 < low <= high``.
    """
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    out: dict[str, Transform] = {}
    for p in spec.points:
        if p.groups is None:
            order = torch.randperm(p.size, generator=generator)
            scale = low + (high - low) * torch.rand(p.size, generator=generator, dtype=torch.float64)
        else:  # normalised in groups: a permutation within each group, no scale
            width = p.size // p.groups
            order = torch.cat([g * width + torch.randperm(width, generator=generator) for g in range(p.groups)])
            scale = torch.ones(p.size, dtype=torch.float64)
        perm = torch.eye(p.size, dtype=torch.float64)[order]
        # (D P)^-1 = P^T D^-1: columns of P^T divided by the scales.
        out[p.name] = Transform(matrix=scale[:, None] * perm, inverse=perm.T / scale[None, :])
    return out
