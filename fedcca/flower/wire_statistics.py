"""The statistics record of a train reply, both ways: what a fedcca client sends besides its weights
(per alignment point its model's moments and the cross moment against the received model; optionally
its pre-activation moments) and how the server decodes it, every array's declared shape, dtype and size
checked before anything is decoded."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedcca.spec.alignment import AlignmentSpec
from fedcca.statistics import ClientStatistics, Moments, PairStatistics, StatisticsError

STATISTICS_FORMAT = 3
"""Version of the statistics wire format written by :func:`statistics_to_record`; a reply of another
version is refused, naming both (format 2, without pre-activation moments, is read too)."""
READABLE_FORMATS = (2, 3)
PREACTIVATION_PREFIX = "preactivation/"
FORMAT_KEY = "format"


def statistics_to_record(stats: Mapping[str, PairStatistics],
                         preactivation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> ArrayRecord:
    """Pack what a client sends of its statistics (format :data:`STATISTICS_FORMAT`) into an ``ArrayRecord``.

    Per point: ``count``, the model's ``mean`` (float64), its centred second moment as the packed
    upper triangle (``comoment``, float32: it is symmetric) and the ``cross`` moment with the
    received model (float32). The received model's own moments are not sent: the server
    measures them once per round (:func:`fedcca.statistics.collect_moments`).

    With ``preactivation``, per REPAIR point also ``preactivation/<point>/mean`` (float64) and its
    covariance's packed upper triangle (``preactivation/<point>/covariance``, float32).

    Args:
        stats: Statistics per alignment point, as returned by ``collect_statistics`` for the
            (received model, trained model) pair.
        preactivation: The trained model's pre-activation ``{point: (mean, covariance)}``.
    """
    arrays = {FORMAT_KEY: np.asarray(STATISTICS_FORMAT, dtype=np.int64)}
    for point, pair in stats.items():
        part = pair.client_part()
        n = part.b.mean.shape[0]
        rows, cols = np.triu_indices(n)
        arrays[f"{point}/count"] = np.asarray(float(part.b.count), dtype=np.float64)
        arrays[f"{point}/mean"] = part.b.mean.detach().cpu().double().numpy()
        arrays[f"{point}/comoment"] = part.b.comoment.detach().cpu().numpy()[rows, cols].astype(np.float32)
        arrays[f"{point}/cross"] = part.cross.detach().cpu().numpy().astype(np.float32)
    for point, (mean, covariance) in (preactivation or {}).items():
        rows, cols = np.triu_indices(mean.shape[0])
        arrays[f"{PREACTIVATION_PREFIX}{point}/mean"] = mean.detach().cpu().double().numpy()
        arrays[f"{PREACTIVATION_PREFIX}{point}/covariance"] = \
            covariance.detach().cpu().double().numpy()[rows, cols].astype(np.float32)
    return ArrayRecord({key: Array(value) for key, value in arrays.items()})


def statistics_from_record(record: ArrayRecord, spec: AlignmentSpec) -> dict[str, ClientStatistics]:
    """Unpack and validate the statistics a client sent (:func:`decode_statistics` without pre-activation sizes).

    Args:
        record: The ``ArrayRecord`` stored under :data:`STATISTICS_KEY`.
        spec: The model's alignment spec; every point must be present with matching sizes.

    Raises:
        StatisticsError: See :func:`decode_statistics`.
    """
    return decode_statistics(record, spec)[0]


Preactivation = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""``{point: (mean, covariance)}`` of a model's pre-activations (REPAIR's endpoint statistics)."""


