"""Chunking: split/reassemble round trips, limits, timeouts, and hostile chunks."""

from __future__ import annotations

import dataclasses
import random
import tracemalloc
import zlib
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfl_mqtt.codec.chunking import (
    CHUNK_HEADER_SIZE,
    CHUNK_MAGIC,
    DEFAULT_CHUNK_SIZE,
    ChunkHeader,
    Reassembler,
    is_chunk,
    parse_chunk,
    split_message,
)
from hfl_mqtt.codec.digest import digest
from hfl_mqtt.errors import (
    ChunkError,
    DecodeError,
    DigestMismatchError,
    FrameError,
    SizeLimitError,
    UnsupportedError,
)

CS = 512  # small for fast tests; >= 2x the per-chunk charge (256), so reserved == total_size


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def feed(reassembler: Reassembler, chunks: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
    """Add every chunk; return the messages that came out."""
    out = []
    for chunk in chunks:
        message = reassembler.add(chunk)
        if message is not None:
            out.append(message)
    return out


def forge(chunk: bytes, *, fix_crc: bool = True, data: bytes | None = None, **fields: int) -> bytes:
    """Rewrite header fields (and optionally the data) of a valid chunk."""
    header, body = parse_chunk(chunk)
    new_data = bytes(body) if data is None else data
    header = dataclasses.replace(header, **fields)  # type: ignore[arg-type]
    if fix_crc:
        header = dataclasses.replace(header, crc32=zlib.crc32(new_data))
    return header.pack() + new_data


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- splitting and round trips -----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS])
def test_small_message_travels_unchanged(size: int) -> None:
    message = payload(size)
    assert split_message(message, CS) == [message]
    assert split_message(message, CS)[0] is message
    assert not is_chunk(message)


@pytest.mark.parametrize("size", [CS + 1, 2 * CS, 2 * CS + 1, 5 * CS - 1, 7 * CS])
def test_round_trip_in_order(size: int) -> None:
    message = payload(size)
    chunks = split_message(message, CS)
    assert len(chunks) == -(-size // CS)
    headers = [parse_chunk(c)[0] for c in chunks]
    assert {h.transfer_id for h in headers} == {headers[0].transfer_id}
    assert [h.index for h in headers] == list(range(len(chunks)))
    assert all(len(c) == CHUNK_HEADER_SIZE + CS for c in chunks[:-1])
    assert headers[-1].data_size == size - (len(chunks) - 1) * CS
    assert all(is_chunk(c) for c in chunks)

    r = Reassembler()
    for chunk in chunks[:-1]:
        assert r.add(chunk) is None
        assert r.reserved_bytes == size
    assert r.add(chunks[-1]) == message
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)
    stats = r.stats
    assert (stats.chunks_accepted, stats.completed, stats.duplicates) == (len(chunks), 1, 0)


def test_chunk_size_one_and_buffer_inputs() -> None:
    message = b"hello"
    chunks = split_message(message, 1)
    assert len(chunks) == 5
    mixed: list[bytes | bytearray | memoryview] = [bytearray(c) for c in chunks[:3]]
    mixed += [memoryview(c) for c in chunks[3:]]
    assert feed(Reassembler(), mixed) == [message]


def test_default_chunk_size_is_one_mebibyte() -> None:
    message = payload(DEFAULT_CHUNK_SIZE + 1)
    chunks = split_message(message)
    assert [len(c) for c in chunks] == [
        CHUNK_HEADER_SIZE + DEFAULT_CHUNK_SIZE,
        CHUNK_HEADER_SIZE + 1,
    ]
    assert feed(Reassembler(), chunks) == [message]


def test_small_message_starting_with_magic_is_wrapped() -> None:
    # Otherwise the receiver would take it for a chunk.
    message = CHUNK_MAGIC + b"\x01 not a chunk"
    chunks = split_message(message, CS)
    assert len(chunks) == 1
    assert parse_chunk(chunks[0])[0].count == 1
    assert feed(Reassembler(), chunks) == [message]


def test_transfer_ids() -> None:
    message = payload(3 * CS)
    tid = bytes(range(16))
    assert parse_chunk(split_message(message, CS, tid)[0])[0].transfer_id == tid
    ids = {parse_chunk(split_message(message, CS)[0])[0].transfer_id for _ in range(8)}
    assert len(ids) == 8


@pytest.mark.parametrize(
    ("chunk_size", "transfer_id"), [(0, None), (-1, None), (2**32, None), (CS, b"x" * 15)]
)
def test_split_rejects_bad_arguments(chunk_size: int, transfer_id: bytes | None) -> None:
    with pytest.raises(ValueError, match=r"chunk_size|transfer_id"):
        split_message(payload(3 * CS), chunk_size, transfer_id)


