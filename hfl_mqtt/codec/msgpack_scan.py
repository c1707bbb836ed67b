"""Count the objects of a msgpack body before unpacking it, without building any of them.

msgpack's unpacker builds every object it reads: a body of tiny nested items (a nil is one
byte) becomes an 8-byte list slot per byte, so a few KB of zstd frame could cost gigabytes
before any schema check runs. Walking the encoding first costs a few hundred nanoseconds per
object, skips strings and binary payloads by their length, and stops at a limit. Runs of
one-byte objects (nil, booleans, small integers: what such a bomb is made of) are counted in
one regular-expression match, at C speed.
"""

from __future__ import annotations

import re

from hfl_mqtt.errors import SchemaError, SizeLimitError, UnsupportedError

__all__ = ["check_object_count"]

# First byte -> bytes that follow it, for fixed-size scalars.
_SCALAR = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_SCALAR |= {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
# First byte -> size of the big-endian length that follows, for str and bin.
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
# First byte -> (size of the big-endian count that follows, objects per counted item).
_CONTAINER = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]*")
"""Objects that are one byte each: positive and negative fixints, nil, false, true."""


def check_object_count(body: bytes | memoryview, limit: int) -> None:
    """Raise ``SizeLimitError`` if the one msgpack object in ``body`` holds more than ``limit``
    objects in all (every container, key, value and item counts one).

    Extension types are refused (``UnsupportedError``); truncation and the unused type byte
    0xc1 are a ``SchemaError``.
    """
    view = memoryview(body)
    end = len(view)
    pos = 0
    pending = 1
    seen = 0
    while pending:
        if pos >= end:
            raise SchemaError("body", "msgpack data ends inside an object")
        first = view[pos]
        pos += 1
        pending -= 1
        seen += 1
        if seen > limit:
            raise SizeLimitError("body", f"more than {limit} msgpack objects")
        if first <= 0x7F or first >= 0xE0 or first in (0xC0, 0xC2, 0xC3):  # one-byte objects
            # The rest of a run of them, up to the objects still pending (endpos bounds the
            # scan: no byte is matched twice).
            run = _ONE_BYTE_RUN.match(view, pos, min(end, pos + pending))
            count = run.end() - pos if run else 0
            pos += count
            pending -= count
            seen += count
            if seen > limit:
                raise SizeLimitError("body", f"more than {limit} msgpack objects")
            continue
        if first <= 0x8F:  # fixmap
            pending += 2 * (first & 0x0F)
        elif first <= 0x9F:  # fixarray
            pending += first & 0x0F
        elif first <= 0xBF:  # fixstr
            pos += first & 0x1F
        elif first in _SCALAR:
            pos += _SCALAR[first]
        elif first in _SIZED:
            size = _SIZED[first]
            pos += size + int.from_bytes(view[pos : pos + size], "big")
        elif first in _CONTAINER:
            size, per_item = _CONTAINER[first]
            pending += per_item * int.from_bytes(view[pos : pos + size], "big")
            pos += size
        elif first == 0xC1:  # never used by msgpack
            raise SchemaError("body", "not valid msgpack (type byte 0xc1)")
        else:  # ext types
            raise UnsupportedError("body", f"msgpack extension type 0x{first:02x} is not allowed")
