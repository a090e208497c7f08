"""Streaming second-order statistics between a reference model and other models.

For every alignment point the reference's features ``a`` and a model's features ``b`` are
accumulated as raw float64 moments (count, sums, second moments, cross moment) over the
calibration batches. Activations are never stored beyond one batch: memory is O(n^2) per
point, and statistics of disjoint data combine by addition (clients send them to the server).
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

from fedcca.alignment import AlignmentSpec, resolve_tap, spec_for
from fedcca.devices import resolve_device

_FIELDS = ("count", "sum_a", "sum_b", "sq_a", "sq_b", "cross")


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
class PairStatistics:
    """Raw float64 moments of the reference's features ``a`` and a model's features ``b``.

    Args:
        count: Number of samples (every spatial position of a conv feature counts).
        sum_a: ``sum a``, shape [na].
        sum_b: ``sum b``, shape [nb].
        sq_a: ``sum a a^T``, shape [na, na].
        sq_b: ``sum b b^T``, shape [nb, nb].
        cross: ``sum a b^T``, shape [na, nb].
    """

    count: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def from_features(cls, a: torch.Tensor, b: torch.Tensor) -> PairStatistics:
        """Moments of paired samples ``a`` [N, na] and ``b`` [N, nb] (cast to float64).

        Args:
            a: Reference features, one sample per row.
            b: The other model's features for the same inputs.
        """
        a, b = a.double(), b.double()
        return cls(count=a.shape[0], sum_a=a.sum(0), sum_b=b.sum(0),
                   sq_a=a.T @ a, sq_b=b.T @ b, cross=a.T @ b)

    def __add__(self, other: PairStatistics) -> PairStatistics:
        """Statistics of the union of both sample sets."""
        if not isinstance(other, PairStatistics):
            return NotImplemented
        if self.cross.shape != other.cross.shape:
            raise StatisticsError(f"cannot add statistics of shapes {tuple(self.cross.shape)} "
                                  f"and {tuple(other.cross.shape)}")
        # `.to` lets partial sums from a GPU and a CPU be combined.
        return PairStatistics(self.count + other.count, *(
            getattr(self, name) + getattr(other, name).to(getattr(self, name).device)
            for name in _FIELDS[1:]))

    def to(self, device: torch.device | str) -> PairStatistics:
        """A copy with every tensor on ``device``."""
        return PairStatistics(self.count, *(getattr(self, name).to(device) for name in _FIELDS[1:]))

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of a, mean of b)."""
        return self.sum_a / self.count, self.sum_b / self.count

    def zero_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks ``(a, b)`` of the features that are exactly 0 on every sample (dead ReLU units)."""
        return self.sq_a.diagonal() == 0, self.sq_b.diagonal() == 0

    def covariances(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centred covariances ``(C_aa, C_bb, C_ab)``, divided by ``count`` (not count - 1)."""
        if self.count <= 0:
            raise StatisticsError("statistics hold no samples")
        mean_a, mean_b = self.means()
        n = self.count
        return (self.sq_a / n - torch.outer(mean_a, mean_a),
                self.sq_b / n - torch.outer(mean_b, mean_b),
                self.cross / n - torch.outer(mean_a, mean_b))


