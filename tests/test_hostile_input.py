"""Hostile input: whatever the bytes, ``decode_message`` raises a ``DecodeError`` naming a field.

Starting from a few valid messages, this feeds the decoder random bytes, every truncation, bit
flips, mutated fields (re-framed with a correct digest so they reach the deeper checks), forged
tensor payloads and zstd bombs. A decode either fails with a ``DecodeError`` (quickly, and
without large allocations) or succeeds with a well-formed result.
"""

from __future__ import annotations

import copy
import math
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hfl_mqtt.codec import (
    DecodeLimits,
    Header,
    Message,
    decode_envelope,
    decode_message,
    encode_message,
    npy_bytes,
)
from hfl_mqtt.codec.digest import digest
from hfl_mqtt.codec.envelope import FLAG_ZSTD, FRAME, FRAME_MAGIC
from hfl_mqtt.codec.sparsify import decode_elias_fano
from hfl_mqtt.errors import (
    DecodeError,
    DigestMismatchError,
    FrameError,
    NonFiniteError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)

HEADER = Header(
    federation="fed",
    sender="edge-1",
    kind="delta",
    version=5,
    base_version=4,
    num_examples=10,
    metrics={"loss": 0.5, "ok": True, "n": 3, "s": "x"},
    update_id="u-1",
    created=1.0,
)
_gen = np.random.default_rng(0)
ARRAYS: dict[str, np.ndarray] = {
    "w": _gen.normal(size=(6, 7)).astype(np.float32),
    "b": _gen.normal(size=5),
    "h": _gen.normal(size=(3, 2)).astype(np.float16),
    "n": np.array([1, -2, 3, 4], np.int32),
    "m": np.array([True, False, True]),
}
SPECS = ["npy", "q8+zstd", "topk0.3+q4", "fp16", "bf16+zstd", "topk0.5+npy"]
MESSAGES = {spec: encode_message(HEADER, ARRAYS, f"{spec}+seed1") for spec in SPECS}
TIME_LIMIT = 2.0  # seconds for one decode; generous for a shared, noisy machine


# --- helpers --------------------------------------------------------------------------------------


def check_error(exc: DecodeError) -> None:
    assert isinstance(exc.field, str)
    assert exc.field.strip(), f"{type(exc).__name__} names no field: {exc}"
    assert exc.reason


def rejected(data: bytes | bytearray, **kwargs: Any) -> DecodeError:
    """Assert ``data`` is refused with a ``DecodeError`` that names a field; return it."""
    start = time.perf_counter()
    with pytest.raises(DecodeError) as info:
        decode_message(bytes(data), **kwargs)
    assert time.perf_counter() - start < TIME_LIMIT
    check_error(info.value)
    return info.value


def decode_or_reject(data: bytes | bytearray) -> Message | None:
    """Decode ``data``; a ``DecodeError`` is fine, any other exception fails the test.

    A message that does decode must be well formed: every array has the dtype and shape its
    record declares, and float arrays hold no NaN or Inf.
    """
    data = bytes(data)
    start = time.perf_counter()
    try:
        message = decode_message(data)
    except DecodeError as exc:
        check_error(exc)
        return None
    finally:
        assert time.perf_counter() - start < TIME_LIMIT
    records = decode_envelope(data).tensors
    assert list(message.arrays) == [t.name for t in records]
    for t in records:
        array = message.arrays[t.name]
        assert array.dtype == np.dtype(t.dtype)
        assert array.shape == t.shape
        if array.dtype.kind == "f":
            assert np.isfinite(array).all()
    return message


def frame(body: bytes, *, zstd: bool = False, raw_size: int | None = None) -> bytes:
    """Frame ``body`` with correct sizes and digest (``raw_size`` overrides the prefix field)."""
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(body) if zstd else body
    size = len(body) if raw_size is None else raw_size
    flags = FLAG_ZSTD if zstd else 0
    return FRAME.pack(FRAME_MAGIC, 1, flags, 0, size, len(stored), digest(stored)) + stored


def frame_stored(stored: bytes, raw_size: int, flags: int = FLAG_ZSTD) -> bytes:
    """Frame an already stored (compressed) body as is."""
    return FRAME.pack(FRAME_MAGIC, 1, flags, 0, raw_size, len(stored), digest(stored)) + stored


def raw_body(data: bytes) -> bytes:
    _, _, flags, _, _, _, _ = FRAME.unpack_from(data)
    stored = data[FRAME.size :]
    return zstandard.ZstdDecompressor().decompress(stored) if flags & FLAG_ZSTD else stored


def body_of(spec: str) -> dict[str, Any]:
    """A fresh, mutable copy of the body of message ``spec``."""
    obj: dict[str, Any] = msgpack.unpackb(raw_body(MESSAGES[spec]), raw=False)
    return obj


def pack(obj: object, *, zstd: bool = False) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True), zstd=zstd)