def test_parse_chunk_returns_header_and_data() -> None:
    message = payload(2 * CS + 10)
    chunk = split_message(message, CS)[2]
    header, data = parse_chunk(chunk)
    assert header == ChunkHeader(
        header.transfer_id, 2, 3, 2 * CS + 10, CS, zlib.crc32(message[2 * CS :]), digest(message)
    )
    assert isinstance(data, memoryview)
    assert data == message[2 * CS :]
    assert header.pack() == chunk[:CHUNK_HEADER_SIZE]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_transfers": 0},
        {"max_bytes": 0},
        {"max_message_bytes": 0},
        {"timeout": 0.0},
        {"remember_completed": -1},
    ],
)
def test_reassembler_rejects_bad_configuration(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        Reassembler(**kwargs)  # type: ignore[arg-type]


# --- order, duplicates, interleaving ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size=st.integers(2, 40 * 8), data=st.data())
def test_any_order_reassembles(size: int, data: st.DataObject) -> None:
    message = payload(size, seed=size)
    chunk_size = data.draw(st.integers(1, min(size - 1, 40)))
    chunks = data.draw(st.permutations(split_message(message, chunk_size)))
    assert feed(Reassembler(), chunks) == [message]


@settings(max_examples=60, deadline=None)
@given(size=st.integers(CS + 1, 6 * CS), data=st.data())
def test_duplicates_give_the_message_once(size: int, data: st.DataObject) -> None:
    message = payload(size, seed=size)
    chunks = split_message(message, CS)
    extra = data.draw(st.lists(st.sampled_from(chunks), min_size=1, max_size=10))
    order = data.draw(st.permutations(chunks + extra))
    r = Reassembler()
    assert feed(r, order) == [message]
    stats = r.stats
    assert (stats.chunks_accepted, stats.duplicates, stats.completed) == (
        len(chunks),
        len(extra),
        1,
    )
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(CS + 1, 5 * CS), min_size=2, max_size=4), data=st.data())
def test_interleaved_transfers(sizes: list[int], data: st.DataObject) -> None:
    messages = [payload(n, seed=i) for i, n in enumerate(sizes)]
    chunks = [c for m in messages for c in split_message(m, CS)]
    r = Reassembler()
    out = feed(r, data.draw(st.permutations(chunks)))
    assert sorted(out) == sorted(messages)
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)


def test_stragglers_of_completed_transfer_are_ignored() -> None:
    message = payload(3 * CS)
    chunks = split_message(message, CS)
    r = Reassembler()
    assert feed(r, chunks) == [message]
    assert feed(r, chunks) == []
    assert r.open_transfers == 0
    assert r.stats.duplicates == 3


def test_completed_ids_are_remembered_within_a_bound() -> None:
    transfers = [split_message(payload(2 * CS, seed=i), CS) for i in range(3)]
    r = Reassembler(remember_completed=2)
    for chunks in transfers:
        assert len(feed(r, chunks)) == 1
    assert r.add(transfers[2][0]) is None
    assert r.open_transfers == 0
    # The oldest id was forgotten: its straggler opens a transfer again (which will expire).
    assert r.add(transfers[0][0]) is None
    assert r.open_transfers == 1


# --- timeout ------------------------------------------------------------------------------------


def test_timeout_frees_reserved_bytes() -> None:
    clock = FakeClock()
    r = Reassembler(timeout=10.0, clock=clock)
    old = split_message(payload(4 * CS), CS)
    assert r.add(old[0]) is None
    assert r.reserved_bytes == 4 * CS
    clock.now = 8.0
    assert r.add(old[1]) is None  # activity keeps the transfer alive
    clock.now = 18.0
    assert r.expire() == []
    clock.now = 18.5
    assert r.expire() == [parse_chunk(old[0])[0].transfer_id]
    assert (r.open_transfers, r.reserved_bytes, r.stats.expired) == (0, 0, 1)


def test_add_purges_expired_transfers_first() -> None:
    clock = FakeClock()
    r = Reassembler(max_transfers=1, timeout=5.0, clock=clock)
    stalled = split_message(payload(3 * CS, seed=1), CS)
    fresh = split_message(payload(3 * CS, seed=2), CS)
    r.add(stalled[0])
    with pytest.raises(SizeLimitError):
        r.add(fresh[0])
    clock.now = 6.0
    assert feed(r, fresh) == [payload(3 * CS, seed=2)]
    assert r.stats.expired == 1
    assert r.expire(now=1e9) == []


# --- limits -------------------------------------------------------------------------------------