def decode_statistics(record: ArrayRecord, spec: AlignmentSpec, preactivation_sizes: Mapping[str, int] | None = None
                      ) -> tuple[dict[str, ClientStatistics], Preactivation | None]:
    """Unpack and validate a client's statistics record: alignment statistics and pre-activation moments.

    Args:
        record: The ``ArrayRecord`` stored under :data:`STATISTICS_KEY`.
        spec: The model's alignment spec; every point must be present with matching sizes.
        preactivation_sizes: ``{point: features}`` of the points whose pre-activation moments
            may be sent (all of them or none); None: none may be.

    Returns:
        ``(statistics per point, pre-activation moments or None when not sent)``.

    Raises:
        StatisticsError: Naming the key that cannot be decoded, is missing, unexpected, of the
            wrong shape, non-finite, a count that is not a positive integer, a negative
            pre-activation variance; or a format this server does not read.
    """
    fields = {"count": lambda n: (), "mean": lambda n: (n,), "comoment": lambda n: (n * (n + 1) // 2,),
              "cross": lambda n: (n, n)}
    pre_fields = {"mean": lambda n: (n,), "covariance": lambda n: (n * (n + 1) // 2,)}
    shapes = {FORMAT_KEY: ()} | {f"{point.name}/{name}": shape(point.size) for point in spec.points
                                 for name, shape in fields.items()}
    pre_shapes = {f"{PREACTIVATION_PREFIX}{point}/{name}": shape(size) for point, size in
                  (preactivation_sizes or {}).items() for name, shape in pre_fields.items()}
    unexpected = sorted(set(record) - set(shapes) - set(pre_shapes))
    if unexpected:
        raise StatisticsError(f"unexpected statistics key '{unexpected[0]}'")
    arrays: dict[str, np.ndarray] = {}
    for key, array in record.items():
        # Declared shape and dtype first: a 128-byte array may declare 10^12 elements.
        allowed = _INTEGER if key == FORMAT_KEY else _FLOATS
        # finiteness is checked below, per key, after the conversion to float64
        arrays[key] = decode_declared(array, key, shapes.get(key, pre_shapes.get(key, ())), allowed, finite=False)
    version = arrays.get(FORMAT_KEY)
    if version is None or np.asarray(version).shape != () or int(version) not in READABLE_FORMATS:
        raise StatisticsError(f"statistics format {None if version is None else np.asarray(version).tolist()}, "
                              f"this server reads formats {', '.join(map(str, READABLE_FORMATS))} (update the client)")
    result: dict[str, ClientStatistics] = {}
    for point in spec.points:
        n = point.size
        values = {name: _checked_array(arrays, f"{point.name}/{name}", shape(n)) for name, shape in fields.items()}
        count = float(values["count"])
        if not (0 < count <= _MAX_COUNT and count == int(count)):
            raise StatisticsError(f"statistics key '{point.name}/count' must be a positive integer of at most "
                                  f"{_MAX_COUNT:.0e}, got {count:.3g}")
        result[point.name] = ClientStatistics(
            Moments(int(count), torch.from_numpy(values["mean"]), torch.from_numpy(_unpacked(values["comoment"], n))),
            torch.from_numpy(values["cross"]))
    return result, _preactivation(arrays, preactivation_sizes or {}, pre_fields)


def _preactivation(arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                   fields: Mapping[str, Any]) -> Preactivation | None:
    """The pre-activation moments in ``arrays`` (all points of ``sizes`` or none), validated."""
    sent = [key for key in arrays if key.startswith(PREACTIVATION_PREFIX)]
    if not sent:
        return None
    moments: Preactivation = {}
    for point, n in sizes.items():
        values = {name: _checked_array(arrays, f"{PREACTIVATION_PREFIX}{point}/{name}", shape(n))
                  for name, shape in fields.items()}
        covariance = _unpacked(values["covariance"], n)
        if (np.diagonal(covariance) < 0).any():
            raise StatisticsError(f"statistics key '{PREACTIVATION_PREFIX}{point}/covariance' has a negative variance")
        moments[point] = (torch.from_numpy(values["mean"]), torch.from_numpy(covariance))
    return moments


def _unpacked(upper: np.ndarray, n: int) -> np.ndarray:
    """The symmetric ``n x n`` matrix whose upper triangle (row-major) is ``upper``."""
    matrix = np.zeros((n, n))
    rows, cols = np.triu_indices(n)
    matrix[rows, cols] = upper
    matrix[cols, rows] = upper
    return matrix


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INTEGER = (np.dtype(np.int64),)
_MAX_COUNT = 1e12  # samples behind one point's statistics; far above any calibration set


def check_declared(array: Array, key: str, shape: tuple[int, ...], allowed: tuple[np.dtype, ...],
                    error: type[ValueError] = StatisticsError, what: str = "statistics array") -> None:
    """The Array's declared shape, dtype and byte size match what ``key`` must hold, checked before decoding."""
    try:
        declared_dtype, declared_shape = np.dtype(array.dtype), tuple(int(d) for d in array.shape)
    except (TypeError, ValueError) as err:
        raise error(f"{what} '{key}' declares an unreadable dtype or shape: {err}") from err
    if declared_dtype not in allowed or declared_shape != shape:
        raise error(f"{what} '{key}' declares dtype {declared_dtype} and shape {declared_shape}, expected dtype "
                    f"{' or '.join(str(d) for d in allowed)} and shape {shape}")
    payload = math.prod(shape) * declared_dtype.itemsize
    if len(array.data) > payload + _HEADER_SLACK:
        raise error(f"{what} '{key}' holds {len(array.data)} bytes for {payload} bytes of values")


def decode_declared(array: Array, key: str, shape: tuple[int, ...], allowed: tuple[np.dtype, ...],
                    error: type[ValueError] = StatisticsError, what: str = "statistics array",
                    finite: bool = True, copy: bool = True) -> np.ndarray:
    """The values of ``array`` as a writable array of its own, once its declared and its decoded dtype, shape
    and size are what ``key`` must hold (and, with ``finite``, every value is finite); ``error`` names what
    is wrong. Decodes the ``.npy`` bytes Flower's ``Array.numpy`` reads (never a pickle), with numpy's
    header parser run once per distinct header: replies of one model repeat the same few headers. Without
    ``copy``, a read-only view of the array's bytes (nothing allocated) for a reader that only reads."""
    check_declared(array, key, shape, allowed, error, what)
    data = array.data
    try:
        dtype, decoded_shape, fortran, offset = _npy_header(bytes(data[:_header_length(data)]))
        decoded = np.frombuffer(data, dtype=dtype, count=math.prod(decoded_shape), offset=offset)
    except Exception as err:  # pylint: disable=broad-except  # corrupt bytes or a foreign serialisation
        raise error(f"{what} '{key}' cannot be decoded: {err}") from err
    if decoded.dtype not in allowed or decoded_shape != shape:
        raise error(f"{what} '{key}' decodes to {decoded.dtype} {decoded_shape}, expected "
                    f"{' or '.join(str(d) for d in allowed)} of shape {shape}")
    values = decoded.reshape(shape, order="F" if fortran else "C")
    if copy:
        values = np.array(values, order="K")  # own copy, writable
    if finite and np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
        raise error(f"{what} '{key}' has non-finite values")
    return values


def _header_length(data: bytes) -> int:
    """Length of the ``.npy`` header that starts ``data`` (magic, version, length field and the header itself)."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy bytes")
    major = data[6]
    if major == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if major == 2:
        return 12 + int.from_bytes(data[8:12], "little")
    raise ValueError(f".npy format version {major} is not readable")


@functools.lru_cache(maxsize=1024)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """dtype, shape, Fortran order and payload offset of one ``.npy`` header, parsed by numpy (cached: the
    parser is most of the cost of decoding a small array)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not readable")
    if stream.tell() != len(header):
        raise ValueError("the .npy header's length field does not match its text")
    if dtype.hasobject:
        raise ValueError("object arrays are never decoded")
    return dtype, tuple(int(d) for d in shape), bool(fortran), len(header)


_HEADER_SLACK = 1024  # numpy's .npy header


def _checked_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``arrays[key]`` as a float64 copy of ``shape``, finite; StatisticsError naming the key otherwise."""
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
