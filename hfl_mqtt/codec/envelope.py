"""The envelope: one model or delta on the wire, framed, digested and optionally zstd-compressed.

A frame is a fixed 56-byte prefix followed by the body::

    magic "HFLM" | version u8 | flags u8 | reserved u16 | raw_size u64 | stored_size u64 |
    SHA-256(stored body) 32 bytes | body (stored_size bytes)

The body, after zstd decompression when flag bit 0 is set, is a msgpack map
``{"v": 1, "header": {...}, "tensors": [{name, stype, dtype, shape, data}, ...]}``.
``docs/wire-format.md`` specifies every field. Decoding checks sizes before it allocates or
decompresses, then the digest, then the schema, and raises only ``DecodeError`` subtypes.
"""

from __future__ import annotations

import re
import reprlib
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgpack
import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hfl_mqtt.codec.compressor import Compressor
from hfl_mqtt.codec.digest import DIGEST_SIZE, check_digest, digest_parts
from hfl_mqtt.codec.limits import DEFAULT_LIMITS, DecodeLimits
from hfl_mqtt.codec.msgpack_scan import check_object_count
from hfl_mqtt.codec.spec import CodecSpec
from hfl_mqtt.codec.tensor import (
    EncodedTensor,
    ModelSpec,
    check_total_size,
    decode_tensor,
    tensor_from_wire,
)
from hfl_mqtt.errors import FrameError, SchemaError, SizeLimitError, UnsupportedError

__all__ = [
    "FORMAT_VERSION",
    "FRAME",
    "FRAME_MAGIC",
    "Envelope",
    "Header",
    "Message",
    "decode_envelope",
    "decode_message",
    "encode_envelope",
    "encode_message",
]

FRAME_MAGIC = b"HFLM"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
FRAME = struct.Struct(f"<4sBBHQQ{DIGEST_SIZE}s")

NODE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
"""Ids that are safe as MQTT topic levels: no ``/``, ``+``, ``#`` or spaces."""

Identifier = Annotated[str, Field(pattern=NODE_ID.pattern, max_length=128)]
MetricValue = bool | int | float | str


class Header(BaseModel):
    """What a model or delta is, who sent it and what it was computed from."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    federation: Identifier
    sender: Identifier
    kind: Literal["model", "delta"]
    version: Annotated[int, Field(ge=0)]
    """The version this message is (a model) or produces once applied (a delta)."""
    base_version: Annotated[int, Field(ge=0)] | None = None
    """The version a delta was computed against; None only for a model with no base."""
    num_examples: Annotated[int, Field(ge=0, le=2**53)] = 0
    """Examples behind the update (its FedAvg weight); at most 2**53, so sums stay exact."""
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    codec: Annotated[str, Field(max_length=256)] = "npy"
    """The canonical codec spec the tensors were encoded with (informational)."""
    update_id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default_factory=lambda: uuid.uuid4().hex
    )
    """Unique per message: receivers use it to drop QoS 1 redeliveries."""
    created: float = Field(default_factory=time.time)
    """Sender's clock, seconds since the epoch."""

    @model_validator(mode="after")
    def _delta_has_base(self) -> Header:
        if self.kind == "delta" and self.base_version is None:
            raise ValueError("a delta must name its base_version")
        return self