def test_max_transfers() -> None:
    messages = [payload(3 * CS, seed=i) for i in range(3)]
    a, b, c = (split_message(m, CS) for m in messages)
    r = Reassembler(max_transfers=2)
    r.add(a[0])
    r.add(b[0])
    with pytest.raises(SizeLimitError) as excinfo:
        r.add(c[0])
    assert excinfo.value.field == "reassembler.transfers"
    assert (r.open_transfers, r.reserved_bytes) == (2, 6 * CS)
    assert feed(r, a[1:]) == [messages[0]]
    assert feed(r, c) == [messages[2]]
    assert feed(r, b[1:]) == [messages[1]]
    assert r.stats.rejected == 1


def test_max_bytes() -> None:
    big, other = payload(4 * CS, seed=1), payload(4 * CS, seed=2)
    a, b = split_message(big, CS), split_message(other, CS)
    r = Reassembler(max_bytes=6 * CS)
    r.add(a[0])
    with pytest.raises(SizeLimitError) as excinfo:
        r.add(b[0])
    assert excinfo.value.field == "chunk.total_size"
    assert (r.open_transfers, r.reserved_bytes) == (1, 4 * CS)
    assert feed(r, a[1:]) == [big]
    assert feed(r, b) == [other]


def test_tiny_chunks_are_charged_for_their_bookkeeping() -> None:
    chunks = split_message(payload(100), 1)
    r = Reassembler(max_bytes=100 * 256 - 1)
    with pytest.raises(SizeLimitError):
        r.add(chunks[0])
    r = Reassembler(max_bytes=100 * 256)
    r.add(chunks[0])
    assert r.reserved_bytes == 100 * 256


def test_max_message_bytes_rejects_at_first_chunk() -> None:
    ok, too_big = payload(2 * CS, seed=1), payload(4 * CS + 1, seed=2)
    a, b = split_message(ok, CS), split_message(too_big, CS)
    r = Reassembler(max_message_bytes=4 * CS)
    r.add(a[0])
    for chunk in b:
        with pytest.raises(SizeLimitError) as excinfo:
            r.add(chunk)
        assert excinfo.value.field == "chunk.total_size"
    assert (r.open_transfers, r.reserved_bytes) == (1, 2 * CS)
    assert feed(r, a[1:]) == [ok]


# --- conflicts and digests ----------------------------------------------------------------------


def test_conflicting_duplicate_keeps_the_first() -> None:
    message = payload(3 * CS)
    chunks = split_message(message, CS)
    evil = forge(chunks[1], data=bytes(CS))
    r = Reassembler()
    r.add(chunks[0])
    r.add(chunks[1])
    with pytest.raises(ChunkError) as excinfo:
        r.add(evil)
    assert excinfo.value.field == "chunk.data"
    assert r.add(chunks[2]) == message


@pytest.mark.parametrize(
    ("other_size", "field"), [(3 * CS, "chunk.message_digest"), (2 * CS, "chunk.count")]
)
def test_chunk_disagreeing_with_its_transfer(other_size: int, field: str) -> None:
    tid = b"t" * 16
    message = payload(3 * CS, seed=1)
    chunks = split_message(message, CS, tid)
    intruder = split_message(payload(other_size, seed=2), CS, tid)[1]
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(ChunkError) as excinfo:
        r.add(intruder)
    assert excinfo.value.field == field
    assert feed(r, chunks[1:]) == [message]


def test_digest_mismatch_discards_transfer_and_ignores_stragglers() -> None:
    message = payload(3 * CS)
    chunks = split_message(message, CS)
    tampered = forge(chunks[1], data=bytes(CS))  # valid crc, wrong content
    r = Reassembler()
    r.add(chunks[0])
    r.add(tampered)
    with pytest.raises(DigestMismatchError) as excinfo:
        r.add(chunks[2])
    assert excinfo.value.field == "chunk.digest"
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)
    assert feed(r, chunks) == []
    assert r.open_transfers == 0
    assert r.stats.completed == 0


# --- hostile input ------------------------------------------------------------------------------


def add_safely(r: Reassembler, chunk: bytes | bytearray, message: bytes) -> bool:
    """Add a chunk: it may be rejected or held, but never yield anything but ``message``."""
    try:
        out = r.add(chunk)
    except DecodeError:
        return False
    assert out is None or out == message
    return True


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: CHUNK_MAGIC + b"\x01" + b))
def test_random_bytes(data: bytes) -> None:
    add_safely(Reassembler(), data, b"")


@pytest.mark.parametrize("which", [0, -1])
def test_every_truncation_is_rejected(which: int) -> None:
    message = payload(2 * CS + 7)
    chunk = split_message(message, CS)[which]
    r = Reassembler()
    for end in range(len(chunk)):
        with pytest.raises(DecodeError):
            r.add(chunk[:end])
    assert (r.open_transfers, r.stats.rejected) == (0, len(chunk))