def record(body: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [t for t in body["tensors"] if t["name"] == name]
    assert len(found) == 1
    return found[0]


def is_zstd(spec: str) -> bool:
    return "zstd" in spec


def test_the_messages_are_valid() -> None:
    for spec, data in MESSAGES.items():
        message = decode_or_reject(data)
        assert message is not None, spec
        assert message.header.federation == "fed"
        # Re-framing an unchanged body gives a valid message too (the helpers are sound).
        assert decode_or_reject(pack(body_of(spec), zstd=is_zstd(spec))) is not None


# --- random bytes, truncation, bit flips ----------------------------------------------------------


@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    rejected(data)


@given(st.binary(max_size=512), st.sampled_from([0, FLAG_ZSTD]), st.integers(0, 2**64 - 1))
def test_random_bodies_with_a_correct_frame(body: bytes, flags: int, raw_size: int) -> None:
    for size in (len(body), raw_size):
        rejected(frame_stored(body, size, flags))


@given(st.sampled_from(SPECS), st.binary(min_size=1, max_size=64), st.integers(0, 10_000))
def test_random_bytes_spliced_into_a_message(spec: str, junk: bytes, at: int) -> None:
    data = MESSAGES[spec]
    at %= len(data)
    rejected(data[:at] + junk + data[at:])
    overwritten = data[:at] + junk + data[at + len(junk) :]
    if len(overwritten) == len(data) and decode_or_reject(overwritten) is not None:
        assert overwritten == data  # only the same bytes may decode


@pytest.mark.parametrize("spec", SPECS)
def test_every_truncation(spec: str) -> None:
    data = MESSAGES[spec]
    for length in range(len(data)):
        rejected(data[:length])
    rejected(data + b"\x00")


@pytest.mark.parametrize("spec", SPECS)
def test_every_truncation_of_every_payload(spec: str) -> None:
    # Re-framed with a correct digest, so the tensor decoders see the short payloads.
    for name in ARRAYS:
        payload = record(body_of(spec), name)["data"]
        lengths = range(len(payload)) if len(payload) < 400 else range(0, len(payload), 7)
        for length in lengths:
            body = body_of(spec)
            record(body, name)["data"] = payload[:length]
            rejected(pack(body))
        body = body_of(spec)
        record(body, name)["data"] = payload + b"\x00"
        rejected(pack(body))


@pytest.mark.parametrize("spec", SPECS)
def test_every_single_bit_flip_is_caught(spec: str) -> None:
    data = MESSAGES[spec]
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        exc = rejected(flipped)
        if bit >= 8 * 24:  # digest or body: only the digest can notice
            assert isinstance(exc, DigestMismatchError)


@settings(max_examples=300)
@given(st.sampled_from(SPECS), st.lists(st.integers(0, 2**32), min_size=1, max_size=3))
def test_bit_flips_in_the_body_behind_a_correct_digest(spec: str, bits: list[int]) -> None:
    # The flipped body is re-digested: the flips reach the msgpack parser and the payloads.
    body = bytearray(raw_body(MESSAGES[spec]))
    for bit in bits:
        body[(bit // 8) % len(body)] ^= 1 << (bit % 8)
    decode_or_reject(frame(bytes(body)))
    decode_or_reject(frame(bytes(body), zstd=True))


@settings(max_examples=100)
@given(st.sampled_from([s for s in SPECS if is_zstd(s)]), st.integers(0, 2**32))
def test_bit_flips_in_a_zstd_frame_behind_a_correct_digest(spec: str, bit: int) -> None:
    data = MESSAGES[spec]
    raw_size = FRAME.unpack_from(data)[4]
    stored = bytearray(data[FRAME.size :])
    stored[(bit // 8) % len(stored)] ^= 1 << (bit % 8)
    decode_or_reject(frame_stored(bytes(stored), raw_size))


# --- mutated fields, re-framed --------------------------------------------------------------------

NAN = math.nan
HEADER_MUTATIONS: list[tuple[str, object, bool]] = [
    # (field, value, still valid?)
    ("federation", "a/b", False),
    ("federation", "", False),
    ("federation", "x" * 129, False),
    ("federation", "x" * 128, True),
    ("federation", "a b", False),
    ("federation", "ab\n", False),
    ("federation", "+", False),
    ("federation", b"fed", False),
    ("federation", 5, False),
    ("federation", None, False),
    ("federation", ["fed"], False),
    ("sender", "#", False),
    ("sender", "edge/1", False),
    ("sender", "édge", False),
    ("sender", {"a": 1}, False),
    ("kind", "model", True),
    ("kind", "update", False),
    ("kind", "DELTA", False),
    ("kind", 1, False),
    ("kind", None, False),
    ("version", 0, True),
    ("version", 2**64 - 1, True),
    ("version", -1, False),
    ("version", -(2**63), False),
    ("version", 5.0, False),
    ("version", True, False),
    ("version", "5", False),
    ("version", None, False),
    ("version", [5], False),
    ("base_version", 0, True),
    ("base_version", None, False),  # a delta needs it
    ("base_version", -1, False),
    ("base_version", 4.5, False),
    ("base_version", False, False),
    ("num_examples", 2**53, True),
    ("num_examples", 2**53 + 1, False),  # would own FedAvg weights and overflow sums
    ("num_examples", -1, False),
    ("num_examples", 1e3, False),
    ("num_examples", b"\x01", False),
    ("metrics", {}, True),
    ("metrics", {"a": -3, "b": 0.5, "c": False, "d": "é"}, True),
    ("metrics", [], False),
    ("metrics", None, False),
    ("metrics", {"a": None}, False),
    ("metrics", {"a": [1]}, False),
    ("metrics", {"a": {"b": 1}}, False),
    ("metrics", {"a": b"x"}, False),
    ("metrics", {"a": NAN}, False),
    ("metrics", {"a": math.inf}, False),
    ("metrics", {str(i): i for i in range(256)}, True),
    ("metrics", {str(i): i for i in range(257)}, False),
    ("metrics", {str(i): i for i in range(5000)}, False),
    ("codec", "anything at all", True),
    ("codec", "x" * 257, False),
    ("codec", 7, False),
    ("codec", None, False),
    ("update_id", "", False),
    ("update_id", "x" * 129, False),
    ("update_id", 5, False),
    ("update_id", b"u-1", False),
    ("created", 5, True),
    ("created", -1.5, True),
    ("created", "now", False),
    ("created", NAN, False),
    ("created", -math.inf, False),
    ("created", None, False),
    ("created", True, False),
]


@pytest.mark.parametrize("zstd", [False, True])
@pytest.mark.parametrize(("field", "value", "valid"), HEADER_MUTATIONS)
def test_header_field_mutations(field: str, value: object, valid: bool, zstd: bool) -> None:
    body = body_of("npy")
    body["header"][field] = value
    data = pack(body, zstd=zstd)
    if valid:
        message = decode_or_reject(data)
        assert message is not None
        assert getattr(message.header, field) == value
        return
    exc = rejected(data)
    assert isinstance(exc, SchemaError | SizeLimitError)
    assert exc.field.startswith(("header", "body"))


@pytest.mark.parametrize("field", list(Header.model_fields))
def test_every_header_field_is_required_on_the_wire(field: str) -> None:
    body = body_of("q8+zstd")
    del body["header"][field]
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert exc.field == f"header.{field}"


@pytest.mark.parametrize("value", [None, [], "header", 5, b"x", [["nested"] * 3] * 3])
def test_header_not_a_map(value: object) -> None:
    body = body_of("npy")
    body["header"] = value
    assert isinstance(rejected(pack(body)), SchemaError)


def test_an_extra_header_field() -> None:
    body = body_of("npy")
    body["header"]["priority"] = 1
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert "priority" in exc.field


TENSOR_MUTATIONS: list[tuple[str, object, type[DecodeError]]] = [
    ("name", "", SchemaError),
    ("name", "x" * 257, SchemaError),
    ("name", 5, SchemaError),
    ("name", None, SchemaError),
    ("name", b"w", SchemaError),
    ("stype", "hfl.foo", UnsupportedError),
    ("stype", "", UnsupportedError),
    ("stype", None, UnsupportedError),
    ("stype", 3, UnsupportedError),
    ("stype", "NUMPY.NDARRAY", UnsupportedError),
    ("stype", ["numpy.ndarray"], UnsupportedError),
    ("dtype", "object", UnsupportedError),
    ("dtype", "<U10", UnsupportedError),
    ("dtype", "O", UnsupportedError),
    ("dtype", "float128", UnsupportedError),
    ("dtype", "complex64", UnsupportedError),
    ("dtype", "V8", UnsupportedError),
    ("dtype", "<f4", UnsupportedError),
    ("dtype", "f4", UnsupportedError),
    ("dtype", "str", UnsupportedError),
    ("dtype", None, UnsupportedError),
    ("dtype", 3, UnsupportedError),
    ("shape", [-1], SchemaError),
    ("shape", [6, -7], SchemaError),
    ("shape", [-(2**63)], SchemaError),
    ("shape", [2**40], SizeLimitError),
    ("shape", [2**63], SizeLimitError),
    ("shape", [2**64 - 1], SizeLimitError),
    ("shape", [2**32, 2**32], SizeLimitError),
    ("shape", [0, 2**40, 2**40], SizeLimitError),
    ("shape", [2**64 - 1, 0], SizeLimitError),
    ("shape", [6.0, 7.0], SchemaError),
    ("shape", [True, 7], SchemaError),
    ("shape", ["6", "7"], SchemaError),
    ("shape", [[6], [7]], SchemaError),
    ("shape", [None], SchemaError),
    ("shape", None, SchemaError),
    ("shape", "6,7", SchemaError),
    ("shape", 42, SchemaError),
    ("shape", {"0": 6}, SchemaError),
    ("shape", [1] * 33, SchemaError),
    ("data", "text", SchemaError),
    ("data", None, SchemaError),
    ("data", [1, 2, 3], SchemaError),
    ("data", 0, SchemaError),
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("key", "value", "error"), TENSOR_MUTATIONS)
def test_tensor_field_mutations(
    spec: str, key: str, value: object, error: type[DecodeError]
) -> None:
    body = body_of(spec)
    record(body, "w")[key] = value
    exc = rejected(pack(body))
    assert isinstance(exc, error), exc
    assert exc.field.startswith("tensors")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("shape", [7, 6]),  # same element count
        ("shape", [42]),
        ("shape", []),
        ("shape", [6, 7, 1]),
        ("shape", [0]),
        ("dtype", "float64"),
        ("dtype", "float16"),
        ("dtype", "int32"),
        ("dtype", "uint8"),
        ("dtype", "bool"),
        ("stype", "numpy.ndarray"),
        ("stype", "hfl.fp16"),
        ("stype", "hfl.bf16"),
        ("stype", "hfl.quant"),
        ("stype", "hfl.topk"),
        ("data", b""),
        ("data", b"\x00" * 168),
        ("data", bytes(range(256)) * 3),
    ],
)
def test_tensor_fields_swapped_for_other_valid_values(spec: str, key: str, value: object) -> None:
    # Some of these still decode (fp16 bytes read as bf16, say); the result must be well formed.
    body = body_of(spec)
    record(body, "w")[key] = value
    decode_or_reject(pack(body))


@pytest.mark.parametrize("spec", ["npy", "topk0.3+q4"])
def test_tensor_data_of_another_tensor(spec: str) -> None:
    body = body_of(spec)
    record(body, "w")["data"] = record(body, "b")["data"]
    rejected(pack(body))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.pop("data"),
        lambda r: r.pop("name"),
        lambda r: r.update(extra=1),
        lambda r: r.update(Name="w"),
        lambda r: r.clear(),
    ],
    ids=["missing data", "missing name", "extra key", "renamed key", "empty map"],
)
def test_tensor_record_keys(mutate: Callable[[dict[str, Any]], object]) -> None:
    body = body_of("q8+zstd")
    mutate(record(body, "b"))
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert exc.field == "tensors[1]"


@pytest.mark.parametrize("value", [None, [], "w", 5, b"\x00", [[[]]]])
def test_tensor_record_not_a_map(value: object) -> None:
    body = body_of("npy")
    body["tensors"][2] = value
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert exc.field == "tensors[2]"


def test_duplicate_tensor_names() -> None:
    body = body_of("fp16")
    body["tensors"][1]["name"] = body["tensors"][0]["name"]
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert exc.field == "tensors"


@pytest.mark.parametrize(
    ("value", "error"),
    [(2, UnsupportedError), (0, UnsupportedError), (-1, UnsupportedError),
     (2**64 - 1, UnsupportedError), ("1", UnsupportedError), (1.0, UnsupportedError),
     (True, UnsupportedError), (None, UnsupportedError), ([1], UnsupportedError)],
)  # fmt: skip
def test_envelope_version(value: object, error: type[DecodeError]) -> None:
    body = body_of("npy")
    body["v"] = value
    exc = rejected(pack(body))
    assert isinstance(exc, error)
    assert exc.field == "body.v"


@pytest.mark.parametrize(
    "make",
    [
        lambda b: {k: v for k, v in b.items() if k != "v"},
        lambda b: {k: v for k, v in b.items() if k != "header"},
        lambda b: {k: v for k, v in b.items() if k != "tensors"},
        lambda b: b | {"extra": 1},
        lambda b: {},
        lambda b: list(b.values()),
        lambda b: None,
        lambda b: 1,
        lambda b: "body",
        lambda b: b"body",
        lambda b: b | {"tensors": {}},
        lambda b: b | {"tensors": "w"},
        lambda b: b | {"tensors": None},
        lambda b: {"V": 1, "header": b["header"], "tensors": b["tensors"]},
        lambda b: {b"v": 1, "header": b["header"], "tensors": b["tensors"]},
    ],
)
def test_top_level_shape_of_the_body(make: Callable[[dict[str, Any]], object]) -> None:
    exc = rejected(pack(make(body_of("npy"))))
    assert isinstance(exc, SchemaError)


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deeply_nested_garbage(depth: int) -> None:
    nested = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    body = body_of("npy")
    for where in ("header", "tensors", "v"):
        prefix = msgpack.packb({**body, where: None}, use_bin_type=True)
        # Replace the nil written for `where` by the nested arrays.
        key = msgpack.packb(where)
        at = prefix.index(key + b"\xc0") + len(key)
        rejected(frame(prefix[:at] + nested + prefix[at + 1 :]))
    rejected(frame(nested))
    rejected(frame(b"\x81\xa1a" * depth + b"\xc0"))  # {"a": {"a": ...}}


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=300)
@given(st.sampled_from(SPECS), st.data(), msgpack_values)
def test_garbage_anywhere_in_the_body(spec: str, data: st.DataObject, garbage: object) -> None:
    body = body_of(spec)
    where = data.draw(st.sampled_from(["body", "v", "header", "header.*", "tensors", "tensors.*",
                                       "tensors.*.*", "tensors.append"]))  # fmt: skip
    if where == "body":
        body = garbage  # type: ignore[assignment]
    elif where in ("v", "header", "tensors"):
        body[where] = garbage
    elif where == "header.*":
        body["header"][data.draw(st.sampled_from(list(Header.model_fields)))] = garbage
    elif where == "tensors.append":
        body["tensors"].append(garbage)
    else:
        i = data.draw(st.integers(0, len(body["tensors"]) - 1))
        if where == "tensors.*":
            body["tensors"][i] = garbage
        else:
            key = data.draw(st.sampled_from(["name", "stype", "dtype", "shape", "data"]))
            body["tensors"][i][key] = garbage
    decode_or_reject(pack(body, zstd=data.draw(st.booleans())))


