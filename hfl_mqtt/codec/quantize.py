"""Stochastic uniform quantization to b bits with block-wise scales, bit-packed (``hfl.quant``).

Each block of ``block_size`` consecutive elements (C order) keeps its minimum ``lo`` and a step
``scale = (max - lo) / (2^b - 1)``. An element becomes the code ``floor((x - lo) / scale + u)``
with ``u`` uniform in [0, 1), so the decoded ``lo + code * scale`` equals ``x`` in expectation
and is off by less than one step. Codes are packed little-endian, LSB first, with no padding
between blocks.

The work runs over slices of about 64k elements so every pass stays in the CPU cache; that and
doing each step in place is what makes this run near memory speed.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterator

import numpy as np

from hfl_mqtt.codec.spec import QUANT_BITS
from hfl_mqtt.errors import EncodeError, FrameError, SchemaError, UnsupportedError

__all__ = ["QUANT_HEADER", "QUANT_STYPE", "dequantize", "quantize", "quantized_size"]

QUANT_STYPE = "hfl.quant"
QUANT_HEADER = struct.Struct("<BBHIQ")
"""bits, reserved (0), reserved (0), block_size, element count."""

_SLICE = 1 << 16
_F32 = np.dtype(np.float32)


def quantized_size(n: int, bits: int, block_size: int) -> int:
    """Bytes of an ``hfl.quant`` payload for ``n`` elements."""
    blocks = -(-n // block_size)
    return QUANT_HEADER.size + 8 * blocks + -(-n * bits // 8)


@functools.lru_cache(maxsize=64)
def _slice_len(block_size: int) -> int:
    # Whole blocks, and whole bytes of packed codes, in every slice but the last.
    unit = math.lcm(block_size, 8)
    return unit * max(1, _SLICE // unit)


def _slices(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _row_spans(start: int, m: int, block_size: int) -> Iterator[tuple[int, int, int, int]]:
    """Within a slice of ``m`` elements at ``start``: the run of whole blocks, then the last,
    shorter block if there is one, as (begin, end, rows, index of the first block)."""
    full = m // block_size * block_size
    first = start // block_size
    if full:
        yield 0, full, full // block_size, first
    if full < m:
        yield full, m, 1, first + full // block_size


def _code_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    return np.dtype("<u2") if bits == 16 else np.dtype(np.uint8)


def quantize(x: np.ndarray, bits: int, block_size: int, rng: np.random.Generator) -> bytes:
    """Encode the elements of ``x`` (any float dtype, any layout) as an ``hfl.quant`` payload."""
    if bits not in QUANT_BITS:
        raise EncodeError(f"cannot quantize to {bits} bits (choose from {QUANT_BITS})")
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    n = flat.size
    blocks = -(-n // block_size)
    levels = (1 << bits) - 1
    out = bytearray(quantized_size(n, bits, block_size))
    QUANT_HEADER.pack_into(out, 0, bits, 0, 0, block_size, n)
    lo = np.frombuffer(out, _F32, blocks, QUANT_HEADER.size)
    scale = np.frombuffer(out, _F32, blocks, QUANT_HEADER.size + 4 * blocks)
    packed = np.frombuffer(out, np.uint8, offset=QUANT_HEADER.size + 8 * blocks)

    step = _slice_len(block_size)
    work = np.empty(min(step, n), _F32)
    noise = np.empty(min(step, n), _F32)
    codes = np.empty(min(step, n), _code_dtype(bits))
    for start, stop in _slices(n, step):
        m = stop - start
        for a, b, rows, block in _row_spans(start, m, block_size):
            _quantize_rows(
                flat[start + a : start + b].reshape(rows, -1),
                lo[block : block + rows],
                scale[block : block + rows],
                work[a:b].reshape(rows, -1),
                noise[a:b].reshape(rows, -1),
                codes[a:b].reshape(rows, -1),
                levels,
                rng,
            )
        _pack(codes[:m], bits, packed[start * bits // 8 : -(-stop * bits // 8)])
    with np.errstate(over="ignore"):
        if not np.isfinite(lo + scale * np.float32(levels)).all():
            raise EncodeError("cannot quantize: a block's top rounds beyond float32")
    return bytes(out)


def _quantize_rows(
    x: np.ndarray,
    lo: np.ndarray,
    scale: np.ndarray,
    work: np.ndarray,
    noise: np.ndarray,
    codes: np.ndarray,
    levels: int,
    rng: np.random.Generator,
) -> None:
    """Quantize whole blocks (one per row) into ``codes``, writing ``lo`` and ``scale``."""
    np.min(x, axis=1, out=lo)
    with np.errstate(over="ignore", invalid="ignore"):
        np.subtract(x.max(axis=1), lo, out=scale)
    if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
        raise EncodeError("cannot quantize NaN, Inf, or a block whose range exceeds float32")
    scale *= np.float32(1.0 / levels)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(1.0) / scale
        np.subtract(x, lo[:, None], out=work)
        work *= inv[:, None]
        if not np.isfinite(inv).all():
            # Constant blocks (scale 0) encode as code 0; subnormal scales need a true divide.
            flat_rows = scale == 0
            tiny_rows = ~flat_rows & ~np.isfinite(inv)
            work[flat_rows] = 0
            if tiny_rows.any():
                work[tiny_rows] = (x[tiny_rows] - lo[tiny_rows, None]) / scale[tiny_rows, None]
    rng.random(out=noise, dtype=np.float32)
    work += noise
    np.minimum(work, np.float32(levels), out=work)
    np.copyto(codes, work, casting="unsafe")


def _pack(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    if bits >= 8:
        out[:] = codes.view(np.uint8)
        return
    per = 8 // bits
    padded = codes
    if codes.size % per:
        padded = np.zeros(-(-codes.size // per) * per, np.uint8)
        padded[: codes.size] = codes
    if bits == 1:
        out[:] = np.packbits(padded, bitorder="little")
        return
    np.copyto(out, padded[0::per])
    shifted = np.empty_like(out)
    for k in range(1, per):
        np.left_shift(padded[k::per], k * bits, out=shifted)
        out |= shifted


def _unpack(packed: np.ndarray, bits: int, count: int, out: np.ndarray) -> np.ndarray:
    if bits >= 8:
        return packed.view(_code_dtype(bits))[:count]
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    codes = out[: packed.size * per]
    for k in range(per):
        lane = codes[k::per]
        np.right_shift(packed, k * bits, out=lane)
        lane &= mask
    return codes[:count]


def dequantize(data: memoryview, n: int, field: str) -> np.ndarray:
    """Decode an ``hfl.quant`` payload of ``n`` elements to a flat float32 array."""
    if len(data) < QUANT_HEADER.size:
        raise FrameError(field, "truncated hfl.quant header")
    bits, r1, r2, block_size, count = QUANT_HEADER.unpack_from(data, 0)
    if bits not in QUANT_BITS:
        raise UnsupportedError(field, f"hfl.quant bits {bits} is not one of {QUANT_BITS}")
    if r1 or r2:
        raise SchemaError(field, "hfl.quant reserved bytes must be 0")
    if block_size < 1:
        raise SchemaError(field, "hfl.quant block_size must be >= 1")
    if count != n:
        raise SchemaError(field, f"hfl.quant holds {count} elements, the shape says {n}")
    expected = quantized_size(n, bits, block_size)
    if len(data) != expected:
        raise FrameError(field, f"hfl.quant payload is {len(data)} bytes, expected {expected}")
    blocks = -(-n // block_size)
    levels = (1 << bits) - 1
    lo = np.frombuffer(data, "<f4", blocks, QUANT_HEADER.size)
    scale = np.frombuffer(data, "<f4", blocks, QUANT_HEADER.size + 4 * blocks)
    packed = np.frombuffer(data, np.uint8, offset=QUANT_HEADER.size + 8 * blocks)
    with np.errstate(over="ignore", invalid="ignore"):
        top = lo + scale * np.float32(levels)
    # A NaN or Inf in lo or scale makes top NaN or Inf too, so one check covers all three.
    if not np.isfinite(top).all():
        raise SchemaError(field, "hfl.quant lo and scale must be finite, with a finite top")
    if (scale < 0).any():
        raise SchemaError(field, "hfl.quant scale must be >= 0")

    out = np.empty(n, _F32)
    step = _slice_len(block_size)
    scratch = np.empty(min(step, n) + 8, np.uint8)
    if n <= step and n % block_size == 0:  # one slice of whole blocks: the common small tensor
        codes = _unpack(packed, bits, n, scratch).reshape(blocks, block_size)
        rows_out = out.reshape(blocks, block_size)
        np.multiply(codes, scale[:, None], rows_out)
        rows_out += lo[:, None]
        return out
    for start, stop in _slices(n, step):
        m = stop - start
        codes = _unpack(packed[start * bits // 8 : -(-stop * bits // 8)], bits, m, scratch)
        for a, b, rows, block in _row_spans(start, m, block_size):
            rows_out = out[start + a : start + b].reshape(rows, -1)
            np.multiply(codes[a:b].reshape(rows, -1), scale[block : block + rows, None], rows_out)
            rows_out += lo[block : block + rows, None]
    return out
