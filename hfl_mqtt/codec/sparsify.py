"""Top-k sparsification (``hfl.topk``): the k largest-magnitude elements and where they are.

Indices travel sorted and gap-coded (the first as is, then each as the distance to the one
before), which zstd shrinks well; the k values travel in one of the dense encodings.
Error feedback, which keeps what was dropped on the sender, lives in ``compressor``.
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

__all__ = ["TOPK_HEADER", "TOPK_STYPE", "VALUE_CODES", "decode_topk", "encode_topk", "topk_count"]

TOPK_STYPE = "hfl.topk"
TOPK_HEADER = struct.Struct("<QQBBHI")
"""n, k, value encoding code, index width (4 or 8 bytes), reserved (0), reserved (0)."""

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
    width = 4 if n <= 0xFFFFFFFF else 8
    gaps = np.diff(indices, prepend=0).astype(f"<u{width}")
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
    header = TOPK_HEADER.pack(n, k, VALUE_CODES[values], width, 0, 0)
    return b"".join((header, gaps.tobytes(), payload))


def decode_topk(data: memoryview, n: int, dtype: np.dtype[np.generic], field: str) -> np.ndarray:
    """Dense flat array of ``dtype`` from an ``hfl.topk`` payload of ``n`` elements."""
    if len(data) < TOPK_HEADER.size:
        raise FrameError(field, "truncated hfl.topk header")
    count, k, code, width, r1, r2 = TOPK_HEADER.unpack_from(data, 0)
    if count != n:
        raise SchemaError(field, f"hfl.topk holds {count} elements, the shape says {n}")
    if k > n:
        raise SchemaError(field, f"hfl.topk k={k} exceeds the {n} elements")
    if width not in (4, 8) or r1 or r2:
        raise SchemaError(field, "hfl.topk index width must be 4 or 8, reserved bytes 0")
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
    rest = data[index_end:]
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
