"""Top-k sparsification (``hfl.topk``): the k largest-magnitude elements and where they are.

Indices travel sorted, in the Elias-Fano code: each index splits into its ``l`` low bits, stored
as they are, and its high part, stored in unary as one set bit per index in a bit vector of
``k + (n >> l)`` bits, with ``l = floor(log2(n / k))``. That is at most ``2 + log2(n / k)``
bits an index, close to the least any code can do for k positions among n (at k = 5 % of n:
6.3 bits, where u32 gaps after zstd take about 9), and numpy codes and decodes it without a
loop. Decoders also read the earlier gap coding (u32 or u64 distances to the index before).
The k values travel in one of the dense encodings. Error feedback, which keeps what was
dropped on the sender, lives in ``compressor``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from hfl_mqtt.codec.casts import from_bf16, from_fp16, to_bf16, to_fp16
from hfl_mqtt.codec.quantize import dequantize
from hfl_mqtt.errors import FrameError, SchemaError, UnsupportedError

__all__ = [
    "ELIAS_FANO",
    "TOPK_HEADER",
    "TOPK_STYPE",
    "VALUE_CODES",
    "decode_elias_fano",
    "decode_topk",
    "elias_fano_low_bits",
    "encode_elias_fano",
    "encode_topk",
    "topk_count",
]

TOPK_STYPE = "hfl.topk"
TOPK_HEADER = struct.Struct("<QQBBHI")
"""n, k, value encoding code, index coding (0: Elias-Fano; 4 or 8: gaps of that many bytes),
Elias-Fano's low bits ``l`` (0 for gaps), reserved (0)."""
ELIAS_FANO = 0
MAX_LOW_BITS = 62
"""Elias-Fano low bits at the most (a u64 index)."""

VALUE_CODES = {"raw": 0, "fp16": 1, "bf16": 2, "quant": 3}
"""How the k values are encoded; ``raw`` is the tensor's own dtype, little-endian."""


def topk_count(n: int, fraction: float | None, count: int | None) -> int:
    """How many elements of ``n`` a spec keeps: ``ceil(fraction * n)`` or ``count``, at most n."""
    if fraction is not None:
        # The decimal the spec was written with: 0.55 * 440 is 242.00000000000003 in binary.
        return min(n, max(1, math.ceil(Fraction(repr(fraction)) * n))) if n else 0
    return min(n, count or 0)


