"""Streaming second-order statistics of models' features at their alignment points.

For every point, a model's features are summarised by :class:`Moments` (count, mean, centred
second moment) and a pair of models (the reference's features ``a``, a model's ``b``) by
:class:`PairStatistics` (both moments and the centred cross moment). Per calibration batch
the features are centred on the batch mean and their products taken with float32 matrix
multiplications on the device the models run on (row blocks summed in float64); batches,
taps and machines are then combined in float64 with the pairwise update of Chan et al.
(:meth:`Moments.__add__`): exact up to rounding, so statistics of disjoint data add, and
numerically stable where raw sums of squares are not. Activations are never stored beyond
one batch: memory is O(n^2) per point.

A client sends only what the server cannot compute: its own moments and the cross moments
with the model it received (:class:`ClientStatistics`); the server measures the received
(global) model's own moments once per round and :func:`assemble` s the pair.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcca.devices import resolve_device
from fedcca.spec.alignment import AlignmentPoint, AlignmentSpec, resolve_tap
from fedcca.spec.tracing import spec_for

ROW_BLOCK = 32768  # rows per float32 product: bounds its rounding error; the blocks add in float64
FLOAT64_BELOW = 4096  # a batch with fewer samples at a point is multiplied in float64: cheap at that size
SMALL_MAPS = 64  # fewer positions per input: one product over all samples beats many tiny batched ones


class StatisticsError(ValueError):
    """Statistics cannot be computed or decoded (non-finite features, bad shapes, no data).

    Attributes:
        model_index: Index (into ``models``) of the model whose features failed, -1 when
            the reference's features failed (then every model's statistics are lost), None
            when no single model is to blame.
    """

    def __init__(self, message: str, model_index: int | None = None) -> None:
        super().__init__(message)
        self.model_index = model_index


@dataclass
class Moments:
    """One model's features at one point.

    Args:
        count: Number of samples (every spatial position of a conv feature counts).
        mean: Mean feature, shape ``[n]``, float64.
        comoment: ``sum (x - mean)(x - mean)^T`` over the samples, ``[n, n]``, float64; None
            when not measured (a client skips the received model's, the server measures it).
    """

    count: int
    mean: torch.Tensor
    comoment: torch.Tensor | None

    def __add__(self, other: Moments) -> Moments:
        """Moments of the union of both sample sets (Chan et al.'s pairwise update)."""
        if not isinstance(other, Moments):
            return NotImplemented
        count, delta, _, factor = _merged(self.count, other.count, self.mean, other.mean)
        if count == 0:
            return self
        comoment = None
        if self.comoment is not None and other.comoment is not None:
            comoment = self.comoment + _on(other.comoment, self.comoment) + torch.outer(delta, delta) * factor
        return Moments(count, self.mean + delta * (other.count / count), comoment)

    def covariance(self) -> torch.Tensor:
        """``comoment / count`` (the biased covariance)."""
        return self.measured() / self.count

    def measured(self) -> torch.Tensor:
        """``comoment``; StatisticsError when it was not measured or there are no samples."""
        if self.count <= 0:
            raise StatisticsError("statistics hold no samples")
        if self.comoment is None:
            raise StatisticsError("these statistics do not hold the model's own second moment")
        return self.comoment

    def to(self, device: torch.device | str) -> Moments:
        """A copy with every tensor on ``device``."""
        return Moments(self.count, self.mean.to(device), None if self.comoment is None else self.comoment.to(device))


@dataclass
class ClientStatistics:
    """What a client sends at one point: its model's moments and the cross moment with the reference.

    Args:
        b: The client model's :class:`Moments`.
        cross: ``sum (a - mean_a)(b - mean_b)^T`` with ``a`` the received (reference) model's features.
    """

    b: Moments
    cross: torch.Tensor


@dataclass
class PairStatistics:
    """The reference's features ``a`` and a model's features ``b`` at one point, on the same samples.

    Args:
        a: The reference's :class:`Moments`.
        b: The model's :class:`Moments` (same ``count``).
        cross: ``sum (a - mean_a)(b - mean_b)^T``, ``[na, nb]``, float64.
    """

    a: Moments
    b: Moments
    cross: torch.Tensor

    @property
    def count(self) -> int:
        """Number of samples."""
        return self.a.count

    @classmethod
    def from_features(cls, a: torch.Tensor, b: torch.Tensor) -> PairStatistics:
        """Statistics of paired samples ``a`` [N, na] and ``b`` [N, nb], computed in float64.

        Args:
            a: Reference features, one sample per row.
            b: The other model's features for the same inputs.
        """
        a, b = a.double(), b.double()
        centred_a, centred_b = a - a.mean(0), b - b.mean(0)
        return cls(Moments(a.shape[0], a.mean(0), centred_a.T @ centred_a),
                   Moments(b.shape[0], b.mean(0), centred_b.T @ centred_b), centred_a.T @ centred_b)

    def __add__(self, other: PairStatistics) -> PairStatistics:
        """Statistics of the union of both sample sets."""
        if not isinstance(other, PairStatistics):
            return NotImplemented
        if self.cross.shape != other.cross.shape:
            raise StatisticsError(f"cannot add statistics of shapes {tuple(self.cross.shape)} "
                                  f"and {tuple(other.cross.shape)}")
        count, delta_a, delta_b, factor = _merged(self.count, other.count, self.a.mean, other.a.mean,
                                                  self.b.mean, other.b.mean)
        if count == 0:
            return self
        return PairStatistics(self.a + other.a, self.b + other.b,
                              self.cross + _on(other.cross, self.cross) + torch.outer(delta_a, delta_b) * factor)

    def to(self, device: torch.device | str) -> PairStatistics:
        """A copy with every tensor on ``device``."""
        return PairStatistics(self.a.to(device), self.b.to(device), self.cross.to(device))

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of a, mean of b)."""
        return self.a.mean, self.b.mean

    def zero_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``(a, b)`` of the features that are exactly 0 on every sample (dead ReLU units)."""
        return ((self.a.mean == 0) & (self.a.measured().diagonal() == 0),
                (self.b.mean == 0) & (self.b.measured().diagonal() == 0))

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centred covariances ``(C_aa, C_bb, C_ab)``, divided by ``count`` (not count - 1)."""
        return self.a.measured() / self.count, self.b.measured() / self.count, self.cross / self.count

    def client_part(self) -> ClientStatistics:
        """What the client sends of these statistics: ``b``'s moments and the cross moment."""
        return ClientStatistics(self.b, self.cross)


def assemble(reference: Mapping[str, Moments], parts: Mapping[str, ClientStatistics]) -> dict[str, PairStatistics]:
    """Pair statistics from the reference's own moments (measured on the server) and a client's parts.

    Args:
        reference: The reference's moments per point, on the same calibration set as the client's.
        parts: The client's :class:`ClientStatistics` per point.

    Raises:
        StatisticsError: A point missing on either side, or counts that differ (the client
            measured on other data than the server's calibration set).
    """
    pairs = {}
    for point, part in parts.items():
        if point not in reference:
            raise StatisticsError(f"point '{point}': the server has no statistics of the reference there")
        own = reference[point]
        if own.count != part.b.count:
            raise StatisticsError(f"point '{point}': the client's statistics cover {part.b.count} samples, the "
                                  f"server's calibration set gives {own.count} (different calibration data)")
        if part.cross.shape != (own.mean.shape[0], part.b.mean.shape[0]):
            raise StatisticsError(f"point '{point}': cross moment of shape {tuple(part.cross.shape)} for "
                                  f"{own.mean.shape[0]} reference and {part.b.mean.shape[0]} model features")
        pair = PairStatistics(own, part.b, part.cross)
        _check_consistent(pair, point)
        pairs[point] = pair
    return pairs


# Relative slack of the moment checks: float32 transport and summation order, not forgery.
_MOMENT_TOLERANCE = 1e-3


def _check_consistent(pair: PairStatistics, point: str) -> None:
    """The client's moments could come from real features: variances >= 0, and Cauchy-Schwarz
    ``C_ab[i, j]^2 <= C_aa[i, i] C_bb[j, j]`` against the reference variances the server measured."""
    c_aa, c_bb, c_ab = (c.double().cpu() for c in pair.covariances())
    var_a, var_b = c_aa.diagonal().clamp_min(0), c_bb.diagonal()
    scale = float(var_b.abs().max()) if var_b.numel() else 0.0
    if (var_b < -_MOMENT_TOLERANCE * max(scale, 1e-30)).any():
        raise StatisticsError(f"point '{point}': the client's variances include negative values "
                              f"(smallest {float(var_b.min()):.3g}): not second moments of real features")
    bound = torch.outer(var_a, var_b.clamp_min(0)).sqrt()
    excess = c_ab.abs() - bound * (1 + _MOMENT_TOLERANCE)
    slack = _MOMENT_TOLERANCE * float(bound.max()) if bound.numel() else 0.0
    if (excess > slack).any():
        i, j = divmod(int(excess.argmax()), excess.shape[1])
        raise StatisticsError(f"point '{point}': cross covariance [{i}, {j}] = {float(c_ab[i, j]):.3g} exceeds "
                              f"sqrt(var_ref * var_model) = {float(bound[i, j]):.3g} (Cauchy-Schwarz): the client's "
                              "statistics are not those of its model on the calibration data")


def as_batches(calibration: torch.Tensor | Iterable, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield input batches from calibration data.

    A tensor (or numpy array) is cut along dim 0 into near-equal batches of at most
    ``batch_size`` (near-equal so that no trailing batch of one sample breaks BatchNorm in
    train mode). A map-style ``Dataset`` is batched in order; another iterable (a
    ``DataLoader``) passes through; ``(x, y)`` items yield ``x``.

    Args:
        calibration: Inputs [N, ...], a ``Dataset``, or an iterable of batches / ``(x, y)`` pairs.
        batch_size: Largest batch cut from a tensor.
    """
    if isinstance(calibration, np.ndarray):
        calibration = torch.from_numpy(calibration)
    if isinstance(calibration, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(calibration):
            yield from calibration.tensor_split(math.ceil(len(calibration) / batch_size))
        return
    if isinstance(calibration, torch.utils.data.Dataset) and hasattr(calibration, "__len__"):
        # a map-style Dataset holds single examples: batch them (in order)
        calibration = torch.utils.data.DataLoader(calibration, batch_size=batch_size)
    for item in calibration:
        yield item[0] if isinstance(item, (tuple, list)) else item


def collect_statistics(
    reference: nn.Module,
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec | None = None,
    *,
    points: Sequence[str] | None = None,
    reference_moments: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    own_moments: AlignmentSpec | None = None,
    own_out: list[dict[str, Moments]] | None = None,
    reference_cache: list | None = None,
) -> list[dict[str, PairStatistics]]:
    """Statistics of every model's features against the reference's, per alignment point.

    The reference runs once per batch (its centred features and own moments are kept for that
    batch only), then each model runs and its hooks fold its features into the statistics:
    cost O(K) forwards and one float32 product per model and point, memory O(n^2) per point.
    Models run in eval mode under ``no_grad`` on ``device``; their mode and device are restored
    and all hooks removed afterwards, also on error. Statistics of a point with several taps
    pool the taps' samples. A model that is the reference object itself gets its statistics
    from the reference's features without a second forward.

    Args:
        reference: Model A, the alignment target.
        models: Models B; one dict of statistics is returned per model.
        calibration: Inputs, see :func:`as_batches`.
        spec: Alignment spec (default ``spec_for(reference)``, traced on the first batch if needed).
        points: Names of the points to collect (default all).
        reference_moments: Measure the reference's own second moment (a client that sends
            only its part, :meth:`PairStatistics.client_part`, skips it: one product less).
        device: Where to run (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.
        own_moments: Further taps (e.g. :func:`fedcca.merging.repair.preactivation_spec`'s) whose
            :class:`Moments` each model gets in the same forward pass (no pass of its own);
            they are appended to ``own_out``, one dict per model.
        own_out: Where ``own_moments``' results go (required with it).
        reference_cache: The reference's recorded features per batch, filled by the first call that
            passes it and read by later ones instead of running the reference again (the caller
            keeps reference, calibration, spec, points, ``reference_moments`` and device the same).

    Returns:
        For each model, ``{point name: PairStatistics}`` with CPU tensors.

    Raises:
        StatisticsError: Non-finite features (naming the model index and the point), a
            feature size that differs from the spec, or empty calibration data.
    """
    batches, spec = _batches_and_spec(reference, calibration, spec, batch_size)
    taps, sizes = _taps(spec, points)
    if (own_moments is None) != (own_out is None):
        raise ValueError("collect_statistics: own_moments and own_out go together")
    own = _taps(own_moments, None) if own_moments is not None else ({}, {})
    if own_moments is not None and any(model is reference for model in models):
        raise ValueError("collect_statistics: own_moments of the reference itself: use collect_moments")
    device = resolve_device(device)
    totals: list[dict[str, PairStatistics]] = [{} for _ in models]
    owns: list[dict[str, Moments]] = [{} for _ in models]
    with _running(reference, *models, device=device):
        for number, batch in enumerate(batches):
            batch = batch.to(device)
            if reference_cache is not None and number < len(reference_cache):
                ref_features = reference_cache[number]
            else:
                ref_features = _record_reference(reference, batch, taps, sizes, own=reference_moments)
                if reference_cache is not None:
                    reference_cache.append(ref_features)
            for index, model in enumerate(models):
                _accumulate(model, index, batch, taps, sizes, reference, ref_features, totals[index],
                            own, owns[index])
    for index, stats in enumerate(totals):
        _check_complete(stats, sizes, f"model {index}")
        _check_complete(owns[index], own[1], f"model {index}")
    if own_out is not None:
        own_out.extend({name: moments[name].to("cpu") for name in own[1]} for moments in owns)
    return [{name: stats[name].to("cpu") for name in sizes} for stats in totals]


def collect_moments(
    model: nn.Module,
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec | None = None,
    *,
    points: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> dict[str, Moments]:
    """One model's own :class:`Moments` per point (one forward pass over the calibration data).

    The server measures the round's global model with it once, to :func:`assemble` the
    statistics clients send.

    Args:
        model: The model.
        calibration: Inputs, see :func:`as_batches`.
        spec: Alignment spec (default ``spec_for(model)``).
        points: Names of the points (default all).
        device: Where to run.
        batch_size: Batch size when ``calibration`` is a tensor.

    Raises:
        StatisticsError: Non-finite features or no calibration data (model index -1).
    """
    batches, spec = _batches_and_spec(model, calibration, spec, batch_size)
    taps, sizes = _taps(spec, points)
    device = resolve_device(device)
    totals: dict[str, Moments] = {}
    with _running(model, device=device):
        for batch in batches:
            for tap, outputs in _record_reference(model, batch.to(device), taps, sizes).items():
                for features in outputs:
                    for point in taps[tap]:
                        totals[point] = totals[point] + features.moments if point in totals else features.moments
    _check_complete(totals, sizes, "the reference model", -1)
    return {name: totals[name].to("cpu") for name in sizes}


def feature_moments(
    model: nn.Module,
    calibration: torch.Tensor | Iterable,
    point: AlignmentPoint,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (biased) variance of one point's features, float64 on the CPU.

    The diagonal of :func:`collect_moments`' covariance at a fraction of its cost: sums of
    squares instead of a Gram product, and each batch's forward stops once the point's taps
    have run as often as in a full forward of one example (nothing after them can change them).
    REPAIR's layer-by-layer corrections measure the merged model with it.

    Args:
        model: The model.
        calibration: Inputs, see :func:`as_batches`.
        point: The point (its taps and size).
        device: Where to run.
        batch_size: Batch size when ``calibration`` is a tensor.

    Raises:
        StatisticsError: Non-finite features, or no calibration data (model index -1).
    """
    taps = {tap: [point.name] for tap in point.taps}
    device = resolve_device(device)
    count, mean, m2 = 0, torch.zeros(point.size, dtype=torch.float64), torch.zeros(point.size, dtype=torch.float64)
    firings = 0  # tap outputs per forward, counted on one example before the first batch
    fired = 0  # in the current batch's forward

    def record(_tap: str, output: object) -> None:
        nonlocal count, mean, m2, fired
        features = _features(output, point.name, point.size, -1)
        n = features.shape[0] * features.shape[2]
        batch_mean = features.sum((0, 2)).double() / n
        if not torch.isfinite(batch_mean).all():
            raise StatisticsError(f"the model has non-finite features at point '{point.name}'", -1)
        batch_m2 = (features - batch_mean.to(features.dtype)[None, :, None]).square().sum((0, 2)).double()
        total, delta, _, factor = _merged(count, n, mean.to(batch_mean), batch_mean)
        mean = mean.to(batch_mean) + delta * (n / total)
        m2 = m2.to(batch_m2) + batch_m2 + delta.square() * factor
        count, fired = total, fired + 1
        if fired >= firings:
            raise _PointSeen

    with _running(model, device=device):
        for batch in as_batches(calibration, batch_size):
            batch = batch.to(device)
            if not firings:
                seen: list[int] = []
                run_with_taps(model, batch[:1], taps, lambda _tap, _output: seen.append(1))
                firings = len(seen)
            fired = 0
            try:
                run_with_taps(model, batch, taps, record)
            except _PointSeen:
                pass
    if count == 0:
        raise StatisticsError(f"the model: no features at point '{point.name}' "
                              "(empty calibration data, or its taps never ran)", -1)
    return mean.cpu(), (m2 / count).cpu()


class _PointSeen(Exception):
    """Raised from a hook to end a forward whose remaining layers cannot change the point measured."""


@contextlib.contextmanager
def running_on(model: nn.Module, device: torch.device, *, training: bool | None) -> Iterator[nn.Module]:
    """Temporarily move ``model`` to ``device`` (and set its mode); restore both on exit.

    Args:
        model: The model, changed in place and restored.
        device: Where it runs inside the block.
        training: Mode inside the block (None: leave modes alone).
    """
    modes = [(module, module.training) for module in model.modules()]
    tensor = next(iter(model.state_dict().values()), None)
    home = tensor.device if tensor is not None else device
    model.to(device)
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        model.to(home)
        for module, mode in modes:
            module.training = mode


def run_with_taps(model: nn.Module, batch: torch.Tensor, taps: Mapping[str, list[str]],
                  on_output: Callable[[str, object], None]) -> None:
    """Forward ``batch`` with a hook on every tap calling ``on_output(tap, output)``.

    A ``"<module>+relu"`` tap hooks the module and passes ``relu(output)``; a
    ``"<module>:input"`` tap passes the module's first input (see
    :func:`fedcca.spec.alignment.resolve_tap`).
    """
    modules = dict(model.named_modules())
    resolved = {tap: resolve_tap(tap, modules) for tap in taps}
    missing = [tap for tap, found in resolved.items() if found is None]
    if missing:
        raise StatisticsError(f"model {type(model).__name__} has no module '{missing[0]}' "
                              f"(tap of point '{taps[missing[0]][0]}')")
    handles = []
    for tap, found in resolved.items():
        module = modules[found.module]
        if found.input:  # the feature is what the module consumes
            handles.append(module.register_forward_pre_hook(
                lambda _module, inputs, tap=tap: on_output(tap, inputs[0] if inputs else None)))
        else:
            handles.append(module.register_forward_hook(
                lambda _module, _inputs, output, tap=tap, relu=found.relu: on_output(tap, _relu(output) if relu
                                                                                    else output)))
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- kernel

@dataclass
class _BatchFeatures:
    """One tap's features in one batch: centred samples ``[N, n, S]`` and their own moments."""

    centred: torch.Tensor  # [N, n, S]: S spatial positions per input (1 for vectors), the model's dtype
    moments: Moments


def _batch_features(features: torch.Tensor, point: str, index: int, own: bool = True) -> _BatchFeatures:
    """Centre ``features`` [N, n, S] on their mean; with ``own``, their own moments too.

    A non-finite feature makes the mean non-finite: checked there, without a pass of its own.
    ``index``: the model's index in ``models``, -1 for the reference (for the error).
    """
    count = features.shape[0] * features.shape[2]
    mean = features.sum((0, 2)).double() / count  # the sum's own pairwise float32 accumulation suffices
    if not torch.isfinite(mean).all():
        owner = "the reference model" if index < 0 else f"model {index}"
        raise StatisticsError(f"{owner} has non-finite features at point '{point}'", index)
    centred = features - mean.to(features.dtype)[None, :, None]
    return _BatchFeatures(centred, Moments(count, mean, _gram(centred, centred) if own else None))


def _gram(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum over samples of left right^T`` for ``[N, n, S]`` features (float64 result).

    Computed in the inputs' dtype (float32: fast, on the models' device) over blocks of about
    :data:`ROW_BLOCK` samples added in float64, which bounds the rounding error; without a
    transpose copy of conv features. Small batches (fewer than :data:`FLOAT64_BELOW` samples)
    are multiplied in float64: the product costs nothing there, and tiny calibration sets with
    nearly as many features as samples need the precision.
    """
    samples = left.shape[0] * left.shape[2]
    if samples < FLOAT64_BELOW:
        left, right = left.double(), right.double()
    if left.shape[2] < SMALL_MAPS:  # vectors or small maps: samples as rows of one plain product per block
        left = left.movedim(1, 2).reshape(samples, left.shape[1])
        right = right.movedim(1, 2).reshape(samples, right.shape[1])
        blocks = [(left[i:i + ROW_BLOCK].T @ right[i:i + ROW_BLOCK]) for i in range(0, samples, ROW_BLOCK)]
    else:  # large conv maps [N, n, S]: per-input products (no transpose copy), summed
        step = max(1, ROW_BLOCK // left.shape[2])
        blocks = [torch.matmul(left[i:i + step], right[i:i + step].transpose(1, 2)).sum(0)
                  for i in range(0, left.shape[0], step)]
    total = blocks[0].double()
    for block in blocks[1:]:
        total = total + block.double()
    return total


def _merged(n1: int, n2: int, mean1: torch.Tensor, mean2: torch.Tensor, mean1_b: torch.Tensor | None = None,
            mean2_b: torch.Tensor | None = None) -> tuple[int, torch.Tensor, torch.Tensor | None, float]:
    """``(n1 + n2, mean2 - mean1, mean2_b - mean1_b, n1 n2 / (n1 + n2))`` for Chan's update."""
    count = n1 + n2
    delta = mean2.to(mean1) - mean1
    delta_b = None if mean1_b is None or mean2_b is None else mean2_b.to(mean1_b) - mean1_b
    return count, delta, delta_b, (n1 * n2 / count) if count else 0.0


def _on(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` on ``like``'s device (partial statistics from a GPU and a CPU combine)."""
    return tensor.to(like.device)


def _relu(output: object) -> object:
    return torch.relu(output) if isinstance(output, torch.Tensor) else output


def _batches_and_spec(model: nn.Module, calibration: torch.Tensor | Iterable, spec: AlignmentSpec | None,
                      batch_size: int) -> tuple[Iterator[torch.Tensor], AlignmentSpec]:
    """The calibration batches and the spec (derived on the first batch when not given)."""
    batches = as_batches(calibration, batch_size)
    if spec is None:
        first = next(batches, None)
        spec = spec_for(model, example_input=first)
        batches = itertools.chain([] if first is None else [first], batches)
    return batches, spec


def _taps(spec: AlignmentSpec, points: Sequence[str] | None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``tap -> the points it feeds`` (normally one) and ``point -> size`` for the selected points."""
    selected = [spec.point(name) for name in (spec.names() if points is None else points)]
    sizes = {point.name: point.size for point in selected}
    taps: dict[str, list[str]] = {}
    for point in selected:
        for tap in point.taps:
            taps.setdefault(tap, []).append(point.name)
            if point.size != sizes[taps[tap][0]]:
                raise StatisticsError(f"tap '{tap}' feeds points '{taps[tap][0]}' and '{point.name}' "
                                      f"of different sizes")
    return taps, sizes


@contextlib.contextmanager
def _running(*models: nn.Module, device: torch.device) -> Iterator[None]:
    """Every model in eval mode on ``device`` without gradients; restored afterwards."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(running_on(model, device, training=False))
        stack.enter_context(torch.no_grad())
        yield


def _check_complete(stats: Mapping[str, object], sizes: Mapping[str, int], owner: str, index: int | None = None) -> None:
    missing = [name for name in sizes if name not in stats]
    if missing:
        raise StatisticsError(f"{owner}: no features at point '{missing[0]}' "
                              f"(empty calibration data, or its taps never ran)", index)


def _features(output: object, point: str, size: int, index: int) -> torch.Tensor:
    """A tap's output as ``[N, features, positions]`` (a view: [N, C, H, W] -> [N, C, H*W]), shape-checked.

    ``index``: the model's index in ``models``, -1 for the reference.
    """
    owner = "the reference model" if index < 0 else f"model {index}"
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise StatisticsError(f"{owner}: the tap of point '{point}' does not output a tensor [N, C, ...]", index)
    if output.shape[1] != size:
        raise StatisticsError(f"{owner}: point '{point}' has {output.shape[1]} features, the spec says {size}", index)
    return output.detach().reshape(output.shape[0], size, -1)


def _record_reference(reference: nn.Module, batch: torch.Tensor, taps: Mapping[str, list[str]],
                      sizes: Mapping[str, int], own: bool = True) -> dict[str, list[_BatchFeatures]]:
    """The reference's centred features per tap for one batch (a list: a module may run twice)."""
    recorded: dict[str, list[_BatchFeatures]] = {tap: [] for tap in taps}

    def record(tap: str, output: object) -> None:
        point = taps[tap][0]
        recorded[tap].append(_batch_features(_features(output, point, sizes[point], -1), point, -1, own))

    run_with_taps(reference, batch, taps, record)
    return recorded


def _accumulate(model: nn.Module, index: int, batch: torch.Tensor, taps: Mapping[str, list[str]],
                sizes: Mapping[str, int], reference: nn.Module,
                ref_features: Mapping[str, list[_BatchFeatures]], totals: dict[str, PairStatistics],
                own: tuple[Mapping[str, list[str]], Mapping[str, int]] = ({}, {}),
                own_totals: dict[str, Moments] | None = None) -> None:
    """Fold one batch of ``model``'s features into ``totals`` (paired with the reference's), and its own
    moments at the ``own`` taps into ``own_totals`` (same forward)."""
    calls = {tap: 0 for tap in taps}

    def fold(tap: str, mine: _BatchFeatures) -> None:
        first = taps[tap][0]
        if calls[tap] >= len(ref_features[tap]):
            raise StatisticsError(f"model {index}: tap '{tap}' of point '{first}' ran more often "
                                  f"than in the reference", index)
        theirs = ref_features[tap][calls[tap]]
        calls[tap] += 1
        if mine.moments.count != theirs.moments.count:
            raise StatisticsError(f"model {index}: point '{first}' has {mine.moments.count} samples in a batch, "
                                  f"the reference {theirs.moments.count}", index)
        pair = PairStatistics(theirs.moments, mine.moments, _gram(theirs.centred, mine.centred))
        for point in taps[tap]:
            totals[point] = totals[point] + pair if point in totals else pair

    if model is reference:  # same object: its features are the reference's, skip the forward
        for tap, outputs in ref_features.items():
            for features in outputs:
                fold(tap, features)
    else:
        own_taps, own_sizes = own

        def on_output(tap: str, output: object) -> None:
            if tap in taps:
                first = taps[tap][0]
                fold(tap, _batch_features(_features(output, first, sizes[first], index), first, index))
            if tap in own_taps and own_totals is not None:
                first = own_taps[tap][0]
                moments = _batch_features(_features(output, first, own_sizes[first], index), first, index).moments
                for point in own_taps[tap]:
                    own_totals[point] = own_totals[point] + moments if point in own_totals else moments

        run_with_taps(model, batch, {**own_taps, **taps}, on_output)
