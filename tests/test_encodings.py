"""Tensor encodings: round trips, error bounds, unbiasedness, determinism, top-k, error feedback.

Arrays come in every layout a caller may hand over (C, Fortran, strided, reversed, transposed)
and every shape class (0-d, empty, one element, ~5000 elements, multi-dimensional).
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import Literal

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as nps

from hfl_mqtt.codec import (
    NPY_STYPE,
    CodecSpec,
    Compressor,
    EncodedTensor,
    Header,
    decode_message,
    decode_tensor,
    encode_array,
    encode_message,
    npy_bytes,
    parse_spec,
)
from hfl_mqtt.codec.casts import BF16_STYPE, FP16_STYPE, to_bf16
from hfl_mqtt.codec.quantize import QUANT_STYPE, dequantize, quantize, quantized_size
from hfl_mqtt.codec.sparsify import (
    ELIAS_FANO,
    TOPK_HEADER,
    TOPK_STYPE,
    VALUE_CODES,
    decode_elias_fano,
    elias_fano_low_bits,
    encode_elias_fano,
    topk_count,
)
from hfl_mqtt.errors import CodecSpecError, EncodeError

FLOATS = ("float16", "float32", "float64")
INTS = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
BITS: tuple[Literal[1, 2, 4, 8, 16], ...] = (1, 2, 4, 8, 16)
BLOCKS = (1, 3, 7, 64, 100, 1024)
MAX_ABS = 1e6


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def roundtrip(array: np.ndarray, spec: str | CodecSpec, seed: int = 0) -> np.ndarray:
    tensor = encode_array("t", array, parse_spec(spec), rng(seed))
    decoded = decode_tensor(tensor)
    assert decoded.shape == array.shape
    assert decoded.dtype == array.dtype
    assert decoded.flags.writeable
    return decoded


# --- strategies -----------------------------------------------------------------------------------

shapes = st.one_of(
    st.sampled_from([(), (0,), (1,), (5000,), (0, 3), (3, 0, 2), (1, 1, 1), (40, 25, 3), (70, 71)]),
    nps.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
)


@st.composite
def relayout(draw: st.DrawFn, a: np.ndarray) -> np.ndarray:
    """``a`` or a view of it with another memory layout (the values the encoder sees)."""
    kind = draw(st.sampled_from(["C", "F", "strided", "reversed", "transposed"]))
    if a.ndim == 0 or kind == "C":
        return a
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        wide = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    if kind == "reversed":
        return a[::-1]
    return a.T


@st.composite
def float_arrays(
    draw: st.DrawFn, dtypes: tuple[str, ...] = FLOATS, max_abs: float = MAX_ABS
) -> np.ndarray:
    """Finite float arrays with |x| <= max_abs, drawn value by value or from a seeded RNG."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(shapes)
    size = math.prod(shape)
    bound = min(max_abs, float(np.finfo(dtype).max))
    if size <= 64 and draw(st.booleans()):
        width: Literal[16, 32, 64] = (
            16 if dtype.itemsize == 2 else 32 if dtype.itemsize == 4 else 64
        )
        elements = st.floats(-bound, bound, width=width)
        a = draw(nps.arrays(dtype, shape, elements=elements, fill=st.nothing()))
    else:
        gen = rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 1e3, 1e6]))
        kind = draw(st.sampled_from(["normal", "uniform", "spiky", "constant", "offset"]))
        if kind == "normal":
            v = gen.normal(size=shape)
        elif kind == "uniform":
            v = gen.uniform(-1, 1, size=shape)
        elif kind == "spiky":
            v = gen.normal(size=shape) * (gen.random(shape) < 0.01) * 1e3 + gen.normal(size=shape)
        elif kind == "constant":
            v = np.full(shape, gen.normal())
        else:  # a large common offset: the block range is small next to the magnitudes
            v = 1.0 + 1e-3 * gen.normal(size=shape)
        a = np.clip(v * scale, -bound, bound).astype(dtype)
    return draw(relayout(a))


