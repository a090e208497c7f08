"""fedcca.flower.wire_statistics.decode_declared: a reply's arrays decoded as numpy would, checked first."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedcca.flower.protocol import InvalidReplyError
from fedcca.flower.wire_statistics import decode_declared

F32, F16, I64 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int64)


def _decode(array: Array, shape: tuple[int, ...], allowed: tuple[np.dtype, ...] = (F32,), **kw: bool) -> np.ndarray:
    return decode_declared(array, "w", shape, allowed, InvalidReplyError, "weight", **kw)


@pytest.mark.parametrize("values", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),  # a transposed tensor, Fortran order
    np.arange(12, dtype=np.float32).reshape(4, 3).T,
    np.array(2.5, dtype=np.float32),
    np.linspace(-1, 1, 7).astype(np.float16),
    np.array([3, -4], dtype=np.int64),
])
def test_decodes_what_flower_decodes(values: np.ndarray) -> None:
    """Same dtype, shape and values as Flower's ``Array.numpy`` (numpy's loader), whatever the memory order."""
    array = Array(values)
    expected = array.numpy()
    decoded = _decode(array, values.shape, (values.dtype,))
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, values)


def test_decoded_values_are_a_writable_copy_of_their_own() -> None:
    """A merge may write into what it was handed: the reply's bytes never change."""
    array = Array(np.zeros((2, 3), dtype=np.float32))
    before = bytes(array.data)
    decoded = _decode(array, (2, 3))
    decoded += 1
    assert bytes(array.data) == before and decoded.flags.owndata


@pytest.mark.parametrize("values", [np.arange(6, dtype=np.float32).reshape(2, 3),
                                    np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))])
def test_views_are_read_only_views_of_the_bytes(values: np.ndarray) -> None:
    """Without ``copy``: the same values, in the array's own bytes, which numpy refuses to write."""
    array = Array(values)
    decoded = _decode(array, values.shape, copy=False)
    np.testing.assert_array_equal(decoded, values)
    assert not decoded.flags.writeable and np.shares_memory(decoded, np.frombuffer(array.data, dtype=np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        decoded += 1


def test_a_reader_gets_views_of_a_reply_without_a_warning() -> None:
    """``DecodedWeights(views=True)``: a reply's weights as tensors over its bytes, equal to the copies,
    and torch's warning about non-writable arrays kept from the user."""
    import warnings

    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedcca.flower.protocol import DecodedWeights, validate_reply
    from fedcca.models import build_model
    from tests.tiny_clients import train_messages

    template = build_model("cnn", num_classes=3, in_channels=1, width=0.25).state_dict()
    arrays = ArrayRecord(template)
    instruction = train_messages(arrays, [1])[0]
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}),
                    reply_to=instruction)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viewed = validate_reply(reply, template, None, decoded=DecodedWeights(views=True)).state_dict
    copied = validate_reply(reply, template, None).state_dict
    assert not caught, [str(w.message) for w in caught]
    for key, value in template.items():
        torch.testing.assert_close(viewed[key], value, rtol=0, atol=0)
        torch.testing.assert_close(copied[key], value, rtol=0, atol=0)
        data = np.frombuffer(arrays[key].data, dtype=np.uint8)
        assert np.shares_memory(viewed[key].numpy(), data) and not np.shares_memory(copied[key].numpy(), data)


def test_each_distinct_header_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies of one model repeat their headers: numpy's header parser runs once per distinct header."""
    calls = []
    parse = np.lib.format.read_array_header_1_0
    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", lambda *a, **k: calls.append(1) or parse(*a, **k))
    shape = (7, 13, 3)  # a shape no other test decodes: its header is not cached yet
    for seed in range(10):
        values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(_decode(Array(values), shape), values)
    assert len(calls) == 1


def _raw(data: bytes, shape: tuple[int, ...], dtype: str = "float32") -> Array:
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


def _npy(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def test_bytes_that_lie_are_refused_naming_the_entry() -> None:
    """Headers that disagree with the declaration, broken headers, short payloads, non-finite values."""
    good = _npy(np.ones((2, 3), np.float32))
    with pytest.raises(InvalidReplyError, match=r"weight 'w' decodes to float32 \(3, 2\)"):
        _decode(_raw(_npy(np.ones((3, 2), np.float32)), (2, 3)), (2, 3))
    with pytest.raises(InvalidReplyError, match="decodes to float64"):
        _decode(_raw(_npy(np.ones(1, np.float64)), (2,)), (2,))  # 8 bytes either way, float32 declared
    with pytest.raises(InvalidReplyError, match="weight 'w' cannot be decoded: not .npy bytes"):
        _decode(_raw(b"PK" + good[2:], (2, 3)), (2, 3))
    with pytest.raises(InvalidReplyError, match="cannot be decoded"):
        _decode(_raw(good[:-4], (2, 3)), (2, 3))  # payload cut short
    longer = bytearray(good)
    longer[8] += 16  # the header's length field claims 16 more bytes than its text
    with pytest.raises(InvalidReplyError, match="cannot be decoded"):
        _decode(_raw(bytes(longer), (2, 3)), (2, 3))
    with pytest.raises(InvalidReplyError, match="weight 'w' declares dtype float32 and shape \\(2, 3\\)"):
        _decode(_raw(good, (2, 3)), (3, 2))  # declared differently than expected: refused before decoding
    nan = np.ones((2, 3), np.float32)
    nan[1, 2] = np.nan
    with pytest.raises(InvalidReplyError, match="weight 'w' has non-finite values"):
        _decode(Array(nan), (2, 3))
    assert np.isnan(_decode(Array(nan), (2, 3), finite=False)[1, 2])


def test_object_arrays_are_never_decoded() -> None:
    """A header naming Python objects (a pickle) is refused whatever is declared."""
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidReplyError):
        _decode(_raw(pickled.getvalue(), (1,), "object"), (1,), (np.dtype(object),))