# --- forged payloads ------------------------------------------------------------------------------

QUANT = struct.Struct("<BBHIQ")
TOPK = struct.Struct("<QQBBHI")


def forge(spec: str, name: str, change: Callable[[bytearray], bytes | bytearray | None]) -> bytes:
    """The message ``spec`` with tensor ``name``'s payload changed in place (or replaced)."""
    body = body_of(spec)
    payload = bytearray(record(body, name)["data"])
    replaced = change(payload)
    record(body, name)["data"] = bytes(payload if replaced is None else replaced)
    return pack(body, zstd=is_zstd(spec))


def quant_blocks(p: bytearray, offset: int = 0) -> int:
    _, _, _, block, n = QUANT.unpack_from(p, offset)
    return int(-(-n // block))


def set_scale(value: float, block: int = 0, offset: int = 0) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        struct.pack_into("<f", p, offset + 16 + 4 * quant_blocks(p, offset) + 4 * block, value)

    return change


def set_lo(value: float, block: int = 0, offset: int = 0) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        struct.pack_into("<f", p, offset + 16 + 4 * block, value)

    return change


def both(*changes: Callable[[bytearray], None]) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        for c in changes:
            c(p)

    return change


def pack_at(fmt: str, offset: int, *values: int) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        struct.pack_into(fmt, p, offset, *values)

    return change


def topk_fields(p: bytearray) -> tuple[int, int, int, int]:
    n, k, code, width, _, _ = TOPK.unpack_from(p)
    return n, k, code, width


def set_gap(i: int, value: int) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        width = topk_fields(p)[3]
        struct.pack_into("<I" if width == 4 else "<Q", p, 24 + width * i, value)

    return change


def set_last_gap(value: int) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        set_gap(topk_fields(p)[1] - 1, value)(p)

    return change


def widen_indices(last_gap: int) -> Callable[[bytearray], bytes]:
    """Rewrite the gaps as u64 (index width 8) and set the last one."""

    def change(p: bytearray) -> bytes:
        n, k, code, _ = topk_fields(p)
        gaps = np.frombuffer(p, "<u4", k, 24).astype("<u8")
        gaps[-1] = last_gap
        rest = p[24 + 4 * k :]
        return TOPK.pack(n, k, code, 8, 0, 0) + gaps.tobytes() + rest

    return change


def gapped(change: Callable[[bytearray], Any]) -> Callable[[bytearray], bytes]:
    """``change`` applied to the payload with its indices re-coded as u32 gaps (the earlier
    index coding, which decoders still read)."""

    def apply(p: bytearray) -> bytes:
        n, k, code, _, low_bits, _ = TOPK.unpack_from(p)
        indices, size = decode_elias_fano(memoryview(bytes(p))[24:], n, k, low_bits, "t")
        gaps = np.diff(indices.astype(np.int64), prepend=0).astype("<u4")
        q = bytearray(TOPK.pack(n, k, code, 4, 0, 0) + gaps.tobytes() + bytes(p[24 + size :]))
        replaced = change(q)
        return bytes(q if replaced is None else replaced)

    return apply


def elias_fano(highs: list[int], lows: list[int]) -> Callable[[bytearray], bytes]:
    """Replace the Elias-Fano indices by ``highs``/``lows`` as given (unchecked), keeping the
    payload's k, n, low bit count and values."""

    def apply(p: bytearray) -> bytes:
        n, k, _, coding, low_bits, _ = TOPK.unpack_from(p)
        assert coding == 0
        assert len(highs) == len(lows) == k
        size = decode_elias_fano(memoryview(bytes(p))[24:], n, k, low_bits, "t")[1]
        low = [(v >> (low_bits - 1 - b)) & 1 for v in lows for b in range(low_bits)]
        high = np.zeros(k + (n >> low_bits) + 1, np.uint8)
        high[[h + i for i, h in enumerate(highs)]] = 1
        body = np.packbits(np.array(low, np.uint8)).tobytes() + np.packbits(high).tobytes()
        return bytes(p[:24]) + body + bytes(p[24 + size :])

    return apply


def zero_high_part(p: bytearray) -> bytes:
    n, k, _, _, low_bits, _ = TOPK.unpack_from(p)
    size = decode_elias_fano(memoryview(bytes(p))[24:], n, k, low_bits, "t")[1]
    low_bytes = -(-k * low_bits // 8)
    return bytes(p[: 24 + low_bytes]) + bytes(size - low_bytes) + bytes(p[24 + size :])


def topk_quant_offset(p: bytearray) -> int:
    n, k, _, coding, low_bits, _ = TOPK.unpack_from(p)
    if coding == 0:
        return 24 + decode_elias_fano(memoryview(bytes(p))[24:], n, k, low_bits, "t")[1]
    return 24 + k * coding


def in_topk_values(
    make: Callable[[int], Callable[[bytearray], None]],
) -> Callable[[bytearray], None]:
    def change(p: bytearray) -> None:
        make(topk_quant_offset(p))(p)

    return change


def set_half(value: int, index: int = 0) -> Callable[[bytearray], None]:
    return pack_at("<H", 2 * index, value)


FORGERIES: list[tuple[str, str, str, Callable[[bytearray], Any], type[DecodeError]]] = [
    # hfl.quant (a float32 and a float16 tensor)
    ("quant scale NaN", "q8+zstd", "w", set_scale(math.nan), SchemaError),
    ("quant scale -1", "q8+zstd", "w", set_scale(-1.0), SchemaError),
    ("quant scale Inf", "q8+zstd", "w", set_scale(math.inf), SchemaError),
    ("quant lo NaN", "q8+zstd", "w", set_lo(math.nan), SchemaError),
    ("quant lo -Inf", "q8+zstd", "w", set_lo(-math.inf), SchemaError),
    ("quant top overflows", "q8+zstd", "w", both(set_lo(3e38), set_scale(1e37)), SchemaError),
    ("quant step x levels overflows", "q8+zstd", "w", both(set_lo(-3e38), set_scale(2.4e36)),
     SchemaError),
    ("quant top overflows f16", "q8+zstd", "h", both(set_lo(6e4), set_scale(100.0)),
     NonFiniteError),
    ("quant bits 3", "q8+zstd", "w", pack_at("<B", 0, 3), UnsupportedError),
    ("quant bits 0", "q8+zstd", "w", pack_at("<B", 0, 0), UnsupportedError),
    ("quant bits 32", "q8+zstd", "w", pack_at("<B", 0, 32), UnsupportedError),
    ("quant reserved", "q8+zstd", "w", pack_at("<B", 1, 1), SchemaError),
    ("quant reserved 2", "q8+zstd", "w", pack_at("<H", 2, 1), SchemaError),
    ("quant block 0", "q8+zstd", "w", pack_at("<I", 4, 0), SchemaError),
    ("quant block 1", "q8+zstd", "w", pack_at("<I", 4, 1), FrameError),
    ("quant n + 1", "q8+zstd", "w", pack_at("<Q", 8, 43), SchemaError),
    ("quant n huge", "q8+zstd", "w", pack_at("<Q", 8, 2**64 - 1), SchemaError),
    ("quant one byte short", "q8+zstd", "w", lambda p: p[:-1], FrameError),
    ("quant header only", "q8+zstd", "w", lambda p: p[:16], FrameError),
    ("quant 15 bytes", "q8+zstd", "w", lambda p: p[:15], FrameError),
    # hfl.topk (quantized values, and raw values)
    # ... its indices gap-coded, as earlier encoders wrote them (decoders still read them)
    ("topk index = n", "topk0.3+q4", "w", gapped(set_gap(0, 42)), SchemaError),
    ("topk repeated index", "topk0.3+q4", "w", gapped(set_gap(1, 0)), SchemaError),
    ("topk last index past n", "topk0.3+q4", "w", gapped(set_last_gap(2**32 - 1)), SchemaError),
    ("topk u64 gap 2**63", "topk0.3+q4", "w", gapped(widen_indices(2**63)), SchemaError),
    ("topk u64 gap 2**64-1", "topk0.3+q4", "w", gapped(widen_indices(2**64 - 1)), SchemaError),
    ("topk u64 gap past n", "topk0.3+q4", "w", gapped(widen_indices(40)), SchemaError),
    ("topk gaps k = n + 1", "topk0.3+q4", "w", gapped(pack_at("<Q", 8, 43)), SchemaError),
    ("topk gaps width 3", "topk0.3+q4", "w", gapped(pack_at("<B", 17, 3)), SchemaError),
    ("topk gaps width 8 unchanged", "topk0.3+q4", "w", gapped(pack_at("<B", 17, 8)),
     DecodeError),
    ("topk gaps with low bits", "topk0.3+q4", "w", gapped(pack_at("<H", 18, 1)), SchemaError),
    ("topk gaps reserved 2", "topk0.3+q4", "w", gapped(pack_at("<I", 20, 1)), SchemaError),
    ("topk gaps values scale NaN", "topk0.3+q4", "w",
     gapped(in_topk_values(lambda o: set_scale(math.nan, 0, o))), SchemaError),
    ("topk gaps cut", "topk0.3+q4", "w", gapped(lambda p: p[:30]), FrameError),
    # ... and in Elias-Fano (13 of 42 elements: 1 low bit each, 35 bits of high part)
    ("topk k = n + 1", "topk0.3+q4", "w", pack_at("<Q", 8, 43), SchemaError),
    ("topk k huge", "topk0.3+q4", "w", pack_at("<Q", 8, 2**64 - 1), SchemaError),
    ("topk k = 0", "topk0.3+q4", "w", pack_at("<Q", 8, 0), DecodeError),
    ("topk n - 1", "topk0.3+q4", "w", pack_at("<Q", 0, 41), SchemaError),
    ("topk coding 3", "topk0.3+q4", "w", pack_at("<B", 17, 3), SchemaError),
    ("topk low bits 63", "topk0.3+q4", "w", pack_at("<H", 18, 63), SchemaError),
    ("topk low bits 30", "topk0.3+q4", "w", pack_at("<H", 18, 30), FrameError),
    ("topk reserved 2", "topk0.3+q4", "w", pack_at("<I", 20, 1), SchemaError),
    ("topk high part empty", "topk0.3+q4", "w", zero_high_part, SchemaError),
    ("topk repeated index (EF)", "topk0.3+q4", "w",
     elias_fano([0, 0, *range(2, 13)], [1, 1, *[0] * 11]), SchemaError),
    ("topk last index = n (EF)", "topk0.3+q4", "w",
     elias_fano([*range(12), 21], [0] * 13), SchemaError),
    ("topk value code 9", "topk0.3+q4", "w", pack_at("<B", 16, 9), UnsupportedError),
    ("topk raw code, quant bytes", "topk0.3+q4", "w", pack_at("<B", 16, 0), FrameError),
    ("topk values scale NaN", "topk0.3+q4", "w",
     in_topk_values(lambda o: set_scale(math.nan, 0, o)), SchemaError),
    ("topk values n wrong", "topk0.3+q4", "w", in_topk_values(lambda o: pack_at("<Q", o + 8, 12)),
     SchemaError),
    ("topk indices cut", "topk0.3+q4", "w", lambda p: p[:27], FrameError),
    ("topk 23 bytes", "topk0.3+q4", "w", lambda p: p[:23], FrameError),
    ("topk raw value NaN", "topk0.5+npy", "w", lambda p: p.__setitem__(slice(-4, None),
     struct.pack("<f", math.nan)), NonFiniteError),
    ("topk raw value Inf f64", "topk0.5+npy", "b", lambda p: p.__setitem__(slice(-8, None),
     struct.pack("<d", math.inf)), NonFiniteError),
    ("topk raw values short", "topk0.5+npy", "w", lambda p: p[:-1], FrameError),
    # hfl.fp16 and hfl.bf16
    ("fp16 NaN", "fp16", "w", set_half(0x7E00), NonFiniteError),
    ("fp16 Inf", "fp16", "w", set_half(0xFC00, 5), NonFiniteError),
    ("fp16 f16 Inf", "fp16", "h", set_half(0x7C00), NonFiniteError),
    ("fp16 long", "fp16", "w", lambda p: p + b"\x00\x00", FrameError),
    ("fp16 odd", "fp16", "w", lambda p: p[:-1], FrameError),
    ("bf16 Inf", "bf16+zstd", "w", set_half(0x7F80), NonFiniteError),
    ("bf16 NaN", "bf16+zstd", "b", set_half(0xFFC1, 4), NonFiniteError),
    ("bf16 beyond float16", "bf16+zstd", "h", set_half(0x7F7F), NonFiniteError),
    ("bf16 empty", "bf16+zstd", "w", lambda p: b"", FrameError),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "name", "change", "error"),
    [pytest.param(*f[1:], id=f[0]) for f in FORGERIES],
)
def test_forged_payloads(
    spec: str, name: str, change: Callable[[bytearray], Any], error: type[DecodeError]
) -> None:
    exc = rejected(forge(spec, name, change))
    assert isinstance(exc, error), exc
    assert exc.field == f"tensors[{name!r}].data"


def test_forgeries_that_are_still_valid() -> None:
    # A -0.0 scale, and a step whose 255 multiples stay within float32: both decode.
    # A block size that still makes one block of the 42 elements is fine too.
    for change in (set_scale(-0.0), both(set_lo(-3e38), set_scale(1.3e36)),
                   pack_at("<I", 4, 2**32 - 1)):  # fmt: skip
        message = decode_or_reject(forge("q8+zstd", "w", change))
        assert message is not None


# --- npy payloads with lying headers --------------------------------------------------------------


def npy(
    text: str,
    data: bytes,
    *,
    version: bytes = b"\x01\x00",
    header_len: int | None = None,
    magic: bytes = b"\x93NUMPY",
) -> bytes:
    """npy bytes with the header dict ``text``, padded as np.save pads it."""
    padded = text + " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    size = len(padded) if header_len is None else header_len
    return magic + version + struct.pack("<H", size) + padded.encode("latin1") + data


def npy_text(descr: str = "<f4", fortran: str = "False", shape: str = "(6, 7)") -> str:
    return f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"


W = ARRAYS["w"]
WDATA = W.tobytes()


def test_the_npy_helper_writes_what_np_save_writes() -> None:
    assert npy(npy_text(), WDATA) == npy_bytes(W)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (npy(npy_text(shape="(6, 8)"), WDATA), FrameError),
        (npy(npy_text(shape="(7, 6)"), WDATA), SchemaError),
        (npy(npy_text(shape="(42,)"), WDATA), SchemaError),
        (npy(npy_text(shape="()"), WDATA), FrameError),
        (npy(npy_text(shape="(6, 7, 1)"), WDATA), SchemaError),
        (npy(npy_text(shape="(1099511627776, 7)"), WDATA), SizeLimitError),
        (npy(npy_text(shape="(0, 1099511627776)"), b""), SchemaError),
        (npy(npy_text(shape="(-6, 7)"), WDATA), SchemaError),
        (npy(npy_text(shape="(6, 7"), WDATA), SchemaError),
        (npy(npy_text(shape="(6,7)"), WDATA), SchemaError),  # not np.save's spacing
        (npy(npy_text(shape="(6.0, 7)"), WDATA), SchemaError),
        (npy(npy_text(shape="[6, 7]"), WDATA), SchemaError),
        (npy(npy_text(shape="((6,), 7)"), WDATA), SchemaError),
        (npy(npy_text(shape="(" + "1, " * 70 + "42)"), WDATA), SizeLimitError),
        (npy(npy_text(descr="<f8"), WDATA), FrameError),
        (npy(npy_text(descr="<i4"), WDATA), SchemaError),
        (npy(npy_text(descr="<u4"), WDATA), SchemaError),
        (npy(npy_text(descr="|O"), WDATA), SchemaError),
        (npy(npy_text(descr="|O8"), WDATA), SchemaError),
        (npy(npy_text(descr="<U10"), WDATA), SchemaError),
        (npy(npy_text(descr="|V4"), WDATA), SchemaError),
        (npy(npy_text(descr="<c8"), WDATA), UnsupportedError),
        (npy(npy_text(descr="<f16"), WDATA), UnsupportedError),
        (npy(npy_text(descr="=f4"), WDATA), SchemaError),
        (npy(npy_text(descr="|f4"), WDATA), UnsupportedError),
        (npy(npy_text(fortran="yes"), WDATA), SchemaError),
        (npy(npy_text(fortran="1"), WDATA), SchemaError),
        (npy(npy_text(fortran="None"), WDATA), SchemaError),
        (
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6, 7), 'x': 1, }", WDATA),
            SchemaError,
        ),
        (npy("{'fortran_order': False, 'descr': '<f4', 'shape': (6, 7), }", WDATA), SchemaError),
        (npy("{'descr': '<f4', 'shape': (6, 7), }", WDATA), SchemaError),
        (npy("__import__('os').system('false')", WDATA), SchemaError),
        (npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6, 7)}", WDATA), SchemaError),
        (npy("(" * 1000 + ")" * 1000, WDATA), SchemaError),
        (npy("9" * 4000, WDATA), SchemaError),
        (npy(npy_text(), WDATA, version=b"\x02\x00"), UnsupportedError),
        (npy(npy_text(), WDATA, version=b"\x03\x00"), UnsupportedError),
        (npy(npy_text(), WDATA, version=b"\x00\x00"), UnsupportedError),
        (npy(npy_text(), WDATA, version=b"\xff\xff"), UnsupportedError),
        (npy(npy_text(), WDATA, header_len=65535), SizeLimitError),
        (npy(npy_text(), WDATA, header_len=4097), SizeLimitError),
        (npy(npy_text(), WDATA, header_len=4096), FrameError),
        (npy(npy_text(), WDATA, header_len=64), SchemaError),
        (npy(npy_text(), WDATA, header_len=0), SchemaError),
        (npy(npy_text(), WDATA, magic=b"\x93NUMPX"), FrameError),
        (b"\x93NUMPY\x01\x00\x76", FrameError),
        (b"", FrameError),
        (npy(npy_text(), struct.pack("<f", math.nan) + WDATA[4:]), NonFiniteError),
        (npy(npy_text(), WDATA[:-4] + struct.pack("<f", -math.inf)), NonFiniteError),
    ],
)
def test_npy_payloads_with_lying_headers(payload: bytes, error: type[DecodeError]) -> None:
    body = body_of("npy")
    record(body, "w")["data"] = payload
    exc = rejected(pack(body))
    assert isinstance(exc, error), exc
    assert exc.field == "tensors['w'].data"