@st.composite
def int_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(INTS)))
    a = draw(nps.arrays(dtype, draw(shapes)))
    return draw(relayout(a))


# --- checks ---------------------------------------------------------------------------------------


def check_quant_error(x: np.ndarray, decoded: np.ndarray, bits: int, block_size: int) -> None:
    """Every element is off by at most its block's range / (2^b - 1), plus rounding slack.

    The quantizer works in float32: it rounds the input to float32 (half an ulp), computes
    ``lo + code * scale`` in float32 (an ulp or two of the block's largest magnitude), and stores
    ``scale`` as a float32, whose own rounding, multiplied by up to 2^b - 1 levels, is at most
    about one ulp of the range, or (2^b - 1) * 2^-149 once the scale is subnormal (then it may
    even round to 0). A float16 tensor also rounds the decoded float32 to float16.
    """
    flat = np.ravel(x).astype(np.float64)
    out = np.ravel(decoded).astype(np.float64)
    n = flat.size
    if n == 0:
        return
    levels = (1 << bits) - 1
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    x32 = flat.astype(np.float32).astype(np.float64)
    padded = np.pad(x32, (0, pad), constant_values=np.nan).reshape(blocks, block_size)
    lo, hi = np.nanmin(padded, axis=1), np.nanmax(padded, axis=1)
    err = np.pad(np.abs(out - flat), (0, pad)).reshape(blocks, block_size).max(axis=1)
    maxabs = np.maximum(np.abs(lo), np.abs(hi))
    slack = 4 * np.spacing(maxabs.astype(np.float32)).astype(np.float64) + levels * 2.0**-149
    if x.dtype == np.float16:  # (float16's ulp is 32 from 32768 up to its largest, 65504)
        slack += np.spacing(np.minimum(maxabs, 32768.0).astype(np.float16)).astype(np.float64)
    bound = (hi - lo) / levels + slack
    bad = np.flatnonzero(err > bound)
    assert bad.size == 0, (
        f"block {bad[0]}: error {err[bad[0]]!r} > bound {bound[bad[0]]!r} "
        f"(range {hi[bad[0]] - lo[bad[0]]!r}, {bits} bits, block {block_size})"
    )


CAST_REL = {"fp16": 2.0**-11, "bf16": 2.0**-8}
"""Half an ulp, relative: float16 keeps 11 significant bits, bfloat16 8."""
CAST_FLOOR = {"fp16": 2.0**-25, "bf16": 2.0**-133}
"""Half the smallest subnormal, where the relative bound stops holding."""


def check_cast_error(x: np.ndarray, decoded: np.ndarray, values: str) -> None:
    xf = np.asarray(x, np.float64)
    # float64 goes through float32 first (bf16): double rounding adds 2^-24 relative.
    tol = (CAST_REL[values] + 2.0**-24) * np.abs(xf) + CAST_FLOOR[values] + 2.0**-150
    if x.dtype == np.float16:  # the decoded float32 is rounded back to float16
        tol += 2.0**-11 * np.abs(xf) * 1.01 + 2.0**-25
    err = np.abs(decoded.astype(np.float64) - xf)
    assert (err <= tol).all(), f"max excess {np.max(err - tol)!r}"


def topk_payload_indices(tensor: EncodedTensor) -> tuple[np.ndarray, int]:
    """The kept indices and value encoding code of an ``hfl.topk`` payload."""
    n, k, code, coding, low_bits, _ = TOPK_HEADER.unpack_from(tensor.data)
    assert n == tensor.numel
    if coding == ELIAS_FANO:
        body = memoryview(tensor.data)[TOPK_HEADER.size :]
        return decode_elias_fano(body, n, k, low_bits, "t")[0].astype(np.int64), code
    gaps = np.frombuffer(tensor.data, f"<u{coding}", k, TOPK_HEADER.size)
    return np.cumsum(gaps, dtype=np.int64), code


