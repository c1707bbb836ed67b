"""Split large messages into chunks of about 1 MiB and reassemble them with bounded memory.

One large MQTT publish costs CPU quadratic in its size (paho copies the unsent remainder on every
partial write), so messages above ``chunk_size`` travel as chunks: an 80-byte little-endian header
(``HFLC``, transfer id, index, count, sizes, CRC-32 of the chunk, SHA-256 of the message) then
the data. Smaller messages travel unchanged; a receiver tells the two apart by the magic.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hfl_mqtt.codec.digest import DIGEST_SIZE, digest
from hfl_mqtt.codec.limits import DEFAULT_LIMITS
from hfl_mqtt.errors import (
    ChunkError,
    DecodeError,
    DigestMismatchError,
    FrameError,
    SizeLimitError,
    UnsupportedError,
)

__all__ = [
    "CHUNK_HEADER_SIZE",
    "CHUNK_MAGIC",
    "CHUNK_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "TRANSFER_ID_SIZE",
    "ChunkHeader",
    "Reassembler",
    "ReassemblerStats",
    "is_chunk",
    "parse_chunk",
    "split_message",
]

CHUNK_MAGIC = b"HFLC"
CHUNK_VERSION = 1
CHUNK_HEADER_SIZE = 80
DEFAULT_CHUNK_SIZE = 1 << 20
TRANSFER_ID_SIZE = 16

# magic, version, flags, reserved, transfer id, index, count, total_size, chunk_size, crc32, digest
_HEADER = struct.Struct(f"<4sBBH{TRANSFER_ID_SIZE}sIIQII{DIGEST_SIZE}s")
assert _HEADER.size == CHUNK_HEADER_SIZE

_U32_MAX = 0xFFFF_FFFF

# Every stored chunk costs Python objects besides its data (~200 bytes: the bytes object with its
# header, a dict slot, an int key). A transfer is charged at least this much per chunk, so that a
# peer declaring chunk_size=1 cannot hide gigabytes of bookkeeping behind a small total_size.
_MIN_CHARGE_PER_CHUNK = 256

Buffer = bytes | bytearray | memoryview


def is_chunk(data: Buffer) -> bool:
    """Whether ``data`` starts with the chunk magic (else it is a whole, unchunked message)."""
    return bytes(data[:4]) == CHUNK_MAGIC


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The header of one chunk (version, flags and reserved are implied: 1, 0, 0)."""

    transfer_id: bytes
    index: int
    count: int
    total_size: int
    chunk_size: int
    crc32: int
    message_digest: bytes

    @property
    def data_size(self) -> int:
        """Bytes of data this chunk carries: ``chunk_size``, except for the last chunk."""
        if self.index < self.count - 1:
            return self.chunk_size
        return self.total_size - (self.count - 1) * self.chunk_size

    def pack(self) -> bytes:
        """The 80-byte wire form of this header."""
        return _HEADER.pack(
            CHUNK_MAGIC,
            CHUNK_VERSION,
            0,
            0,
            self.transfer_id,
            self.index,
            self.count,
            self.total_size,
            self.chunk_size,
            self.crc32,
            self.message_digest,
        )