@pytest.mark.parametrize(
    "payload",
    [
        npy(npy_text(descr=">f4"), W.astype(">f4").tobytes()),
        npy(npy_text(fortran="True"), W.T.tobytes()),
        npy(npy_text() + " " * 200, WDATA),
    ],
    ids=["big-endian", "fortran", "extra padding"],
)
def test_npy_payloads_in_other_valid_forms(payload: bytes) -> None:
    body = body_of("npy")
    record(body, "w")["data"] = payload
    message = decode_or_reject(pack(body))
    assert message is not None
    np.testing.assert_array_equal(message.arrays["w"], W)


def test_npy_bool_bytes_other_than_0_and_1() -> None:
    body = body_of("npy")
    record(body, "m")["data"] = npy(npy_text("|b1", shape="(3,)"), b"\x01\x02\x00")
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)
    assert exc.field == "tensors['m'].data"


def test_npy_int_record_with_a_float_payload() -> None:
    body = body_of("npy")
    record(body, "n")["data"] = npy(npy_text("<f4", shape="(4,)"), b"\x00" * 16)
    exc = rejected(pack(body))
    assert isinstance(exc, SchemaError)


# --- frames and zstd bombs ------------------------------------------------------------------------


def zstd_rle_frame(total: int, declared: int | None) -> bytes:
    """A zstd frame of RLE blocks that decompresses to ``total`` zero bytes.

    Its header declares ``declared`` as the content size (or nothing when None), whether or not
    that is true: about 4 bytes per 128 KiB, so 1 GiB of zeros fits in 32 KiB.
    """
    descriptor = bytes([0x00, 0x38]) if declared is None else bytes([0xC0, 0x38])  # window 128K
    content_size = b"" if declared is None else declared.to_bytes(8, "little")
    blocks = []
    remaining = total
    while True:
        size = min(1 << 17, remaining)
        remaining -= size
        last = remaining == 0
        block_header = int(last) | 1 << 1 | size << 3  # Block_Type 1: RLE
        blocks.append(block_header.to_bytes(3, "little") + b"\x00")
        if last:
            return b"\x28\xb5\x2f\xfd" + descriptor + content_size + b"".join(blocks)