def expected_k(n: int, spec: CodecSpec) -> int:
    """ceil(fraction * n) for the decimal fraction the spec names (at least 1), or min(count, n)."""
    if spec.topk_fraction is not None:
        return min(n, max(1, math.ceil(Fraction(repr(spec.topk_fraction)) * n))) if n else 0
    assert spec.topk_count is not None
    return min(n, spec.topk_count)


# --- npy: exact for every dtype, byte order and layout --------------------------------------------


@st.composite
def any_npy_arrays(draw: st.DrawFn) -> np.ndarray:
    name = draw(st.sampled_from(FLOATS + INTS))
    dtype = np.dtype(name).newbyteorder(draw(st.sampled_from("<>=")))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=8 * dtype.itemsize)
        a = draw(nps.arrays(dtype, draw(shapes), elements=elements))
    else:
        a = draw(nps.arrays(dtype, draw(shapes)))
    return draw(relayout(a))


@given(any_npy_arrays())
def test_npy_is_exact_and_is_np_save(a: np.ndarray) -> None:
    tensor = encode_array("t", a, parse_spec("npy"), rng())
    assert tensor.stype == NPY_STYPE
    assert tensor.dtype == a.dtype.name
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    assert tensor.data == buf.getvalue() == npy_bytes(a)
    decoded = decode_tensor(tensor)
    assert decoded.dtype == np.dtype(a.dtype.name)  # native byte order
    assert decoded.shape == a.shape
    np.testing.assert_array_equal(decoded, a, strict=False)
    assert decoded.tobytes() == np.asarray(a, decoded.dtype).tobytes()  # -0.0 stays -0.0


@given(int_arrays(), st.sampled_from(["fp16", "bf16", "q1", "q8+zstd", "topk0.01+q4", "topk1"]))
def test_int_and_bool_tensors_travel_exactly_under_lossy_specs(a: np.ndarray, spec: str) -> None:
    tensor = encode_array("t", a, parse_spec(spec), rng())
    assert tensor.stype == NPY_STYPE
    decoded = decode_tensor(tensor)
    assert decoded.dtype == a.dtype
    np.testing.assert_array_equal(decoded, a, strict=True)


def test_int_tensors_bypass_error_feedback() -> None:
    comp = Compressor("topk0.01+q8", error_feedback=True, seed=0)
    counts = np.arange(1000, dtype=np.int64)
    (tensor,) = comp.encode({"counts": counts})
    assert tensor.stype == NPY_STYPE
    np.testing.assert_array_equal(decode_tensor(tensor), counts)
    assert comp.residual("counts") is None


# --- float16 / bfloat16 casts ---------------------------------------------------------------------


@pytest.mark.parametrize("values", ["fp16", "bf16"])
@given(data=st.data())
def test_casts_within_relative_precision(values: str, data: st.DataObject) -> None:
    a = data.draw(float_arrays(max_abs=6e4 if values == "fp16" else MAX_ABS))
    tensor = encode_array("t", a, parse_spec(values), rng())
    # float16 tensors travel as fp16 under bf16 too: exact, where bf16 would lose bits.
    as_fp16 = values == "fp16" or a.dtype == np.float16
    assert tensor.stype == (FP16_STYPE if as_fp16 else BF16_STYPE)
    assert len(tensor.data) == 2 * a.size
    decoded = roundtrip(a, values)
    check_cast_error(a, decoded, "fp16" if as_fp16 else values)
    if a.dtype == np.float16:
        np.testing.assert_array_equal(decoded, a)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, 1.0),
        (1.0 + 2.0**-8, 1.0),  # a tie: to the even neighbour, 1.0
        (1.0 + 3 * 2.0**-8, 1.0 + 2.0**-6),  # a tie: to the even neighbour, 1 + 2^-6
        (1.0 + 2.0**-8 + 2.0**-20, 1.0 + 2.0**-7),  # just above the tie
        (-(1.0 + 2.0**-8), -1.0),
        (3.3895313892515355e38, 3.3895313892515355e38),  # the largest bfloat16
        (2.0**-133, 2.0**-133),  # the smallest subnormal bfloat16
        (0.0, 0.0),
    ],
)
def test_bf16_rounds_to_nearest_even(value: float, expected: float) -> None:
    decoded = roundtrip(np.array([value], np.float32), "bf16")
    assert decoded[0] == np.float32(expected)


