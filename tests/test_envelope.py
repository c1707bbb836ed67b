"""The envelope: header validation, frame layout, round trips, model checks and size limits."""

from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from pydantic import ValidationError

from hfl_mqtt.codec import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    NPY_STYPE,
    DecodeLimits,
    EncodedTensor,
    Envelope,
    Header,
    ModelSpec,
    TensorSpec,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_message,
    npy_bytes,
    parse_spec,
)
from hfl_mqtt.codec.digest import digest
from hfl_mqtt.codec.envelope import FLAG_ZSTD, FRAME, FRAME_MAGIC
from hfl_mqtt.errors import (
    DecodeError,
    FrameError,
    ModelMismatchError,
    SchemaError,
    SizeLimitError,
    UnsupportedError,
)


def header(**fields: Any) -> Header:
    base: dict[str, Any] = {
        "federation": "fed-1",
        "sender": "edge_2.a",
        "kind": "delta",
        "version": 8,
        "base_version": 7,
        "num_examples": 120,
        "metrics": {"loss": 0.25, "acc": 1, "ok": True, "note": "fine"},
        "update_id": "3f2a",
        "created": 1_700_000_000.5,
    }
    return Header(**(base | fields))


def model_arrays() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    return {
        "conv.weight": gen.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": gen.normal(size=4),
        "fc.weight": np.asfortranarray(gen.normal(size=(10, 36)).astype(np.float16)),
        "scale": np.array(0.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "steps": np.array([3, 1, 4], np.int64),
        "mask": np.array([[True, False], [False, True]]),
    }


def frame(body: bytes, *, zstd: bool = False) -> bytes:
    """Frame a msgpack body the way the encoder does (correct sizes and digest)."""
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(body) if zstd else body
    prefix = FRAME.pack(
        FRAME_MAGIC, FORMAT_VERSION, FLAG_ZSTD if zstd else 0, 0, len(body), len(stored),
        digest(stored),
    )  # fmt: skip
    return prefix + stored


def body_of(data: bytes) -> dict[str, Any]:
    """The msgpack body of a frame, as a plain dict."""
    _, _, flags, _, raw_size, _, _ = FRAME.unpack_from(data)
    stored = data[FRAME.size :]
    raw = zstandard.ZstdDecompressor().decompress(stored) if flags & FLAG_ZSTD else stored
    assert len(raw) == raw_size
    obj: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    return obj


def reframe(obj: object, *, zstd: bool = False) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True), zstd=zstd)


# --- the header -----------------------------------------------------------------------------------


def test_header_defaults() -> None:
    h = Header(federation="f", sender="s", kind="model", version=0)
    assert h.base_version is None
    assert h.num_examples == 0
    assert h.metrics == {}
    assert h.codec == "npy"
    assert len(h.update_id) == 32
    assert Header(federation="f", sender="s", kind="model", version=0).update_id != h.update_id
    assert abs(h.created - time.time()) < 60


def test_a_delta_needs_its_base_version() -> None:
    with pytest.raises(ValidationError, match="base_version"):
        Header(federation="f", sender="s", kind="delta", version=3)
    assert header(kind="delta", base_version=0).base_version == 0
    assert header(kind="model", base_version=None).base_version is None
    assert header(kind="model", base_version=2).base_version == 2


@pytest.mark.parametrize(
    "ident",
    ["a", "edge-1", "worker_07.local", "A-Z_a-z.0-9", "x" * 128, "...", "-"],
)
def test_topic_safe_ids_are_accepted(ident: str) -> None:
    assert header(federation=ident, sender=ident).sender == ident