def test_the_rle_frame_helper_is_a_valid_zstd_frame() -> None:
    honest = zstd_rle_frame(300_000, 300_000)
    assert zstandard.frame_content_size(honest) == 300_000
    assert zstandard.ZstdDecompressor().decompress(honest) == bytes(300_000)


GIB = 1 << 30
BOMBS = [
    # (id, stored body, raw_size in the frame prefix, error)
    ("lies small", zstd_rle_frame(GIB, 1000), 1000, FrameError),
    ("declares 1 GiB", zstd_rle_frame(GIB, GIB), GIB, SizeLimitError),
    ("prefix small, frame 1 GiB", zstd_rle_frame(GIB, GIB), 1000, FrameError),
    ("no content size", zstd_rle_frame(GIB, None), 1000, FrameError),
    ("prefix huge", zstd_rle_frame(1000, 1000), 2**64 - 1, SizeLimitError),
    # python-zstandard returns b"" for a declared size of 0 without reading the blocks; the
    # empty body then fails as msgpack. Either way nothing is decompressed.
    ("prefix 0", zstd_rle_frame(GIB, 0), 0, DecodeError),
]


@pytest.mark.parametrize(
    ("stored", "raw_size", "error"), [pytest.param(*b[1:], id=b[0]) for b in BOMBS]
)
def test_zstd_bombs(stored: bytes, raw_size: int, error: type[DecodeError]) -> None:
    data = frame_stored(stored, raw_size)
    tracemalloc.start()
    try:
        exc = rejected(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(exc, error), exc
    assert peak < 4 << 20, f"peak {peak} bytes"


def test_a_bomb_within_a_tighter_limit() -> None:
    data = frame_stored(zstd_rle_frame(2 << 20, 2 << 20), 2 << 20)
    tracemalloc.start()
    try:
        exc = rejected(data, limits=DecodeLimits(max_raw_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(exc, SizeLimitError)
    assert exc.field == "frame.raw_size"
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "make",
    [
        lambda s: s + s,  # two frames
        lambda s: s + b"\x00",  # a trailing byte
        lambda s: b"\x50\x2a\x4d\x18" + b"\x04\x00\x00\x00abcd" + s,  # a skippable frame first
        lambda s: s[:-1],  # truncated
        lambda s: s[:4] + b"\x00" * (len(s) - 4),
    ],
    ids=["two frames", "trailing byte", "skippable frame", "truncated", "zeroed"],
)
def test_zstd_frames_that_are_not_exactly_one_frame(make: Callable[[bytes], bytes]) -> None:
    data = MESSAGES["q8+zstd"]
    raw_size = FRAME.unpack_from(data)[4]
    exc = rejected(frame_stored(make(data[FRAME.size :]), raw_size))
    assert isinstance(exc, FrameError)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "error", "field"),
    [
        (0, "4s", b"HFLX", FrameError, "frame.magic"),
        (4, "B", 0, UnsupportedError, "frame.version"),
        (4, "B", 2, UnsupportedError, "frame.version"),
        (5, "B", 0x02, UnsupportedError, "frame.flags"),
        (5, "B", 0x80, UnsupportedError, "frame.flags"),
        (5, "B", FLAG_ZSTD, FrameError, "body"),  # an uncompressed body flagged as zstd
        (6, "H", 1, UnsupportedError, "frame.reserved"),
        (8, "Q", 2**64 - 1, SizeLimitError, "frame.raw_size"),
        (8, "Q", 0, FrameError, "frame.raw_size"),
        (16, "Q", 2**64 - 1, FrameError, "frame.stored_size"),
        (16, "Q", 0, FrameError, "frame.stored_size"),
        (24, "32s", bytes(32), DigestMismatchError, "frame.digest"),
    ],
)
def test_frame_prefix_fields(
    offset: int, fmt: str, value: object, error: type[DecodeError], field: str
) -> None:
    data = bytearray(MESSAGES["npy"])
    struct.pack_into("<" + fmt, data, offset, value)
    exc = rejected(data)
    assert isinstance(exc, error), exc
    assert exc.field == field


