"""What every link does (``LinkBase``), exercised on the in-memory broker: delivery, chunking,
retained chunked models, garbage chunks, accounting, and the Last Will."""

from __future__ import annotations

import os
import zlib

import pytest
from structlog.testing import capture_logs

from hfl_mqtt.codec.chunking import CHUNK_HEADER_SIZE, CHUNK_MAGIC, split_message
from hfl_mqtt.errors import TransportError
from hfl_mqtt.topics import chunk_topic, ctl_topic, model_topic, status_topic, up_topic
from hfl_mqtt.transport.base import Incoming
from hfl_mqtt.transport.memory import MemoryBroker, MemoryLink

pytestmark = pytest.mark.anyio

MODEL = model_topic("f", "cloud")
UP = up_topic("f", "cloud", "w1")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def drain(link: MemoryLink) -> list[Incoming]:
    """Everything delivered to ``link`` so far (the memory broker delivers synchronously)."""
    items = []
    while (item := link.receive_nowait()) is not None:
        items.append(item)
    return items


async def test_publish_and_receive() -> None:
    broker = MemoryBroker()
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await b.subscribe("hfl/f/+/up/+")
        await a.publish(UP, b"delta")
        await a.publish(MODEL, b"not subscribed")
        assert await b.receive() == Incoming(UP, b"delta", retain=False)
        assert drain(b) == []
        assert drain(a) == []  # a subscribed to nothing


async def test_retained_reaches_a_late_subscriber_flagged_retained() -> None:
    broker = MemoryBroker()
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await a.publish(MODEL, b"v1", retain=True)
        await a.publish(MODEL, b"v2", retain=True)
        await b.subscribe(MODEL)
        assert drain(b) == [Incoming(MODEL, b"v2", retain=True)]
        await a.publish(MODEL, b"v3", retain=True)
        assert drain(b) == [Incoming(MODEL, b"v3", retain=False)]  # live: not flagged


async def test_chunked_publish_reassembles() -> None:
    broker = MemoryBroker()
    payload = os.urandom(1000)
    async with MemoryLink(broker, "a", chunk_size=64) as a, MemoryLink(broker, "b") as b:
        await b.subscribe(UP)
        await a.publish(UP, payload)
        assert broker.published == 16  # ceil(1000 / 64) MQTT messages
        assert drain(b) == [Incoming(UP, payload)]
        assert (a.stats.messages_sent, a.stats.bytes_sent) == (1, 1000)
        assert (b.stats.messages_received, b.stats.bytes_received) == (1, 1000)
        assert b.stats.chunks_rejected == 0


async def test_a_small_message_that_looks_like_a_chunk_still_arrives() -> None:
    broker = MemoryBroker()
    payload = CHUNK_MAGIC + b"just data"
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await b.subscribe(UP)
        await a.publish(UP, payload)
        assert drain(b) == [Incoming(UP, payload)]


def chunk_topics(broker: MemoryBroker) -> list[str]:
    return sorted(t for t in broker.retained if t.startswith(f"{MODEL}/chunk/"))


async def test_retained_chunked_model_reaches_a_late_subscriber() -> None:
    broker = MemoryBroker()
    payload = os.urandom(5000)
    async with MemoryLink(broker, "a", chunk_size=1024) as a:
        await a.publish(MODEL, payload, retain=True)
        assert chunk_topics(broker) == [chunk_topic(MODEL, i) for i in range(5)]
        assert MODEL not in broker.retained
        async with MemoryLink(broker, "late") as late, MemoryLink(broker, "naive") as naive:
            await late.subscribe(MODEL, chunked_retained=True)
            assert drain(late) == [Incoming(MODEL, payload, retain=True)]
            await naive.subscribe(MODEL)  # without the chunk sub-topics: nothing to assemble
            assert drain(naive) == []
            # A live chunked update reaches the subscriber too, once.
            second = os.urandom(3000)
            await a.publish(MODEL, second, retain=True)
            assert drain(late) == [Incoming(MODEL, second)]


async def test_shrinking_retained_model_clears_stale_chunks() -> None:
    broker = MemoryBroker()
    sizes_and_chunks = [(10 * 1024, 10), (3 * 1024, 3), (100, 0), (4 * 1024, 4), (5 * 1024, 5)]
    async with MemoryLink(broker, "a", chunk_size=1024) as a:
        for size, chunks in sizes_and_chunks:
            payload = os.urandom(size)
            await a.publish(MODEL, payload, retain=True)
            assert chunk_topics(broker) == sorted(chunk_topic(MODEL, i) for i in range(chunks))
            assert (MODEL in broker.retained) == (chunks == 0)
            async with MemoryLink(broker, f"late-{size}") as late:
                await late.subscribe(MODEL, chunked_retained=True)
                assert drain(late) == [Incoming(MODEL, payload, retain=True)]


def forged_chunks() -> list[tuple[bytes, str | None]]:
    """Chunk-looking payloads that cannot belong anywhere, and the field each is refused for."""
    good = split_message(os.urandom(300), 100)
    bad_crc = bytearray(good[0])
    bad_crc[-1] ^= 0xFF
    conflicting = split_message(os.urandom(300), 100, transfer_id=b"t" * 16)
    other_data = bytearray(conflicting[0])
    other_data[CHUNK_HEADER_SIZE:] = os.urandom(100)
    other_data[44:48] = zlib.crc32(other_data[CHUNK_HEADER_SIZE:]).to_bytes(4, "little")
    return [
        (CHUNK_MAGIC, "chunk.header"),  # truncated
        (CHUNK_MAGIC + b"\x01" + b"\x00" * 200, "chunk.total_size"),  # all sizes 0
        (CHUNK_MAGIC + b"\x07" + b"\x00" * 100, "chunk.version"),
        (bytes(bad_crc), "chunk.crc32"),
        (good[1][:-1], "chunk.data"),  # one data byte short
        (conflicting[0], None),  # accepted: the first chunk of a transfer
        (bytes(other_data), "chunk.data"),  # the same index again with other data
    ]