def select_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest ``|flat|``."""
    n = flat.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    idx = np.argpartition(np.abs(flat), n - k)[n - k :]
    idx.sort()
    return idx


def encode_topk(
    flat: np.ndarray,
    indices: np.ndarray,
    values: str,
    encode_values: Callable[[np.ndarray], bytes] | None = None,
) -> bytes:
    """The ``hfl.topk`` payload for ``flat[indices]`` (``indices`` sorted, unique).

    ``values`` is a key of ``VALUE_CODES``; for ``quant`` pass ``encode_values`` (it holds the
    quantizer's parameters and random state).
    """
    n, k = flat.size, indices.size
    picked = flat[indices]
    if values == "raw":
        payload = np.ascontiguousarray(picked, dtype=flat.dtype.newbyteorder("<")).tobytes()
    elif values == "fp16":
        payload = to_fp16(picked)
    elif values == "bf16":
        payload = to_bf16(picked)
    elif encode_values is not None:
        payload = encode_values(picked)
    else:
        raise ValueError("quantized top-k values need encode_values")
    low_bits = elias_fano_low_bits(n, k)
    header = TOPK_HEADER.pack(n, k, VALUE_CODES[values], ELIAS_FANO, low_bits, 0)
    return b"".join((header, encode_elias_fano(indices, n, low_bits), payload))


def elias_fano_low_bits(n: int, k: int) -> int:
    """``floor(log2(n / k))`` (0 when k is 0 or at least n): the split that makes the code
    shortest."""
    return (n // k).bit_length() - 1 if 0 < k < n else 0


def _elias_fano_sizes(n: int, k: int, low_bits: int) -> tuple[int, int]:
    """Bits of the low part and of the high part's bit vector."""
    return k * low_bits, k + (n >> low_bits) + 1


def encode_elias_fano(indices: np.ndarray, n: int, low_bits: int) -> bytes:
    """Sorted, unique ``indices`` (below n): the low bits (MSB first), then the unary high
    part, each packed and padded to whole bytes."""
    indices = indices.astype(np.uint64)
    k = indices.size
    high_size = _elias_fano_sizes(n, k, low_bits)[1]
    shifts = np.arange(low_bits - 1, -1, -1, dtype=np.uint64)
    low = ((indices[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
    high = np.zeros(high_size, np.uint8)
    high[(indices >> np.uint64(low_bits)) + np.arange(k, dtype=np.uint64)] = 1
    return np.packbits(low).tobytes() + np.packbits(high).tobytes()


def decode_elias_fano(
    data: memoryview, n: int, k: int, low_bits: int, field: str
) -> tuple[np.ndarray, int]:
    """The k indices of an Elias-Fano code at the start of ``data``, and its length in bytes.

    Raises ``DecodeError`` unless they are strictly increasing and below n.
    """
    if low_bits > MAX_LOW_BITS:
        raise SchemaError(field, f"hfl.topk Elias-Fano low bits {low_bits} exceed {MAX_LOW_BITS}")
    low_size, high_size = _elias_fano_sizes(n, k, low_bits)
    low_bytes, high_bytes = -(-low_size // 8), -(-high_size // 8)
    if low_bytes + high_bytes > len(data):
        raise FrameError(field, f"hfl.topk payload too short for {k} Elias-Fano indices")
    raw = np.frombuffer(data, np.uint8, low_bytes + high_bytes)
    high_bits = np.unpackbits(raw[low_bytes:], count=high_size)
    ones = np.flatnonzero(high_bits)
    if ones.size != k:
        raise SchemaError(
            field, f"hfl.topk Elias-Fano high part holds {ones.size} indices, not {k}"
        )
    # The i-th set bit stands at high_i + i: positions are distinct and increasing, so >= i.
    high = ones.astype(np.uint64) - np.arange(k, dtype=np.uint64)
    indices = np.left_shift(high, np.uint64(low_bits))
    if low_bits:
        bits = np.unpackbits(raw[:low_bytes], count=low_size).reshape(k, low_bits)
        weights = np.uint64(1) << np.arange(low_bits - 1, -1, -1, dtype=np.uint64)
        indices |= (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    if k > 1 and not (indices[1:] > indices[:-1]).all():
        raise SchemaError(field, "hfl.topk indices must be strictly increasing")
    if k and int(indices[-1]) >= n:
        raise SchemaError(field, f"hfl.topk index {int(indices[-1])} out of range for {n}")
    return indices, low_bytes + high_bytes


def decode_topk(data: memoryview, n: int, dtype: np.dtype[np.generic], field: str) -> np.ndarray:
    """Dense flat array of ``dtype`` from an ``hfl.topk`` payload of ``n`` elements."""
    if len(data) < TOPK_HEADER.size:
        raise FrameError(field, "truncated hfl.topk header")
    count, k, code, width, low_bits, reserved = TOPK_HEADER.unpack_from(data, 0)
    if count != n:
        raise SchemaError(field, f"hfl.topk holds {count} elements, the shape says {n}")
    if k > n:
        raise SchemaError(field, f"hfl.topk k={k} exceeds the {n} elements")
    if width not in (ELIAS_FANO, 4, 8) or reserved or (width and low_bits):
        raise SchemaError(
            field, "hfl.topk index coding must be 0 (Elias-Fano), 4 or 8, reserved bytes 0"
        )
    if width == ELIAS_FANO:
        indices, size = decode_elias_fano(data[TOPK_HEADER.size :], n, k, low_bits, field)
        return _scatter(n, dtype, indices, data[TOPK_HEADER.size + size :], k, code, field)
    indices, index_end = _gap_indices(data, n, k, width, field)
    return _scatter(n, dtype, indices, data[index_end:], k, code, field)


def _gap_indices(
    data: memoryview, n: int, k: int, width: int, field: str
) -> tuple[np.ndarray, int]:
    """The gap-coded indices after the header, and where they end."""
    index_end = TOPK_HEADER.size + k * width
    if index_end > len(data):
        raise FrameError(field, f"hfl.topk payload too short for {k} indices")
    gaps = np.frombuffer(data, f"<u{width}", k, TOPK_HEADER.size)
    if k > 1 and not gaps[1:].all():
        raise SchemaError(field, "hfl.topk indices must be strictly increasing")
    # Gaps are below 2**32 (or 2**64 with width 8, where n bounds them first): no overflow.
    if width == 8 and k and int(gaps.max()) >= n:
        raise SchemaError(field, "hfl.topk index out of range")
    indices = np.cumsum(gaps, dtype=np.uint64)
    if k and int(indices[-1]) >= n:
        raise SchemaError(field, f"hfl.topk index {int(indices[-1])} out of range for {n}")
    return indices, index_end


def _scatter(
    n: int,
    dtype: np.dtype[np.generic],
    indices: np.ndarray,
    rest: memoryview,
    k: int,
    code: int,
    field: str,
) -> np.ndarray:
    """The dense tensor: the k values (``rest``, coded as ``code``) at ``indices``."""
    if code == VALUE_CODES["raw"]:
        if len(rest) != k * dtype.itemsize:
            expected = k * dtype.itemsize
            raise FrameError(field, f"hfl.topk values are {len(rest)} bytes, expected {expected}")
        values = np.frombuffer(rest, dtype.newbyteorder("<"), k)
    elif code == VALUE_CODES["fp16"]:
        values = from_fp16(rest, k, field)
    elif code == VALUE_CODES["bf16"]:
        values = from_bf16(rest, k, field)
    elif code == VALUE_CODES["quant"]:
        values = dequantize(rest, k, field)
    else:
        raise UnsupportedError(field, f"hfl.topk value encoding {code} is unknown")
    dense = np.zeros(n, dtype)
    with np.errstate(over="ignore"):  # to float16: overflow gives Inf, refused by the caller
        dense[indices] = values
    return dense