def test_decoding_does_not_mutate_shared_state() -> None:
    # A burst of hostile input leaves the decoder able to decode the valid messages unchanged.
    before = {spec: decode_message(data) for spec, data in MESSAGES.items()}
    for data in MESSAGES.values():
        for length in range(0, len(data), 97):
            with pytest.raises(DecodeError):
                decode_message(data[:length])
    for spec, data in MESSAGES.items():
        after = decode_message(copy.copy(data))
        assert after.header == before[spec].header
        for name, array in before[spec].arrays.items():
            np.testing.assert_array_equal(after.arrays[name], array)


def test_small_items_do_not_amplify_memory() -> None:
    # msgpack would turn each 1-byte item into an 8-byte list slot before any schema check.
    # 200 arrays of 10 000 nils where the tensor list should be: a 2 MB body, a 1 KB frame.
    inner = b"\xdc" + (10_000).to_bytes(2, "big") + b"\xc0" * 10_000
    outer = b"\xdc" + (200).to_bytes(2, "big") + inner * 200
    head = msgpack.packb({"v": 1, "header": HEADER.model_dump()}, use_bin_type=True)
    body = b"\x83" + head[1:] + msgpack.packb("tensors") + outer
    data = frame(body, zstd=True)
    assert len(data) < 4096
    tracemalloc.start()
    try:
        rejected(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(body), f"peak {peak} bytes for a {len(body)}-byte body"