async def test_garbage_chunks_are_counted_never_raised() -> None:
    broker = MemoryBroker()
    forged = forged_chunks()
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await b.subscribe(UP)
        with capture_logs() as logs:
            for payload, _ in forged:
                await a._send(UP, payload, False)  # one raw MQTT message each
        assert b.stats.chunks_rejected == 6
        reasons = [e["reason"].split(":")[0] for e in logs if e["event"] == "chunk rejected"]
        assert reasons == [field for _, field in forged if field is not None]
        assert drain(b) == []
        assert b.stats.messages_received == 0
        # The link still works.
        await a.publish(UP, b"fine")
        assert drain(b) == [Incoming(UP, b"fine")]


async def test_redelivered_chunks_are_ignored() -> None:
    broker = MemoryBroker()
    payload = os.urandom(250)
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await b.subscribe(UP)
        chunks = split_message(payload, 100)
        for chunk in [chunks[0], chunks[0], chunks[1], chunks[2], chunks[2], chunks[1]]:
            await a._send(UP, chunk, False)  # QoS 1 may deliver each twice
        assert drain(b) == [Incoming(UP, payload)]
        assert b.stats.chunks_rejected == 0


async def test_empty_messages_are_not_delivered() -> None:
    broker = MemoryBroker()
    async with MemoryLink(broker, "a") as a, MemoryLink(broker, "b") as b:
        await b.subscribe(MODEL)
        await a.publish(MODEL, b"", retain=True)  # clears the retained topic
        assert drain(b) == []


async def test_stats_count_payload_bytes_per_topic_kind() -> None:
    broker = MemoryBroker()
    sent = {
        "model": (MODEL, 3000, True),  # chunked: chunk headers are not counted
        "up": (UP, 10, False),
        "status": (status_topic("f", "w1"), 20, True),
        "ctl": (ctl_topic("f", "w1"), 30, False),
        "other": ("elsewhere/x", 40, False),
    }
    async with MemoryLink(broker, "a", chunk_size=1024) as a, MemoryLink(broker, "b") as b:
        await b.subscribe("#")
        for topic, size, retain in sent.values():
            await a.publish(topic, os.urandom(size), retain=retain)
            await a.publish(topic, os.urandom(size), retain=retain)
        expected = {kind: [2, 2 * size] for kind, (_, size, _) in sent.items()}
        assert {k: v[:2] for k, v in a.stats.by_topic_kind.items()} == expected
        assert {k: v[2:] for k, v in b.stats.by_topic_kind.items()} == expected
        assert a.stats.messages_sent == b.stats.messages_received == 10
        assert a.stats.bytes_sent == b.stats.bytes_received == 2 * 3100


async def test_kill_fires_the_will() -> None:
    broker = MemoryBroker()
    status = status_topic("f", "w1")
    online, offline = b'{"state": "online"}', b'{"state": "offline"}'
    async with MemoryLink(broker, "watcher") as watcher:
        await watcher.subscribe(status)
        node = MemoryLink(broker, "w1", status_topic=status)
        await node.__aenter__()
        await node.subscribe(UP)
        assert drain(watcher) == [Incoming(status, online)]
        assert node in broker.links
        await node.kill()
        assert drain(watcher) == [Incoming(status, offline)]
        assert broker.retained[status] == offline
        assert not node.connected
        assert node not in broker.links
        with pytest.raises(TransportError, match="closed"):
            await node.publish(UP, b"x")
        await watcher.publish(UP, b"to the dead")
        assert drain(node) == []
        await node.__aexit__(None, None, None)  # after a kill: no second goodbye
        assert drain(watcher) == []


async def test_clean_exit_says_offline() -> None:
    broker = MemoryBroker()
    status = status_topic("f", "w1")
    async with MemoryLink(broker, "watcher") as watcher:
        await watcher.subscribe(status)
        async with MemoryLink(broker, "w1", status_topic=status, offline_payload=b"bye"):
            pass
        assert [m.payload for m in drain(watcher)] == [b'{"state": "online"}', b"bye"]
        assert broker.retained[status] == b"bye"


@pytest.mark.parametrize("senders", [2, 16, 64])
async def test_interleaved_chunked_messages_from_many_senders_all_arrive(senders: int) -> None:
    """A parent's link takes chunked deltas from all its children at once: a real broker
    interleaves their chunks (every child finishes training at about the same time)."""
    broker = MemoryBroker()
    payloads = {f"w{i}": os.urandom(2500) for i in range(senders)}
    async with MemoryLink(broker, "parent") as parent, MemoryLink(broker, "kids") as kids:
        await parent.subscribe("hfl/f/cloud/up/+")
        chunks = {child: split_message(p, 1000) for child, p in payloads.items()}
        for index in range(3):
            for child, parts in chunks.items():
                await kids._send(up_topic("f", "cloud", child), parts[index], False)
        received = {m.topic.rsplit("/", 1)[1]: m.payload for m in drain(parent)}
        assert parent.stats.chunks_rejected == 0
        assert received == payloads