@pytest.mark.parametrize(
    ("values", "big"),
    [("fp16", 65520.0), ("fp16", 1e5), ("bf16", 3.4e38), ("bf16", 1e300)],
)
def test_casts_refuse_values_beyond_their_range(values: str, big: float) -> None:
    dtype = np.float64 if big > 3.4e38 else np.float32
    with np.errstate(over="ignore"):
        a = np.array([0.0, -big, 1.0], dtype)
    with pytest.raises(EncodeError, match="range"):
        encode_array("t", a, parse_spec(values), rng())


@pytest.mark.parametrize("spec", ["bf16", "topk2+bf16"])
def test_bf16_of_float16_travels_exactly_as_fp16(spec: str) -> None:
    # bf16 would round 65408 and above to 65536, beyond float16: receivers would refuse it.
    a = np.array([1.0, 65408.0, 65504.0], np.float16)
    decoded = decode_tensor(encode_array("t", a, parse_spec(spec), rng()))
    if spec == "bf16":
        np.testing.assert_array_equal(decoded, a)
    else:
        np.testing.assert_array_equal(decoded, [0.0, 65408.0, 65504.0])


def test_fp16_keeps_values_that_round_to_its_largest() -> None:
    decoded = roundtrip(np.array([65504.0, 65519.0, -65519.0]), "fp16")
    np.testing.assert_array_equal(decoded, [65504.0, 65504.0, -65504.0])


# --- quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@given(data=st.data())
def test_quant_error_within_one_step(bits: Literal[1, 2, 4, 8, 16], data: st.DataObject) -> None:
    block = data.draw(st.sampled_from(BLOCKS), label="block_size")
    a = data.draw(float_arrays(), label="array")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    spec = CodecSpec(values="quant", bits=bits, block_size=block)
    tensor = encode_array("t", a, spec, rng(seed))
    assert tensor.stype == QUANT_STYPE
    assert len(tensor.data) == quantized_size(a.size, bits, block)
    decoded = roundtrip(a, spec, seed)
    check_quant_error(a, decoded, bits, block)


@pytest.mark.parametrize("bits", BITS)
def test_quant_keeps_block_extremes_and_constants(bits: Literal[1, 2, 4, 8, 16]) -> None:
    # The minimum of each block is exact (code 0) and constant blocks decode exactly.
    a = np.concatenate([np.full(7, 3.25), np.linspace(-2.0, 5.0, 7), np.zeros(7)]).astype(
        np.float32
    )
    decoded = roundtrip(a, CodecSpec(values="quant", bits=bits, block_size=7))
    np.testing.assert_array_equal(decoded[:7], a[:7])
    assert decoded[7] == a[7]
    np.testing.assert_array_equal(decoded[14:], 0.0)


@pytest.mark.parametrize(("bits", "block"), [(1, 16), (2, 16), (4, 5), (8, 3), (2, 7)])
def test_quant_is_unbiased(bits: int, block: int) -> None:
    # T independent quantizations of the same block, in one call: each copy is its own block.
    draws = 2000
    x = np.random.default_rng(1).uniform(-1.0, 3.0, block).astype(np.float32)
    payload = quantize(np.tile(x, draws), bits, block, rng(2))
    decoded = dequantize(memoryview(payload), draws * block, "t").reshape(draws, block)
    scale = (float(x.max()) - float(x.min())) / ((1 << bits) - 1)
    # Each decode is off by less than one step, so its standard deviation is at most scale / 2;
    # 4 * scale / sqrt(T) is eight standard errors of the mean.
    tolerance = 4 * scale / math.sqrt(draws)
    np.testing.assert_allclose(decoded.mean(axis=0), x, rtol=0, atol=tolerance)
    # And it is not unbiased by accident of being nearly exact: single decodes do move.
    assert np.abs(decoded - x).max() > scale / 4