@pytest.mark.parametrize("which", [1, -1])
def test_every_bit_flip_is_harmless(which: int) -> None:
    chunk_size = 64
    message = payload(3 * chunk_size - 5)
    chunks = split_message(message, chunk_size)
    original = chunks[which]
    for bit in range(len(original) * 8):
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        r = Reassembler(max_message_bytes=1 << 16, max_bytes=1 << 16)
        if not add_safely(r, flipped, message):
            continue
        # The flip went unnoticed by the per-chunk checks (transfer id, index, digest...): the
        # real chunks either still give the exact message, or are rejected.
        for chunk in chunks:
            add_safely(r, chunk, message)
        assert r.open_transfers <= 1
        assert r.reserved_bytes <= 3 * 256


def test_header_mutations() -> None:
    chunks = split_message(payload(3 * CS - 5), CS)
    chunk, last = chunks[1], chunks[2]

    def raw(offset: int, value: bytes) -> bytes:
        return chunk[:offset] + value + chunk[offset + len(value) :]

    cases: list[tuple[bytes, type[DecodeError], str]] = [
        (raw(0, b"HFLX"), FrameError, "chunk.magic"),
        (raw(4, b"\x02"), UnsupportedError, "chunk.version"),
        (raw(5, b"\x01"), UnsupportedError, "chunk.flags"),
        (raw(6, b"\x00\x01"), UnsupportedError, "chunk.reserved"),
        (forge(chunk, index=3), ChunkError, "chunk.index"),
        (forge(chunk, index=2**32 - 1), ChunkError, "chunk.index"),
        (forge(chunk, count=4), ChunkError, "chunk.count"),
        (forge(chunk, count=0, index=0), ChunkError, "chunk.count"),
        (forge(chunk, chunk_size=0), ChunkError, "chunk.chunk_size"),
        (forge(chunk, total_size=0), ChunkError, "chunk.total_size"),
        (forge(chunk, total_size=3 * CS + 1), ChunkError, "chunk.count"),
        (forge(chunk, index=2), FrameError, "chunk.data"),
        (forge(last, total_size=3 * CS - 1), FrameError, "chunk.data"),
        (chunk + b"\x00", FrameError, "chunk.data"),
        (forge(chunk, fix_crc=False, crc32=0), DigestMismatchError, "chunk.crc32"),
    ]
    for bad, error, field in cases:
        r = Reassembler()
        with pytest.raises(error) as excinfo:
            r.add(bad)
        assert excinfo.value.field == field, (bad[:CHUNK_HEADER_SIZE].hex(), field)
        assert field in str(excinfo.value)
        assert r.open_transfers == 0


def huge_chunk(total_size: int) -> bytes:
    """A self-consistent header claiming ``total_size`` bytes, carrying a few bytes of data."""
    chunk_size = 2**32 - 1
    count = -(-total_size // chunk_size)
    data = b"x" * 16
    header = ChunkHeader(
        b"h" * 16, count - 1, count, total_size, chunk_size, zlib.crc32(data), bytes(32)
    )
    return header.pack() + data


@pytest.mark.parametrize("total_size", [2**63, 2**64 - 2**33, 600 << 20])
def test_huge_claimed_size_is_rejected_without_allocating(total_size: int) -> None:
    chunk = huge_chunk(total_size)
    r = Reassembler()
    tracemalloc.start()
    try:
        with pytest.raises(SizeLimitError) as excinfo:
            r.add(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert excinfo.value.field == "chunk.total_size"
    assert peak < 64 << 10
    assert (r.open_transfers, r.reserved_bytes) == (0, 0)
    # Without a limit the stateless parser still refuses it: the data is not what was declared.
    with pytest.raises(FrameError):
        parse_chunk(chunk)


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, 2**32 - 1),
    count=st.integers(0, 2**32 - 1),
    total_size=st.integers(0, 2**64 - 1) | st.integers(0, 1 << 12),
    chunk_size=st.integers(0, 2**32 - 1) | st.integers(0, 64),
    data=st.binary(max_size=80),
)
def test_arbitrary_header_fields(
    index: int, count: int, total_size: int, chunk_size: int, data: bytes
) -> None:
    header = ChunkHeader(
        b"f" * 16, index, count, total_size, chunk_size, zlib.crc32(data), bytes(32)
    )
    chunk = header.pack() + data
    r = Reassembler(max_message_bytes=1 << 20, max_bytes=1 << 20)
    if total_size > 1 << 20:
        with pytest.raises(SizeLimitError):
            r.add(chunk)
    elif add_safely(r, chunk, b""):
        assert r.reserved_bytes <= 1 << 20
    else:
        assert r.open_transfers == 0