@dataclass(frozen=True, slots=True)
class Envelope:
    """A checked header and its still-encoded tensors."""

    header: Header
    tensors: tuple[EncodedTensor, ...]

    def arrays(
        self, *, expect: ModelSpec | None = None, limits: DecodeLimits = DEFAULT_LIMITS
    ) -> dict[str, np.ndarray]:
        """Decode every tensor, first checking them against ``expect`` when given."""
        if expect is not None:
            expect.check(self.tensors)
        return {t.name: decode_tensor(t, limits) for t in self.tensors}


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its header and its arrays."""

    header: Header
    arrays: dict[str, np.ndarray]


def encode_envelope(envelope: Envelope, *, zstd_level: int | None = None) -> bytes:
    """Frame an envelope; zstd-compress the body at ``zstd_level`` unless it is None."""
    body = _body_parts(envelope)
    raw_size = sum(len(part) for part in body)
    flags = 0
    stored = body
    if zstd_level is not None:
        compressor = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True)
        stream = compressor.compressobj(size=raw_size)
        stored = [stream.compress(part) for part in body]
        stored.append(stream.flush())
        flags |= FLAG_ZSTD
    stored_size = sum(len(part) for part in stored)
    prefix = FRAME.pack(
        FRAME_MAGIC, FORMAT_VERSION, flags, 0, raw_size, stored_size, digest_parts(stored)
    )
    return b"".join((prefix, *stored))


def _body_parts(envelope: Envelope) -> list[bytes]:
    """The msgpack body as parts that concatenate to ``msgpack.packb`` of the body map.

    Tensor data stays in parts of its own, so the only copy made of it is the final join.
    """
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    parts: list[bytes] = []
    head = [
        packer.pack_map_header(3),
        pack("v"),
        pack(FORMAT_VERSION),
        pack("header"),
        pack(envelope.header.model_dump()),
        pack("tensors"),
        packer.pack_array_header(len(envelope.tensors)),
    ]
    for t in envelope.tensors:
        head += [
            packer.pack_map_header(5),
            pack("name"),
            pack(t.name),
            pack("stype"),
            pack(t.stype),
            pack("dtype"),
            pack(t.dtype),
            pack("shape"),
            pack(t.shape),
            pack("data"),
            _bin_header(len(t.data)),
        ]
        parts += [b"".join(head), t.data]
        head = []
    if head:
        parts.append(b"".join(head))
    return parts


def _bin_header(size: int) -> bytes:
    # msgpack's Packer cannot write a bin header alone; this is the spec's bin 8/16/32 header.
    if size < 0x100:
        return struct.pack(">BB", 0xC4, size)
    if size < 0x10000:
        return struct.pack(">BH", 0xC5, size)
    return struct.pack(">BI", 0xC6, size)


def encode_message(
    header: Header,
    arrays: Mapping[str, np.ndarray],
    codec: CodecSpec | str | Compressor = "npy",
) -> bytes:
    """Encode ``arrays`` with ``codec`` (a spec, or a link's ``Compressor``) and frame them."""
    compressor = codec if isinstance(codec, Compressor) else Compressor(codec)
    spec = compressor.spec
    envelope = Envelope(
        header.model_copy(update={"codec": str(spec)}), tuple(compressor.encode(arrays))
    )
    return encode_envelope(envelope, zstd_level=spec.zstd_level if spec.zstd else None)


def decode_envelope(
    data: bytes | bytearray | memoryview, *, limits: DecodeLimits = DEFAULT_LIMITS
) -> Envelope:
    """Check a frame and its body and return the envelope, without decoding tensor values."""
    view = memoryview(data)
    if len(view) > limits.max_message_bytes:
        raise SizeLimitError("frame", f"{len(view)} bytes exceed {limits.max_message_bytes}")
    if len(view) < FRAME.size:
        raise FrameError("frame", f"{len(view)} bytes is shorter than the {FRAME.size}-byte prefix")
    magic, version, flags, reserved, raw_size, stored_size, expected = FRAME.unpack_from(view)
    if magic != FRAME_MAGIC:
        raise FrameError("frame.magic", f"expected {FRAME_MAGIC!r}, got {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedError("frame.version", f"format version {version} is not supported")
    if flags & ~FLAG_ZSTD:
        raise UnsupportedError("frame.flags", f"unknown flags 0x{flags:02x}")
    if reserved:
        raise UnsupportedError("frame.reserved", "must be 0")
    stored = view[FRAME.size :]
    if stored_size != len(stored):
        raise FrameError("frame.stored_size", f"declares {stored_size}, body is {len(stored)}")
    if raw_size > limits.max_raw_bytes:
        raise SizeLimitError("frame.raw_size", f"{raw_size} exceeds {limits.max_raw_bytes}")
    if not flags & FLAG_ZSTD and raw_size != stored_size:
        raise FrameError("frame.raw_size", "must equal stored_size for an uncompressed body")
    check_digest(stored, expected, "frame.digest")
    body = _decompress(stored, raw_size) if flags & FLAG_ZSTD else stored
    return _envelope_from_body(body, raw_size, limits)


def decode_message(
    data: bytes | bytearray | memoryview,
    *,
    expect: ModelSpec | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Message:
    """Decode a whole message: frame, header and arrays, checked against ``expect`` if given."""
    envelope = decode_envelope(data, limits=limits)
    return Message(envelope.header, envelope.arrays(expect=expect, limits=limits))


def _decompress(stored: memoryview, raw_size: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError:
        raise FrameError("body", "not a zstd frame") from None
    if declared != raw_size:
        raise FrameError("frame.raw_size", f"declares {raw_size}, the zstd frame {declared}")
    try:
        body = zstandard.ZstdDecompressor().decompress(stored, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FrameError("body", f"zstd: {exc}") from None
    if len(body) != raw_size:
        raise FrameError("frame.raw_size", f"declares {raw_size}, decompressed {len(body)}")
    return body


def _envelope_from_body(body: bytes | memoryview, raw_size: int, limits: DecodeLimits) -> Envelope:
    if len(body) > limits.max_body_objects:  # every object takes a byte: no need to count below
        check_object_count(body, limits.max_body_objects)
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_bin_len=raw_size,
            max_str_len=limits.max_string_length,
            max_array_len=max(limits.max_tensors, limits.max_ndim) + 1,
            max_map_len=max(limits.max_metrics + 1, 16),
            object_pairs_hook=_map_without_duplicates,
            max_ext_len=0,
        )
    # The msgpack parser signals malformed input with several exception types; all mean "bad
    # body" and are translated here, at its one call site.
    except Exception as exc:
        raise SchemaError("body", f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or set(obj) != {"v", "header", "tensors"}:
        raise SchemaError("body", "must be a map of exactly v, header and tensors")
    if type(obj["v"]) is not int or obj["v"] != FORMAT_VERSION:
        # reprlib: a peer's value may nest deeper than repr() can recurse.
        version = reprlib.repr(obj["v"])
        raise UnsupportedError("body.v", f"envelope version {version} is not supported")
    header = _header_from_wire(obj["header"], limits)
    raw_tensors = obj["tensors"]
    if not isinstance(raw_tensors, list):
        raise SchemaError("tensors", "must be a list")
    if len(raw_tensors) > limits.max_tensors:
        raise SizeLimitError("tensors", f"{len(raw_tensors)} tensors exceed {limits.max_tensors}")
    tensors = tuple(tensor_from_wire(raw, i, limits) for i, raw in enumerate(raw_tensors))
    names = {t.name for t in tensors}
    if len(names) != len(tensors):
        raise SchemaError("tensors", "tensor names must be unique")
    check_total_size(tensors, limits)
    return Envelope(header, tensors)


def _map_without_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a map repeats a key")
    return result


def _header_from_wire(raw: Any, limits: DecodeLimits) -> Header:
    if not isinstance(raw, dict):
        raise SchemaError("header", "must be a map")
    # On the wire every field is present (base_version may be nil): defaults are for senders.
    missing = [name for name in Header.model_fields if name not in raw]
    if missing:
        raise SchemaError(f"header.{missing[0]}", "is missing")
    metrics = raw.get("metrics")
    if isinstance(metrics, dict) and len(metrics) > limits.max_metrics:
        raise SizeLimitError(
            "header.metrics", f"{len(metrics)} entries exceed {limits.max_metrics}"
        )
    try:
        return Header.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in ("header", *error["loc"]))
        raise SchemaError(where, error["msg"]) from None
