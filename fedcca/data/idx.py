"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedcca.data.errors import DatasetFormatError

# IDX type code (third magic byte) -> big-endian numpy dtype, as specified by LeCun's MNIST page.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (``*.gz`` files are decompressed) into a numpy array.

    The magic number (two zero bytes, a type code, the number of dimensions) and the total
    size are validated, so a truncated or foreign file fails loudly instead of being reshaped
    into garbage.

    Args:
        path: The file to read.
        ndim: If given, the number of dimensions the file must declare (3 for images, 1 for labels).

    Raises:
        DatasetFormatError: naming the file, when the content is not a valid IDX array.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DatasetFormatError(f"{path}: cannot decompress/read ({err})") from err
    return _parse_idx(raw, path, ndim)


def _parse_idx(raw: bytes, path: Path, ndim: int | None) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected 0000 "
            f"followed by a type code in {sorted(_IDX_DTYPES)} and the number of dimensions)"
        )
    dims_count = raw[3]
    if ndim is not None and dims_count != ndim:
        raise DatasetFormatError(f"{path}: IDX file declares {dims_count} dimensions, expected {ndim}")
    header_end = 4 + 4 * dims_count
    if len(raw) < header_end:
        raise DatasetFormatError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_count, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DatasetFormatError(
            f"{path}: IDX shape {shape} needs {expected} data bytes, file holds {len(raw) - header_end}"
        )
    # Native byte order, owned and writable (frombuffer views are read-only).
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))