def as_batches(calibration: torch.Tensor | Iterable, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield input batches from calibration data.

    A tensor (or numpy array) is cut along dim 0 into near-equal batches of at most
    ``batch_size`` (near-equal so that no trailing batch of one sample breaks BatchNorm in
    train mode). An iterable passes through; ``(x, y)`` items yield ``x``.

    Args:
        calibration: Inputs [N, ...], or an iterable of batches / ``(x, y)`` pairs.
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
    for item in calibration:
        yield item[0] if isinstance(item, (tuple, list)) else item


def collect_statistics(
    reference: nn.Module,
    models: Sequence[nn.Module],
    calibration: torch.Tensor | Iterable,
    spec: AlignmentSpec | None = None,
    *,
    points: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> list[dict[str, PairStatistics]]:
    """Statistics of every model's features against the reference's, per alignment point.

    The reference runs once per batch (its features are kept for that batch only), then each
    model runs and its hooks fold features into the statistics: cost O(K) forwards, memory
    O(n^2) per point. Models run in eval mode under ``no_grad`` on ``device``; their mode and
    device are restored and all hooks removed afterwards, also on error. Statistics of a
    point with several taps are the sums over the taps. A model that is the reference object
    itself gets its statistics from the reference's features without a second forward.

    Args:
        reference: Model A, the alignment target.
        models: Models B; one dict of statistics is returned per model.
        calibration: Inputs, see :func:`as_batches`.
        spec: Alignment spec (default ``spec_for(reference)``, traced on the first batch if needed).
        points: Names of the points to collect (default all).
        device: Where to run (None: CUDA if available, else CPU).
        batch_size: Batch size when ``calibration`` is a tensor.

    Returns:
        For each model, ``{point name: PairStatistics}`` with CPU tensors.

    Raises:
        StatisticsError: Non-finite features (naming the model index and the point), a
            feature size that differs from the spec, or empty calibration data.
    """
    batches = as_batches(calibration, batch_size)
    if spec is None:
        first = next(batches, None)
        spec = spec_for(reference, example_input=first)
        batches = itertools.chain([] if first is None else [first], batches)
    selected = [spec.point(name) for name in (spec.names() if points is None else points)]
    sizes = {point.name: point.size for point in selected}
    taps: dict[str, list[str]] = {}  # tap -> the points it feeds (normally one)
    for point in selected:
        for tap in point.taps:
            taps.setdefault(tap, []).append(point.name)
            if point.size != sizes[taps[tap][0]]:
                raise StatisticsError(f"tap '{tap}' feeds points '{taps[tap][0]}' and '{point.name}' "
                                      f"of different sizes")
    device = resolve_device(device)
    totals: list[dict[str, PairStatistics]] = [{} for _ in models]
    with contextlib.ExitStack() as stack:
        for model in (reference, *models):
            stack.enter_context(running_on(model, device, training=False))
        stack.enter_context(torch.no_grad())
        for batch in batches:
            batch = batch.to(device)
            ref_features = _record_reference(reference, batch, taps, sizes)
            for index, model in enumerate(models):
                _accumulate(model, index, batch, taps, sizes, reference, ref_features, totals[index])
    for index, stats in enumerate(totals):
        missing = [name for name in sizes if name not in stats]
        if missing:
            raise StatisticsError(f"model {index}: no features at point '{missing[0]}' "
                                  f"(empty calibration data, or its taps never ran)")
    return [{name: stats[name].to("cpu") for name in sizes} for stats in totals]


def statistics_to_arrays(stats: Mapping[str, PairStatistics]) -> dict[str, np.ndarray]:
    """Flatten statistics to float64 numpy arrays keyed ``"{point}/{field}"``.

    Args:
        stats: Statistics per point (e.g. one element of :func:`collect_statistics`).
    """
    arrays: dict[str, np.ndarray] = {}
    for point, pair in stats.items():
        arrays[f"{point}/count"] = np.asarray(float(pair.count), dtype=np.float64)
        for name in _FIELDS[1:]:
            arrays[f"{point}/{name}"] = getattr(pair, name).detach().cpu().double().numpy()
    return arrays


def statistics_from_arrays(arrays: Mapping[str, np.ndarray], spec: AlignmentSpec) -> dict[str, PairStatistics]:
    """Rebuild and validate statistics from :func:`statistics_to_arrays` output.

    Args:
        arrays: ``"{point}/{field}"`` -> array.
        spec: Every point of the spec must be present, with shapes matching its size.

    Raises:
        StatisticsError: Naming the key that is missing, unexpected, of the wrong shape,
            non-finite, or (for counts) not a positive integer.
    """
    expected = {f"{point.name}/{name}" for point in spec.points for name in _FIELDS}
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise StatisticsError(f"unexpected statistics key '{unexpected[0]}'")
    result: dict[str, PairStatistics] = {}
    for point in spec.points:
        n = point.size
        shapes = {"count": (), "sum_a": (n,), "sum_b": (n,), "sq_a": (n, n), "sq_b": (n, n), "cross": (n, n)}
        values = {name: _checked_array(arrays, f"{point.name}/{name}", shape) for name, shape in shapes.items()}
        count = float(values.pop("count"))
        if not (count > 0 and count == int(count)):
            raise StatisticsError(f"statistics key '{point.name}/count' must be a positive integer, got {count}")
        result[point.name] = PairStatistics(int(count), **{k: torch.from_numpy(v) for k, v in values.items()})
    return result


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


def _checked_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in arrays:
        raise StatisticsError(f"statistics key '{key}' is missing")
    try:
        value = np.asarray(arrays[key], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise StatisticsError(f"statistics key '{key}' is not numeric: {err}") from err
    if value.shape != shape:
        raise StatisticsError(f"statistics key '{key}' has shape {value.shape}, expected {shape}")
    if not np.isfinite(value).all():
        raise StatisticsError(f"statistics key '{key}' has non-finite values")
    return np.array(value)  # own, writable copy


def _features(output: object, point: str, size: int, index: int) -> torch.Tensor:
    """A tap's output as samples x features ([N, C, H, W] -> [N*H*W, C]), checked.

    ``index``: the model's index in ``models``, -1 for the reference.
    """
    owner = "the reference model" if index < 0 else f"model {index}"
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise StatisticsError(f"{owner}: the tap of point '{point}' does not output a tensor [N, C, ...]", index)
    if output.shape[1] != size:
        raise StatisticsError(f"{owner}: point '{point}' has {output.shape[1]} features, the spec says {size}", index)
    if not torch.isfinite(output).all():
        raise StatisticsError(f"{owner} has non-finite features at point '{point}'", index)
    return output.detach().movedim(1, -1).reshape(-1, size)


def run_with_taps(model: nn.Module, batch: torch.Tensor, taps: Mapping[str, list[str]],
                   on_output: Callable[[str, object], None]) -> None:
    """Forward ``batch`` with a hook on every tap calling ``on_output(tap, output)``.

    A ``"<module>+relu"`` tap hooks the module and passes ``relu(output)`` (see
    :func:`fedcca.alignment.resolve_tap`).
    """
    modules = dict(model.named_modules())
    resolved = {tap: resolve_tap(tap, modules) for tap in taps}
    missing = [tap for tap, found in resolved.items() if found is None]
    if missing:
        raise StatisticsError(f"model {type(model).__name__} has no module '{missing[0]}' "
                              f"(tap of point '{taps[missing[0]][0]}')")
    handles = [modules[name].register_forward_hook(
        lambda _module, _inputs, output, tap=tap, relu=relu: on_output(tap, _relu(output) if relu else output))
        for tap, (name, relu) in resolved.items()]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()


def _relu(output: object) -> object:
    """ReLU of a hooked output (a new tensor: an in-place ReLU in the model runs after the hook)."""
    return torch.relu(output) if isinstance(output, torch.Tensor) else output


def _record_reference(reference: nn.Module, batch: torch.Tensor, taps: Mapping[str, list[str]],
                      sizes: Mapping[str, int]) -> dict[str, list[torch.Tensor]]:
    """The reference's features per tap for one batch (a list: a module may run twice)."""
    recorded: dict[str, list[torch.Tensor]] = {tap: [] for tap in taps}

    def record(tap: str, output: object) -> None:
        point = taps[tap][0]
        recorded[tap].append(_features(output, point, sizes[point], -1))

    run_with_taps(reference, batch, taps, record)
    return recorded


def _accumulate(model: nn.Module, index: int, batch: torch.Tensor, taps: Mapping[str, list[str]],
                sizes: Mapping[str, int], reference: nn.Module,
                ref_features: Mapping[str, list[torch.Tensor]], totals: dict[str, PairStatistics]) -> None:
    """Fold one batch of ``model``'s features into ``totals`` (paired with the reference's)."""
    calls = {tap: 0 for tap in taps}

    def fold(tap: str, output: object) -> None:
        first = taps[tap][0]
        features = _features(output, first, sizes[first], index)
        if calls[tap] >= len(ref_features[tap]):
            raise StatisticsError(f"model {index}: tap '{tap}' of point '{first}' ran more often "
                                  f"than in the reference", index)
        pair = PairStatistics.from_features(ref_features[tap][calls[tap]], features)
        calls[tap] += 1
        for point in taps[tap]:
            totals[point] = totals[point] + pair if point in totals else pair

    if model is reference:  # same object: its features are the reference's, skip the forward
        for tap, outputs in ref_features.items():
            for features in outputs:
                fold(tap, features)
    else:
        run_with_taps(model, batch, taps, fold)
