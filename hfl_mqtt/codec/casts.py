"""Half-precision casts: ``hfl.fp16`` (IEEE binary16) and ``hfl.bf16`` (bfloat16).

Both payloads are the raw 2-byte little-endian values in C order, nothing else. bfloat16 is the
upper half of a float32, rounded to nearest even: the float32 range at 8 bits of precision.
"""

from __future__ import annotations

import numpy as np

from hfl_mqtt.errors import EncodeError, FrameError

__all__ = ["BF16_STYPE", "FP16_STYPE", "from_bf16", "from_fp16", "to_bf16", "to_fp16"]

FP16_STYPE = "hfl.fp16"
BF16_STYPE = "hfl.bf16"


def to_fp16(x: np.ndarray) -> bytes:
    """``x`` as little-endian float16; values beyond float16's range are refused."""
    # Checked on the input: min/max are fast and NaN fails both comparisons. 65520 is where
    # rounding to float16 reaches Inf; numpy's isfinite on float16 is ten times slower.
    if x.size and not (float(x.min()) > -65520.0 and float(x.max()) < 65520.0):
        raise EncodeError("value outside float16's range (|x| > 65504) or not finite")
    return np.ascontiguousarray(x, dtype="<f2").tobytes()


def to_bf16(x: np.ndarray) -> bytes:
    """``x`` as little-endian bfloat16, rounded to nearest even."""
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused next
        wide = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if not np.isfinite(wide).all():
        raise EncodeError("value not finite or beyond float32's range")
    bits = wide.view(np.uint32)
    # Round to nearest even on the 16 bits that are dropped.
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    upper = (rounded >> np.uint32(16)).astype("<u2")
    if ((upper & np.uint16(0x7F80)) == np.uint16(0x7F80)).any():
        raise EncodeError("value rounds beyond bfloat16's range")
    return upper.tobytes()


def _check_len(data: memoryview, n: int, field: str, name: str) -> None:
    if len(data) != 2 * n:
        raise FrameError(field, f"{name} payload is {len(data)} bytes, expected {2 * n}")


def from_fp16(data: memoryview, n: int, field: str) -> np.ndarray:
    """Flat float32 array from an ``hfl.fp16`` payload of ``n`` elements."""
    _check_len(data, n, field, FP16_STYPE)
    return np.frombuffer(data, "<f2", n).astype(np.float32)


def from_bf16(data: memoryview, n: int, field: str) -> np.ndarray:
    """Flat float32 array from an ``hfl.bf16`` payload of ``n`` elements."""
    _check_len(data, n, field, BF16_STYPE)
    wide = np.frombuffer(data, "<u2", n).astype(np.uint32)
    wide <<= np.uint32(16)
    return wide.view(np.float32)