@pytest.mark.parametrize(
    "ident",
    ["", "a/b", "a+b", "a#", "+", "#", "/", "a b", " a", "a\n", "a\x00", "x" * 129, "é", "a:b",
     "a$", "a\tb", "edge/+/#"],
)  # fmt: skip
@pytest.mark.parametrize("field", ["federation", "sender"])
def test_ids_that_are_not_topic_safe_are_refused(field: str, ident: str) -> None:
    with pytest.raises(ValidationError, match=field):
        header(**{field: ident})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "8"),
        ("version", 8.0),
        ("version", True),
        ("version", -1),
        ("version", None),
        ("base_version", 7.0),
        ("base_version", -1),
        ("base_version", "7"),
        ("num_examples", -1),
        ("num_examples", 1.0),
        ("num_examples", False),
        ("kind", "update"),
        ("kind", "Model"),
        ("kind", None),
        ("metrics", {"a": None}),
        ("metrics", {"a": [1]}),
        ("metrics", {"a": {"b": 1}}),
        ("metrics", {"a": b"x"}),
        ("metrics", {1: 2}),
        ("metrics", {"a": math.nan}),
        ("metrics", {"a": math.inf}),
        ("metrics", [("a", 1)]),
        ("codec", "x" * 257),
        ("codec", 8),
        ("update_id", ""),
        ("update_id", "x" * 129),
        ("update_id", 5),
        ("created", "now"),
        ("created", math.nan),
        ("created", -math.inf),
        ("created", None),
        ("federation", b"fed"),
        ("unknown", 1),
    ],
)
def test_header_types_are_strict(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        header(**{field: value})


def test_header_is_frozen() -> None:
    h = header()
    with pytest.raises(ValidationError, match="frozen"):
        h.version = 9


# --- frame layout and round trips -----------------------------------------------------------------

SPECS = ["npy", "npy+zstd", "fp16", "bf16+zstd3", "q8", "q4+zstd", "q16b7", "q1b100+zstd",
         "topk0.1+q8+zstd", "topk5+fp16", "topk0.5+npy+zstd-3", "topk0.2+bf16"]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip(spec: str) -> None:
    arrays = model_arrays()
    h = header()
    data = encode_message(h, arrays, f"{spec}+seed1")
    codec = parse_spec(spec)

    magic, version, flags, reserved, raw_size, stored_size, sha = FRAME.unpack_from(data)
    assert (magic, version, reserved) == (b"HFLM", 1, 0)
    assert flags == (FLAG_ZSTD if codec.zstd else 0)
    assert stored_size == len(data) - FRAME.size
    assert sha == digest(data[FRAME.size :])
    assert (raw_size > stored_size) if codec.zstd else (raw_size == stored_size)

    envelope = decode_envelope(data)
    assert envelope.header == h.model_copy(update={"codec": str(parse_spec(f"{spec}+seed1"))})
    assert [t.name for t in envelope.tensors] == list(arrays)
    for t in envelope.tensors:
        if codec.lossless or t.dtype not in ("float16", "float32", "float64"):
            assert t.stype == NPY_STYPE

    message = decode_message(data, expect=ModelSpec.from_arrays(arrays))
    assert message.header == envelope.header
    assert list(message.arrays) == list(arrays)
    for name, a in arrays.items():
        b = message.arrays[name]
        assert b.dtype == a.dtype, name
        assert b.shape == a.shape, name
        if codec.lossless or a.dtype.kind != "f":
            np.testing.assert_array_equal(b, a, strict=True)
        elif codec.values == "quant" and not codec.sparse:
            assert codec.bits is not None
            step = float(np.ptp(a)) / ((1 << codec.bits) - 1) if a.size else 0.0
            np.testing.assert_allclose(b, a, rtol=2**-10, atol=1.001 * step)
        elif not codec.sparse:  # fp16, bf16 (and a float16 tensor's own rounding)
            np.testing.assert_allclose(b, a, rtol=2**-8 + 2**-11, atol=2**-24)


def test_the_worked_example_of_the_wire_format() -> None:
    """docs/wire-format.md section 7, byte for byte where the document shows the bytes."""
    w = np.array([[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]], np.float32)
    n = np.array([1, 2], np.uint8)
    h = Header(
        federation="demo",
        sender="edge-1",
        kind="delta",
        version=8,
        base_version=7,
        num_examples=120,
        metrics={"loss": 0.25},
        update_id="3f2a",
        created=1700000000.5,
    )
    data = encode_message(h, {"w": w, "n": n}, "q8b4+seed7")
    assert len(data) == 504
    assert data[:24] == bytes.fromhex("48464c4d 01000000 c001000000000000 c001000000000000")
    assert data[24:56].hex() == "c987b6cda5ed3a97e4a40cb0bc6136a3713c77448047134b9f5cd600b3cbfd9c"
    quant = bytes.fromhex(
        "08000000 04000000 0600000000000000 cdcc4cbe 9a9919bf ce331a3b 285a8d3b 8000d5ffff00"
    )
    assert data[0x119 : 0x119 + len(quant)] == quant
    assert data[0x176:] == npy_bytes(n)
    message = decode_message(data)
    np.testing.assert_array_equal(
        message.arrays["w"],
        np.array([[0.101176485, -0.2, 0.3011765], [0.40000004, 0.5000001, -0.6]], np.float32),
    )
    np.testing.assert_array_equal(message.arrays["n"], n)


def test_an_empty_message() -> None:
    h = header(kind="model", base_version=None)
    message = decode_message(encode_message(h, {}, "q8+zstd"))
    assert message.arrays == {}
    assert message.header.kind == "model"


def test_the_encoder_sets_the_codec_field() -> None:
    h = header(codec="something else")
    data = encode_message(h, {"w": np.ones(3)}, " ZSTD+Q4 ")
    assert decode_envelope(data).header.codec == "q4+zstd"
    assert h.codec == "something else"  # the caller's header is left alone


def test_encode_envelope_and_decode_envelope_keep_tensors_encoded() -> None:
    tensors = (
        EncodedTensor("a", NPY_STYPE, "int8", (2,), npy_bytes(np.array([1, -1], np.int8))),
        EncodedTensor("b", "hfl.fp16", "float32", (1,), np.array([1.5], "<f2").tobytes()),
    )
    envelope = Envelope(header(), tensors)
    for level in (None, 1, 19):
        data = encode_envelope(envelope, zstd_level=level)
        decoded = decode_envelope(data)
        assert decoded == envelope
        assert decoded.arrays()["b"][0] == 1.5
    # The body is exactly msgpack of the map the format describes.
    data = encode_envelope(envelope)
    expected = {
        "v": 1,
        "header": envelope.header.model_dump(),
        "tensors": [
            {"name": t.name, "stype": t.stype, "dtype": t.dtype, "shape": t.shape, "data": t.data}
            for t in tensors
        ],
    }
    assert data[FRAME.size :] == msgpack.packb(expected, use_bin_type=True)


def test_decode_accepts_memoryview_and_bytearray() -> None:
    data = encode_message(header(), {"w": np.arange(6.0)}, "q8+zstd")
    expected = np.arange(6.0)
    for view in (memoryview(data), bytearray(data), memoryview(bytearray(data))):
        decoded = decode_message(view).arrays["w"]
        np.testing.assert_allclose(decoded, expected, atol=0.02)


def test_decoded_arrays_are_writable_and_independent() -> None:
    arrays = {"w": np.arange(6.0).reshape(2, 3)}
    data = encode_message(header(), arrays)
    one, two = decode_message(data).arrays["w"], decode_message(data).arrays["w"]
    one += 1
    np.testing.assert_array_equal(two, arrays["w"])


# --- the expected model ---------------------------------------------------------------------------


def expect() -> ModelSpec:
    return ModelSpec.from_arrays(model_arrays())


def test_model_spec_from_arrays() -> None:
    spec = ModelSpec.from_arrays({"w": np.zeros((2, 3), np.float16), "n": np.zeros((), np.int8)})
    assert spec.tensors == {"w": TensorSpec((2, 3), "float16"), "n": TensorSpec((), "int8")}


@pytest.mark.parametrize("spec", ["npy", "q8+zstd"])
def test_a_missing_tensor_is_named(spec: str) -> None:
    arrays = model_arrays()
    del arrays["conv.bias"]
    with pytest.raises(ModelMismatchError, match=r"missing 'conv\.bias'") as info:
        decode_message(encode_message(header(), arrays, spec), expect=expect())
    assert info.value.field == "tensors"


@pytest.mark.parametrize("spec", ["npy", "q8+zstd"])
def test_an_extra_tensor_is_named(spec: str) -> None:
    arrays = model_arrays() | {"head.bias": np.zeros(2, np.float32)}
    with pytest.raises(ModelMismatchError, match="expected model") as info:
        decode_message(encode_message(header(), arrays, spec), expect=expect())
    assert info.value.field == "tensors['head.bias']"


@pytest.mark.parametrize(
    ("name", "replacement", "field"),
    [
        ("conv.weight", np.zeros((4, 3, 3), np.float32), "tensors['conv.weight'].shape"),
        ("conv.weight", np.zeros((3, 4, 3, 3), np.float32), "tensors['conv.weight'].shape"),
        ("scale", np.zeros((1,), np.float32), "tensors['scale'].shape"),
        ("empty", np.zeros((3, 0), np.float32), "tensors['empty'].shape"),
        ("conv.bias", np.zeros(4, np.float32), "tensors['conv.bias'].dtype"),
        ("steps", np.zeros(3, np.int32), "tensors['steps'].dtype"),
        ("mask", np.zeros((2, 2), np.uint8), "tensors['mask'].dtype"),
    ],
)
@pytest.mark.parametrize("spec", ["npy", "topk0.5+q4"])
def test_a_wrong_shape_or_dtype_is_named(
    spec: str, name: str, replacement: np.ndarray, field: str
) -> None:
    arrays = model_arrays() | {name: replacement}
    data = encode_message(header(), arrays, spec)
    with pytest.raises(ModelMismatchError) as info:
        decode_message(data, expect=expect())
    assert info.value.field == field
    decode_message(data)  # without expectations the message is fine


def test_the_model_check_comes_before_decoding() -> None:
    # A tensor whose payload is bad is not decoded when the message has the wrong tensors.
    tensors = (EncodedTensor("x", "hfl.fp16", "float32", (2,), b"bad"),)
    data = encode_envelope(Envelope(header(), tensors))
    with pytest.raises(ModelMismatchError):
        decode_message(data, expect=ModelSpec({"y": TensorSpec((2,), "float32")}))
    with pytest.raises(FrameError, match=r"tensors\['x'\].data"):
        decode_message(data, expect=ModelSpec({"x": TensorSpec((2,), "float32")}))


def test_duplicate_names_are_refused() -> None:
    t = EncodedTensor("w", NPY_STYPE, "float64", (1,), npy_bytes(np.ones(1)))
    data = encode_envelope(Envelope(header(), (t, t)))
    with pytest.raises(SchemaError, match="unique") as info:
        decode_envelope(data)
    assert info.value.field == "tensors"


def test_a_body_map_with_a_repeated_key_is_refused() -> None:
    # msgpack can repeat a key; a dict would silently keep the last one.
    packer = msgpack.Packer(use_bin_type=True)
    good = body_of(encode_message(header(), {}))
    parts = [packer.pack_map_header(4)]
    parts += [packer.pack(k) + packer.pack(v) for k, v in good.items()]
    parts.append(packer.pack("v") + packer.pack(1))
    with pytest.raises(SchemaError) as info:
        decode_message(frame(b"".join(parts)))
    assert info.value.field == "body"


# --- limits ---------------------------------------------------------------------------------------


def limited(**fields: int) -> DecodeLimits:
    return DecodeLimits(**fields)


@pytest.mark.parametrize("zstd", [False, True])
def test_max_message_bytes(zstd: bool) -> None:
    data = encode_message(header(), model_arrays(), "q8+zstd" if zstd else "npy")
    decode_message(data, limits=limited(max_message_bytes=len(data)))
    with pytest.raises(SizeLimitError) as info:
        decode_message(data, limits=limited(max_message_bytes=len(data) - 1))
    assert info.value.field == "frame"


@pytest.mark.parametrize("zstd", [False, True])
def test_max_raw_bytes(zstd: bool) -> None:
    data = encode_message(header(), model_arrays(), "npy+zstd" if zstd else "npy")
    raw_size = FRAME.unpack_from(data)[4]
    decode_message(data, limits=limited(max_raw_bytes=raw_size))
    with pytest.raises(SizeLimitError) as info:
        decode_message(data, limits=limited(max_raw_bytes=raw_size - 1))
    assert info.value.field == "frame.raw_size"


def test_max_decoded_bytes_over_the_message() -> None:
    arrays: dict[str, np.ndarray] = {
        "a": np.zeros(100, np.float32),
        "b": np.zeros(50, np.float64),
        "c": np.ones(3, bool),
    }
    total = 400 + 400 + 3
    for spec in ("npy", "q8", "topk0.1+fp16"):
        data = encode_message(header(), arrays, spec)
        decode_message(data, limits=limited(max_decoded_bytes=total))
        with pytest.raises(SizeLimitError) as info:
            decode_message(data, limits=limited(max_decoded_bytes=total - 1))
        assert info.value.field == "tensors"


def test_max_decoded_bytes_per_tensor() -> None:
    data = encode_message(header(), {"a": np.zeros((10, 10), np.float16)}, "q4")
    decode_message(data, limits=limited(max_decoded_bytes=200))
    with pytest.raises(SizeLimitError) as info:
        decode_message(data, limits=limited(max_decoded_bytes=199))
    assert info.value.field == "tensors['a'].shape"


def test_max_tensors() -> None:
    arrays = {f"t{i}": np.zeros(1) for i in range(5)}
    data = encode_message(header(), arrays)
    decode_message(data, limits=limited(max_tensors=5))
    with pytest.raises(SizeLimitError) as info:
        decode_message(data, limits=limited(max_tensors=4))
    assert info.value.field == "tensors"


def test_more_tensors_than_any_msgpack_array_may_hold() -> None:
    # Arrays longer than max(max_tensors, max_ndim) are refused by the msgpack parser itself,
    # before any record is built: docs/wire-format.md section 2 makes that a SchemaError.
    data = encode_message(header(), {f"t{i}": np.zeros(1) for i in range(40)})
    with pytest.raises(SchemaError, match="max_array_len") as info:
        decode_message(data, limits=limited(max_tensors=33))
    assert info.value.field == "body"


def test_max_ndim_and_max_name_length() -> None:
    data = encode_message(header(), {"abcd": np.zeros((1, 2, 1, 2))})
    decode_message(data, limits=limited(max_ndim=4, max_name_length=4))
    with pytest.raises(SchemaError) as info:
        decode_message(data, limits=limited(max_ndim=3))
    assert info.value.field == "tensors['abcd'].shape"
    with pytest.raises(SchemaError) as info:
        decode_message(data, limits=limited(max_name_length=3))
    assert info.value.field == "tensors[0].name"


def test_max_metrics_and_max_string_length() -> None:
    data = encode_message(header(metrics={"a": 1, "b": "xyz"}), {})
    decode_message(data, limits=limited(max_metrics=2, max_string_length=12))
    with pytest.raises(SizeLimitError) as info:
        decode_message(data, limits=limited(max_metrics=1))
    assert info.value.field == "header.metrics"
    with pytest.raises(SchemaError, match="max_str_len") as schema:
        decode_message(data, limits=limited(max_string_length=11))  # "num_examples"
    assert schema.value.field == "body"


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tensors"):
        DecodeLimits(max_tensors=0)
    assert DEFAULT_LIMITS.max_decoded_bytes == 1 << 30


def huge_tensor_frame(shape: list[int], dtype: str = "float32", stype: str = NPY_STYPE) -> bytes:
    """A frame whose one tensor declares ``shape`` but carries only a few bytes."""
    body = body_of(encode_message(header(), {}))
    body["tensors"] = [{"name": "w", "stype": stype, "dtype": dtype, "shape": shape,
                        "data": b"\x93NUMPY"}]  # fmt: skip
    return reframe(body)


@pytest.mark.parametrize(
    "shape",
    [[2**28 + 1], [2**16, 2**14 + 1], [2**40], [2**63], [2**64 - 1], [2**32, 2**32],
     [0, 2**40, 2**40], [2**64 - 1, 0], [0, 2**62, 4]],
)  # fmt: skip
@pytest.mark.parametrize("stype", [NPY_STYPE, "hfl.quant", "hfl.topk", "hfl.fp16"])
def test_declared_sizes_are_refused_before_allocation(shape: list[int], stype: str) -> None:
    data = huge_tensor_frame(shape, stype=stype)
    tracemalloc.start()
    try:
        with pytest.raises(SizeLimitError) as info:
            decode_message(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == "tensors['w'].shape"
    assert peak < 1 << 20


def test_the_sum_of_declared_sizes_is_refused_before_allocation() -> None:
    body = body_of(encode_message(header(), {}))
    record = {"stype": NPY_STYPE, "dtype": "float64", "shape": [2**26], "data": b"x"}
    body["tensors"] = [{"name": f"w{i}", **record} for i in range(3)]  # 3 x 512 MiB
    tracemalloc.start()
    try:
        with pytest.raises(SizeLimitError) as info:
            decode_message(reframe(body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == "tensors"
    assert peak < 1 << 20


def test_empty_tensors_with_large_dimensions() -> None:
    # Empty, so nothing to allocate, but numpy cannot represent the other dimensions' product.
    for shape in ([0, 2**20, 2**8], [2**28, 0]):
        data = huge_tensor_frame(shape, stype="hfl.fp16")
        body = body_of(data)
        body["tensors"][0]["data"] = b""
        assert decode_message(reframe(body)).arrays["w"].shape == tuple(shape)


def test_decode_error_is_the_only_family_raised() -> None:
    data = encode_message(header(), {"w": np.ones(3)})
    for bad in (data[:-1], b"", data[:56], data + b"\x00"):
        with pytest.raises(DecodeError):
            decode_message(bad)
    with pytest.raises(UnsupportedError) as info:
        decode_message(data[:4] + b"\x02" + data[5:])
    assert info.value.field == "frame.version"


def test_num_examples_is_bounded_so_sums_stay_exact() -> None:
    # A child claiming more than 2**53 examples would own FedAvg's weights and overflow sums.
    Header(federation="f", sender="s", kind="model", version=0, num_examples=2**53)
    with pytest.raises(ValidationError):
        Header(federation="f", sender="s", kind="model", version=0, num_examples=2**53 + 1)