@pytest.mark.parametrize("spec", ["q1", "q2", "topk0.5+q1"])
def test_quant_is_unbiased_across_seeds(spec: str) -> None:
    draws = 2000
    x = np.array([-1.0, -0.3, 0.0, 0.1, 0.25, 0.7, 2.0, 0.5], np.float32)
    total = np.zeros(x.size, np.float64)
    for seed in range(draws):
        total += roundtrip(x, spec, seed)
    kept = np.ones(x.size, bool)
    if parse_spec(spec).sparse:  # the half with the largest magnitudes, always the same
        kept[np.argsort(np.abs(x))[: x.size // 2]] = False
        np.testing.assert_array_equal(total[~kept], 0.0)
    bits = parse_spec(spec).bits or 8
    scale = (x[kept].max() - x[kept].min()) / ((1 << bits) - 1)
    np.testing.assert_allclose(total[kept] / draws, x[kept], rtol=0, atol=4 * scale / draws**0.5)


def test_quant_with_a_subnormal_scale() -> None:
    # inv = 1 / scale overflows to Inf: the quantizer divides instead.
    a = np.array([0.0, 1e-40, 3e-40, 2e-40], np.float32)
    for bits in BITS:
        check_quant_error(a, roundtrip(a, f"q{bits}"), bits, 1024)


@pytest.mark.parametrize("spec", ["q8", "q16b7", "topk2+q4"])
def test_quant_refuses_a_range_beyond_float32(spec: str) -> None:
    a = np.array([-3e38, 3e38, 1.0, 2.0], np.float32)
    with pytest.raises(EncodeError, match="quantize"):
        encode_array("t", a, parse_spec(spec), rng())


# --- determinism ----------------------------------------------------------------------------------

HEADER = Header(federation="fed", sender="w1", kind="model", version=3, update_id="u1", created=1.0)


@pytest.mark.parametrize("spec", ["q1", "q4b7", "q16", "topk0.1+q2", "topk0.1+q8+zstd"])
def test_same_seed_same_bytes_different_seed_different_bytes(spec: str) -> None:
    arrays = {"w": np.random.default_rng(0).normal(size=(30, 40)), "b": np.arange(5.0)}
    first = encode_message(HEADER, arrays, f"{spec}+seed7")
    assert encode_message(HEADER, arrays, f"{spec}+seed7") == first
    assert Compressor(spec, seed=7).encode(arrays) == Compressor(f"{spec}+seed7").encode(arrays)
    assert encode_message(HEADER, arrays, f"{spec}+seed8") != first
    # A seeded link repeats its whole sequence of encodings, which differ from one another.
    one, two = Compressor(spec, seed=3), Compressor(spec, seed=3)
    sends = [one.encode(arrays) for _ in range(3)]
    assert [two.encode(arrays) for _ in range(3)] == sends
    assert sends[0] != sends[1]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
@settings(max_examples=30)
def test_distinct_seeds_give_distinct_quantizations(s1: int, s2: int) -> None:
    x = np.linspace(-1.0, 1.0, 997)
    a = encode_array("t", x, parse_spec("q1"), rng(s1)).data
    b = encode_array("t", x, parse_spec("q1"), rng(s2)).data
    assert (a == b) == (s1 == s2)  # 2^-990-ish odds of a collision


# --- top-k ----------------------------------------------------------------------------------------

TOPK_VALUES = ("npy", "fp16", "bf16", "q1", "q2", "q4", "q8", "q16", "q4b7", "q8b1")


@pytest.mark.parametrize("values", TOPK_VALUES)
@given(data=st.data())
def test_topk_keeps_exactly_the_largest(values: str, data: st.DataObject) -> None:
    amount = data.draw(
        st.one_of(
            st.sampled_from(["0.01", "0.1", "0.5", "0.999", "1", "3", "100", "100000"]),
            st.floats(0.0, 1.0, exclude_min=True, exclude_max=True).map(repr),
            st.integers(1, 6000).map(str),
        ),
        label="amount",
    )
    spec = parse_spec(f"topk{amount}+{values}")
    max_abs = 6e4 if values in ("fp16", "bf16") else MAX_ABS
    a = data.draw(float_arrays(max_abs=max_abs), label="array")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    tensor = encode_array("t", a, spec, rng(seed))
    assert tensor.stype == TOPK_STYPE
    kept, code = topk_payload_indices(tensor)
    if values == "bf16" and a.dtype == np.float16:
        values = "fp16"  # float16 values travel exactly as fp16
    assert code == VALUE_CODES["quant" if spec.values == "quant" else "raw" if values == "npy"
                               else values]  # fmt: skip
    n = a.size
    assert kept.size == expected_k(n, spec)
    assert np.all(np.diff(kept) > 0)
    assert kept.size == 0 or 0 <= kept[0] <= kept[-1] < n

    flat = a.reshape(-1)
    decoded = roundtrip(a, spec, seed)
    dense = decoded.reshape(-1)
    dropped = np.ones(n, bool)
    dropped[kept] = False
    magnitude = np.abs(flat.astype(np.float64))
    if kept.size and dropped.any():
        assert magnitude[kept].min() >= magnitude[dropped].max()
    assert (dense[dropped] == 0).all()
    if spec.values == "npy":
        np.testing.assert_array_equal(dense[kept], flat[kept])
    elif spec.values == "quant":
        assert spec.bits is not None
        check_quant_error(flat[kept], dense[kept], spec.bits, spec.block_size)
    else:
        check_cast_error(flat[kept], dense[kept], spec.values)


@pytest.mark.parametrize(
    ("n", "amount", "k"),
    [
        (100, "0.01", 1),
        (1, "0.01", 1),  # at least one element
        (30, "0.1", 3),
        (440, "0.55", 242),  # 0.55 * 440 is 242.00000000000003 in floating point
        (700, "0.14", 98),  # 0.14 * 700 is 98.00000000000001
        (101, "0.01", 2),
        (1000, "0.3", 300),
        (5, "0.999", 5),
        (0, "0.5", 0),
        (10, "3", 3),
        (10, "100", 10),
        (0, "3", 0),
    ],
)
def test_topk_count(n: int, amount: str, k: int) -> None:
    spec = parse_spec(f"topk{amount}")
    assert topk_count(n, spec.topk_fraction, spec.topk_count) == k
    kept, _ = topk_payload_indices(encode_array("t", np.arange(1.0, n + 1), spec, rng()))
    np.testing.assert_array_equal(kept, np.arange(n - k, n))


def test_topk_ties_keep_k_elements() -> None:
    a = np.ones(100, np.float32)
    kept, _ = topk_payload_indices(encode_array("t", a, parse_spec("topk0.1"), rng()))
    assert kept.size == 10
    decoded = roundtrip(a, "topk0.1")
    assert np.count_nonzero(decoded) == 10


# --- error feedback -------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["same", "random"])
@pytest.mark.parametrize(
    "spec",
    ["topk0.01+q8", "topk0.01+q2+zstd", "topk5+npy", "q2b64", "q8", "fp16", "bf16"],
)
def test_error_feedback_delivers_the_dropped_mass(inputs: str, spec: str) -> None:
    n, steps = 1000, 300
    gen = np.random.default_rng(0)
    fixed = gen.normal(size=(20, 50))
    comp = Compressor(spec, error_feedback=True, seed=1)
    sent = np.zeros_like(fixed)
    received = np.zeros_like(fixed)
    peaks = []
    for step in range(steps):
        x = fixed if inputs == "same" else gen.normal(size=fixed.shape)
        message = decode_message(encode_message(HEADER, {"w": x}, comp))
        sent += x
        received += message.arrays["w"]
        residual = comp.residual("w")
        assert residual is not None
        assert residual.shape == x.shape
        assert residual.dtype == x.dtype
        # Nothing is lost: what arrived plus what is still owed is exactly what was sent.
        np.testing.assert_allclose(received + residual, sent, rtol=0, atol=1e-11 * (step + 1))
        peaks.append(float(np.abs(residual).max()))
    # The residual stays bounded: it levels off instead of growing with the number of steps.
    # (Top-k keeps k of n elements, so an element waits at most about n/k steps.)
    k = min(n, 5) if spec == "topk5+npy" else 10 if spec.startswith("topk") else n
    assert max(peaks) <= n / k * 2 * np.abs(fixed).max() + 1.0
    assert max(peaks[steps // 2 :]) <= 1.5 * max(peaks[: steps // 2])


def test_without_error_feedback_the_dropped_mass_is_lost() -> None:
    fixed = np.random.default_rng(0).normal(size=1000)
    comp = Compressor("topk0.01+q8", seed=1)
    received = np.zeros_like(fixed)
    steps = 50
    for _ in range(steps):
        received += decode_tensor(comp.encode({"w": fixed})[0])
    assert comp.residual("w") is None
    # Only the 10 largest elements ever arrive: the other 99 % of the mass is lost for good.
    lost = np.count_nonzero(received == 0)
    assert lost == 990
    np.testing.assert_array_equal(received[received == 0], 0.0)
    assert np.linalg.norm(steps * fixed - received) > 0.9 * np.linalg.norm(steps * fixed)


def test_error_feedback_is_off_for_lossless_specs_and_reset_forgets() -> None:
    assert not Compressor("npy+zstd", error_feedback=True).error_feedback
    comp = Compressor("topk1", error_feedback=True)
    comp.encode({"w": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(comp.residual("w"), [1.0, 2.0, 0.0])
    (tensor,) = comp.encode({"w": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(decode_tensor(tensor), [0.0, 4.0, 0.0])
    np.testing.assert_array_equal(comp.residual("w"), [2.0, 0.0, 3.0])
    comp.reset()
    assert comp.residual("w") is None


@pytest.mark.parametrize("spec", ["q1b64", "topk0.1+q1", "q1+zstd"])
def test_error_feedback_refuses_one_bit_quantization(spec: str) -> None:
    # Stochastic 1-bit quantization is not contractive (its error can exceed the signal): with
    # error feedback the residual would grow geometrically.
    with pytest.raises(CodecSpecError, match="contractive"):
        Compressor(spec, error_feedback=True)
    assert not Compressor(spec).error_feedback


def test_error_feedback_restarts_when_a_shape_changes() -> None:
    comp = Compressor("topk1", error_feedback=True)
    comp.encode({"w": np.array([1.0, 2.0, 3.0])})
    (tensor,) = comp.encode({"w": np.array([[5.0, 1.0]])})
    np.testing.assert_array_equal(decode_tensor(tensor), [[5.0, 0.0]])
    np.testing.assert_array_equal(comp.residual("w"), [[0.0, 1.0]])


# --- what cannot be encoded -----------------------------------------------------------------------


def _nan_with_payload(dtype: str, bits: int) -> np.ndarray:
    uint = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}[dtype]
    return np.array([bits], uint).view(dtype)


NON_FINITE = [
    ("float32", np.array([np.nan], np.float32)),
    ("float32", np.array([-np.nan], np.float32)),
    ("float32", np.array([np.inf], np.float32)),
    ("float32", np.array([-np.inf], np.float32)),
    # NaNs whose payload has the top mantissa bits set: rounding to bfloat16 carries out of them.
    ("float32", _nan_with_payload("float32", 0x7FFFFFFF)),
    ("float32", _nan_with_payload("float32", 0xFFFFFFFF)),
    ("float32", _nan_with_payload("float32", 0x7FFF8000)),
    ("float64", _nan_with_payload("float64", 0x7FFFFFFFFFFFFFFF)),
    ("float64", _nan_with_payload("float64", 0xFFFFFFFFFFFFFFFF)),
    ("float64", np.array([np.inf])),
    ("float16", _nan_with_payload("float16", 0x7FFF)),
    ("float16", _nan_with_payload("float16", 0xFFFF)),
    ("float16", np.array([np.inf], np.float16)),
]
ALL_SPECS = ["npy", "npy+zstd", "fp16", "bf16", "q1", "q8", "q16b7", "topk0.5", "topk2+fp16",
             "topk2+bf16", "topk0.01+q8", "topk1+q4"]  # fmt: skip


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize(("dtype", "bad"), NON_FINITE)
@given(st.data())
@settings(max_examples=10)
def test_non_finite_input_is_refused(
    spec: str, dtype: str, bad: np.ndarray, data: st.DataObject
) -> None:
    a = data.draw(float_arrays(dtypes=(dtype,), max_abs=100.0).filter(lambda a: a.size > 0))
    a = np.array(a)  # a writable copy, in the same layout
    a.flat[data.draw(st.integers(0, a.size - 1))] = bad[0]
    with pytest.raises(EncodeError, match=r"NaN|Inf|range|finite"):
        encode_array("t", a, parse_spec(spec), rng())
    with pytest.raises(EncodeError):
        encode_message(HEADER, {"t": a}, spec)


def test_encode_errors_name_the_tensor() -> None:
    with pytest.raises(EncodeError, match=r"'layer1\.weight'"):
        encode_array("layer1.weight", np.array([np.nan]), parse_spec("q8"), rng())


@pytest.mark.parametrize(
    "array",
    [np.array(["a"]), np.array([1 + 2j]), np.array([object()]), np.zeros(2, "V4"),
     np.zeros(2, np.longdouble) if np.dtype(np.longdouble).itemsize > 8 else np.array(["x"])],
)  # fmt: skip
def test_non_numeric_dtypes_are_refused(array: np.ndarray) -> None:
    for spec in ("npy", "q8"):
        with pytest.raises(EncodeError, match="cannot travel"):
            encode_array("t", array, parse_spec(spec), rng())


def test_bf16_refuses_nan_payloads_directly() -> None:
    with pytest.raises(EncodeError):
        to_bf16(_nan_with_payload("float32", 0x7FFFFFFF))


# --- hfl.topk indices in Elias-Fano -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k"),
    [(1, 1), (2, 1), (7, 3), (42, 13), (1000, 1), (1000, 999), (1000, 1000), (115_210, 5_761),
     (2**20, 10_486), (2**20 + 3, 7)],
)  # fmt: skip
def test_elias_fano_round_trips_any_sorted_indices(n: int, k: int) -> None:
    gen = np.random.default_rng(n + k)
    indices = np.sort(gen.choice(n, k, replace=False))
    low_bits = elias_fano_low_bits(n, k)
    data = encode_elias_fano(indices, n, low_bits)
    decoded, size = decode_elias_fano(memoryview(data + b"rest"), n, k, low_bits, "t")
    assert size == len(data)
    np.testing.assert_array_equal(decoded, indices)
    # At most 2 + log2(n / k) bits an index, and a byte of padding each for the two parts.
    assert len(data) * 8 <= k * (2 + max(0.0, math.log2(n / k))) + 16 + 1


def test_elias_fano_beats_gaps_after_zstd_at_every_density() -> None:
    gen, n = np.random.default_rng(0), 115_210
    squeeze = zstandard.ZstdCompressor(level=1).compress
    for fraction in (0.01, 0.05, 0.2):
        indices = np.sort(gen.choice(n, int(fraction * n), replace=False))
        gaps = squeeze(np.diff(indices, prepend=0).astype("<u4").tobytes())
        elias_fano = encode_elias_fano(indices, n, elias_fano_low_bits(n, indices.size))
        assert len(elias_fano) < 0.85 * len(gaps), fraction