def split_message(
    message: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: bytes | None = None,
) -> list[bytes]:
    """Cut ``message`` into chunks of ``chunk_size`` data bytes; a small message stays as it is.

    A message that fits in one chunk but happens to start with ``CHUNK_MAGIC`` is wrapped in a
    single chunk anyway, so that the receiver never mistakes it for one.
    """
    if not 1 <= chunk_size <= _U32_MAX:
        raise ValueError(f"chunk_size must be in [1, 2**32 - 1], got {chunk_size}")
    if transfer_id is not None and len(transfer_id) != TRANSFER_ID_SIZE:
        raise ValueError(f"transfer_id must be {TRANSFER_ID_SIZE} bytes, got {len(transfer_id)}")
    total = len(message)
    if total <= chunk_size and not is_chunk(message):
        return [message]
    count = -(-total // chunk_size)
    if count > _U32_MAX:
        raise ValueError(f"{total} bytes need {count} chunks of {chunk_size}, over 2**32 - 1")
    tid = os.urandom(TRANSFER_ID_SIZE) if transfer_id is None else bytes(transfer_id)
    view = memoryview(message)
    message_digest = digest(view)
    chunks = []
    for index in range(count):
        part = view[index * chunk_size : (index + 1) * chunk_size]
        header = ChunkHeader(
            tid, index, count, total, chunk_size, zlib.crc32(part), message_digest
        ).pack()
        chunks.append(b"".join((header, part)))
    return chunks


def parse_chunk(
    data: Buffer, max_message_bytes: int | None = None
) -> tuple[ChunkHeader, memoryview]:
    """Parse one chunk and run every check that needs no other chunk; return header and data.

    ``max_message_bytes``, if given, bounds the declared ``total_size`` and is checked before
    anything that depends on it.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    if view[:4] != CHUNK_MAGIC:
        raise FrameError("chunk.magic", "bad magic, not a chunk")
    if size > 4 and view[4] != CHUNK_VERSION:
        raise UnsupportedError("chunk.version", f"version {view[4]}, expected {CHUNK_VERSION}")
    if size < CHUNK_HEADER_SIZE:
        raise FrameError("chunk.header", f"truncated: {size} bytes, the header needs 80")
    (_, _, flags, reserved, tid, index, count, total, chunk_size, crc, msg_digest) = (
        _HEADER.unpack_from(view)
    )
    if flags != 0:
        raise UnsupportedError("chunk.flags", f"unknown flags 0x{flags:02x}")
    if reserved != 0:
        raise UnsupportedError("chunk.reserved", f"0x{reserved:04x}, must be 0")
    if max_message_bytes is not None and total > max_message_bytes:
        raise SizeLimitError("chunk.total_size", f"{total} > limit {max_message_bytes}")
    if total == 0:
        raise ChunkError("chunk.total_size", "0: an empty message is never chunked")
    if count < 1:
        raise ChunkError("chunk.count", f"{count}, must be >= 1")
    if chunk_size < 1:
        raise ChunkError("chunk.chunk_size", f"{chunk_size}, must be >= 1")
    if index >= count:
        raise ChunkError("chunk.index", f"{index} >= count {count}")
    expected_count = -(-total // chunk_size)
    if count != expected_count:
        raise ChunkError(
            "chunk.count",
            f"{count} != ceil(total_size {total} / chunk_size {chunk_size}) = {expected_count}",
        )
    header = ChunkHeader(tid, index, count, total, chunk_size, crc, msg_digest)
    body = view[CHUNK_HEADER_SIZE:]
    if len(body) != header.data_size:
        raise FrameError(
            "chunk.data",
            f"{len(body)} bytes, chunk {index} of {count} must carry {header.data_size}",
        )
    if zlib.crc32(body) != crc:
        raise DigestMismatchError("chunk.crc32", f"CRC-32 of chunk {index} does not match")
    return header, body


@dataclass(slots=True)
class ReassemblerStats:
    """Counters of a ``Reassembler`` (``Reassembler.stats`` returns a snapshot)."""

    chunks_accepted: int = 0
    """Chunks stored (new data)."""
    duplicates: int = 0
    """Chunks ignored: already held, or of a transfer already completed or failed."""
    completed: int = 0
    """Messages reassembled and verified."""
    expired: int = 0
    """Transfers dropped by the timeout."""
    rejected: int = 0
    """Calls to ``add`` that raised a ``DecodeError``."""


@dataclass(slots=True)
class _Transfer:
    header: ChunkHeader  # of the first chunk received: every other chunk must agree with it
    reserved: int
    last_seen: float
    chunks: dict[int, bytes] = field(default_factory=dict)  # index -> whole chunk, header included


class Reassembler:
    """Collect chunks of concurrent transfers and return each message once it is complete.

    Memory is bounded: a transfer reserves its whole ``total_size`` against ``max_bytes`` when its
    first chunk arrives (at least 256 bytes per chunk, for the bookkeeping of tiny chunks), at most
    ``max_transfers`` are open at once, and a transfer idle for ``timeout`` seconds is dropped.
    QoS 1 redelivers, so duplicates and stragglers of a finished transfer are ignored.
    """

    def __init__(
        self,
        *,
        max_transfers: int = 16,
        max_bytes: int = DEFAULT_LIMITS.max_message_bytes,
        max_message_bytes: int = DEFAULT_LIMITS.max_message_bytes,
        timeout: float = 60.0,
        remember_completed: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_transfers < 1 or max_bytes < 1 or max_message_bytes < 1:
            raise ValueError("max_transfers, max_bytes and max_message_bytes must be >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if remember_completed < 0:
            raise ValueError(f"remember_completed must be >= 0, got {remember_completed}")
        self._max_transfers = max_transfers
        self._max_bytes = max_bytes
        self._max_message_bytes = max_message_bytes
        self._timeout = timeout
        self._remember_completed = remember_completed
        self._clock = clock
        self._transfers: dict[bytes, _Transfer] = {}
        self._finished: dict[bytes, None] = {}  # insertion-ordered: the oldest is evicted first
        self._reserved = 0
        self._stats = ReassemblerStats()

    @property
    def open_transfers(self) -> int:
        """Transfers started and not yet complete, failed or expired."""
        return len(self._transfers)

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved by the open transfers, counted against ``max_bytes``."""
        return self._reserved

    @property
    def stats(self) -> ReassemblerStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def add(self, data: Buffer) -> bytes | None:
        """Take one chunk; return the whole message if it completes its transfer, else None.

        Raises only ``DecodeError`` subtypes for bad input; a rejected chunk leaves every open
        transfer as it was (except a digest mismatch at completion, which discards its transfer).
        """
        now = self._clock()
        self.expire(now)
        try:
            return self._add(data, now)
        except DecodeError:
            self._stats.rejected += 1
            raise

    def expire(self, now: float | None = None) -> list[bytes]:
        """Drop transfers whose last chunk arrived more than ``timeout`` seconds ago; return ids."""
        if now is None:
            now = self._clock()
        stale = [tid for tid, t in self._transfers.items() if now - t.last_seen > self._timeout]
        for tid in stale:
            self._close(tid)
        self._stats.expired += len(stale)
        return stale

    def _add(self, data: Buffer, now: float) -> bytes | None:
        header, _ = parse_chunk(data, self._max_message_bytes)
        tid = header.transfer_id
        if tid in self._finished:
            self._stats.duplicates += 1
            return None
        transfer = self._transfers.get(tid)
        if transfer is None:
            transfer = self._open(header, now)
        else:
            _check_agrees(transfer.header, header)
        # Version, flags and reserved are fixed and the crc follows from the data, so equal data
        # means equal chunk bytes.
        chunk = data if isinstance(data, bytes) else bytes(data)
        held = transfer.chunks.get(header.index)
        if held is not None:
            if held == chunk:
                self._stats.duplicates += 1
                return None
            raise ChunkError(
                "chunk.data", f"chunk {header.index} arrived again with different data"
            )
        transfer.chunks[header.index] = chunk
        transfer.last_seen = now
        self._stats.chunks_accepted += 1
        if len(transfer.chunks) < header.count:
            return None
        return self._finish(tid, transfer)

    def _open(self, header: ChunkHeader, now: float) -> _Transfer:
        if len(self._transfers) >= self._max_transfers:
            raise SizeLimitError(
                "reassembler.transfers", f"{self._max_transfers} transfers already open"
            )
        cost = max(header.total_size, header.count * _MIN_CHARGE_PER_CHUNK)
        if self._reserved + cost > self._max_bytes:
            raise SizeLimitError(
                "chunk.total_size",
                f"transfer needs {cost} bytes, {self._max_bytes - self._reserved} of "
                f"max_bytes {self._max_bytes} left",
            )
        transfer = _Transfer(header, cost, now)
        self._transfers[header.transfer_id] = transfer
        self._reserved += cost
        return transfer

    def _close(self, tid: bytes) -> None:
        self._reserved -= self._transfers.pop(tid).reserved

    def _finish(self, tid: bytes, transfer: _Transfer) -> bytes:
        self._close(tid)
        if self._remember_completed:
            self._finished[tid] = None
            if len(self._finished) > self._remember_completed:
                del self._finished[next(iter(self._finished))]
        chunks = transfer.chunks
        message = b"".join(memoryview(chunks[i])[CHUNK_HEADER_SIZE:] for i in range(len(chunks)))
        if digest(message) != transfer.header.message_digest:
            raise DigestMismatchError("chunk.digest", "SHA-256 of the reassembled message differs")
        self._stats.completed += 1
        return message


def _check_agrees(first: ChunkHeader, other: ChunkHeader) -> None:
    for name in ("count", "total_size", "chunk_size", "message_digest"):
        if getattr(first, name) != getattr(other, name):
            raise ChunkError(
                f"chunk.{name}", f"chunk {other.index} disagrees with its transfer's first chunk"
            )
