"""What every link does whatever carries it: chunking, reassembly, accounting, delivery.

A link publishes at QoS 1 and delivers whole messages. Messages larger than the chunk size are
split (``hfl_mqtt.codec.chunking``); a retained one is retained chunk by chunk on sub-topics
(``topic/chunk/{i}``) so that a late subscriber still gets every piece. Received chunks are
reassembled with bounded memory before delivery, and chunks that cannot belong anywhere are
dropped and counted, never raised into the node.

The lifecycle lives here too: a link is an async context manager, entered once; subclasses
provide ``_open`` and ``_close``. A link whose background work dies calls ``_fail``: every
caller waiting in ``receive`` (and every later call) gets that error instead of waiting forever.
The link remembers the last retained message of each topic it published, so that after a
reconnect a subclass can put back what a broker that lost its state no longer has
(``_restore``). Receivers take a model they have already seen as a sign that its sender came
back, and re-send what it may have lost (``roles/worker.py``).
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import structlog

from hfl_mqtt.codec.chunking import DEFAULT_CHUNK_SIZE, Reassembler, is_chunk, split_message
from hfl_mqtt.errors import DecodeError, HflError, TransportError
from hfl_mqtt.topics import chunk_topic

__all__ = ["Channel", "Incoming", "LinkBase", "LinkStats"]

log = structlog.get_logger("hfl_mqtt.transport")

_CHUNK_SUFFIX = re.compile(r"/chunk/[0-9]+$")
"""Where a retained chunk lives: ``{topic}/chunk/{i}`` (a node may be named ``chunk``)."""

T = TypeVar("T")

MAX_TRANSFERS = 1024
"""Chunked messages a link reassembles at once. A parent's link takes one from every child at
the same time (the broker interleaves their chunks), so this must be at least the fan-out; memory
stays bounded by the reassembler's byte budget, which every open transfer reserves against."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """One whole message as delivered to the node (chunk topics mapped back to their topic)."""

    topic: str
    payload: bytes
    retain: bool = False


class Channel(Protocol):
    """What a role uses of a link to send and receive: a ``LinkBase``, or something standing
    for one (a shaped link, a node's links to several brokers)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...
    async def subscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None: ...
    async def unsubscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None: ...
    async def receive(self) -> Incoming: ...
    def receive_nowait(self) -> Incoming | None: ...


@dataclass(slots=True)
class LinkStats:
    """Payload bytes and messages through one link (MQTT framing not included)."""

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    chunks_rejected: int = 0
    publishes_refused: int = 0
    """Publishes the broker refused (MQTT 5 PUBACK reason >= 128, e.g. 135 not authorized)."""
    reconnects: int = 0
    by_topic_kind: dict[str, list[int]] = field(default_factory=dict)

    def count_sent(self, kind: str, size: int) -> None:
        self.messages_sent += 1
        self.bytes_sent += size
        entry = self.by_topic_kind.setdefault(kind, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += size

    def count_received(self, kind: str, size: int) -> None:
        self.messages_received += 1
        self.bytes_received += size
        entry = self.by_topic_kind.setdefault(kind, [0, 0, 0, 0])
        entry[2] += 1
        entry[3] += size


def _topic_kind(topic: str) -> str:
    parts = topic.split("/")
    return parts[3] if len(parts) > 3 and parts[0] == "hfl" else "other"


class LinkBase(ABC):
    """A QoS 1 publish/subscribe link that chunks, reassembles and counts.

    Subclasses move single MQTT messages (``_send``, ``_subscribe``) and hand what arrives to
    ``_arrived``; users call ``publish``, ``subscribe`` and ``receive``.
    """

    online_payload: bytes = b'{"state": "online"}'
    """The status a link with a status topic publishes (retained) on every connect; a node
    that moves to another parent updates it (docs/reparenting.md)."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_pending: int = 1000,
        max_transfers: int = MAX_TRANSFERS,
    ) -> None:
        self.chunk_size = chunk_size
        self.stats = LinkStats()
        self._inbox: asyncio.Queue[Incoming] = asyncio.Queue(max_pending)
        self._queued = asyncio.Event()
        """Set while the inbox may hold a message (``wait_queued``)."""
        self._reassembler = Reassembler(max_transfers=max_transfers)
        self._retained_chunks: dict[str, int] = {}
        self._retained: dict[str, bytes] = {}
        """The last retained message this link published on each topic (put back by
        ``_restore`` after a reconnect: a broker restarted without persistence has lost it)."""
        self._entered = False
        self._failure: asyncio.Future[None] | None = None
        self.on_reject: Callable[[str, DecodeError], None] | None = None
        """Told of every chunk the reassembler refuses (the node counts it as a rejection)."""

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError(f"{type(self).__name__} is already open: enter it only once")
        self._entered = True
        self._failure = asyncio.get_running_loop().create_future()
        try:
            await self._open()
        except BaseException:
            self._entered = False
            self._failure = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._close()
        finally:
            self._entered = False
            if self._failure is not None and not self._failure.done():
                self._failure.cancel()
            self._failure = None

    @abstractmethod
    async def _open(self) -> None:
        """Connect (the caller waits until the link is usable or has failed)."""

    @abstractmethod
    async def _close(self) -> None:
        """Say goodbye (offline status) and disconnect."""

    def _fail(self, error: HflError) -> None:
        """The link cannot go on: ``error`` reaches every caller of ``receive`` and ``publish``."""
        if self._failure is not None and not self._failure.done():
            self._failure.set_exception(error)
            self._failure.exception()  # retrieved here: callers re-raise it, none must

    def _check_open(self) -> None:
        """Raise the link's failure, or ``TransportError`` if it is not open."""
        if self._failure is None:
            raise TransportError(f"{type(self).__name__} is not open: use it as `async with`")
        if self._failure.done() and not self._failure.cancelled():
            raise self._failure.exception()  # type: ignore[misc]

    async def _or_failure(self, waiting: Callable[[], Awaitable[T]]) -> T:
        """Await ``waiting()`` unless the link fails first (then raise its error)."""
        self._check_open()
        assert self._failure is not None
        task = asyncio.ensure_future(waiting())
        failure: asyncio.Future[Any] = self._failure
        try:
            await asyncio.wait({task, failure}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        self._check_open()
        raise AssertionError("unreachable")

    async def _restore(self) -> None:
        """After a reconnect (the subscriptions back in place): publish again the retained
        messages this link owns. Receivers drop what they have seen by its update id."""
        for topic, payload in list(self._retained.items()):
            await self._publish_retained(topic, split_message(payload, self.chunk_size))

    # --- messages -------------------------------------------------------------------------------

    @abstractmethod
    async def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        """Publish one MQTT message at QoS 1 and wait for the broker's acknowledgement."""

    @abstractmethod
    async def _subscribe(self, topic_filter: str) -> None:
        """Subscribe at QoS 1."""

    @abstractmethod
    async def _unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription (not replayed after a reconnect any more)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish a whole message at QoS 1, chunked if larger than the chunk size."""
        self._check_open()
        parts = split_message(payload, self.chunk_size)
        kind = _topic_kind(topic)
        if retain:
            self._retained[topic] = payload
            await self._publish_retained(topic, parts)
        else:
            for part in parts:
                await self._send(topic, part, False)
        self.stats.count_sent(kind, len(payload))

    async def _publish_retained(self, topic: str, parts: list[bytes]) -> None:
        chunked = len(parts) > 1
        stale = self._retained_chunks.get(topic, 0)
        if chunked:
            for index, part in enumerate(parts):
                await self._send(chunk_topic(topic, index), part, True)
            await self._send(topic, b"", True)  # an empty retained message clears the topic
        else:
            await self._send(topic, parts[0], True)
        # Chunks of an earlier, larger version would otherwise stay retained.
        for index in range(len(parts) if chunked else 0, stale):
            await self._send(chunk_topic(topic, index), b"", True)
        self._retained_chunks[topic] = len(parts) if chunked else 0

    async def subscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        """Subscribe; with ``chunked_retained`` also to the chunk sub-topics of retained topics."""
        self._check_open()
        await self._subscribe(topic_filter)
        if chunked_retained:
            await self._subscribe(f"{topic_filter}/chunk/+")

    async def unsubscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        """Undo ``subscribe`` (with the same ``chunked_retained``)."""
        self._check_open()
        await self._unsubscribe(topic_filter)
        if chunked_retained:
            await self._unsubscribe(f"{topic_filter}/chunk/+")

    async def receive(self) -> Incoming:
        """The next whole message (the link's error if it fails meanwhile)."""
        message = self.receive_nowait()
        if message is not None:
            return message
        return await self._or_failure(self._inbox.get)

    def receive_nowait(self) -> Incoming | None:
        """The next whole message if one is waiting, else None (the link's error if it failed;
        what arrived before the link was closed can still be read)."""
        try:
            return self._inbox.get_nowait()
        except asyncio.QueueEmpty:
            self._queued.clear()
            if self._failure is not None and self._failure.done():
                self._check_open()
            return None

    async def wait_queued(self) -> None:
        """Until a message is waiting (the link's error if it fails first), without taking
        it: a reader that forwards messages elsewhere (``roles/uplinks.py``) then takes it
        with ``receive_nowait``, so no message is ever in nobody's hands between two steps."""
        if not self._inbox.empty():
            return
        self._queued.clear()
        await self._or_failure(self._queued.wait)

    async def _arrived(self, topic: str, payload: bytes, retain: bool) -> None:
        """Reassemble if needed and queue; called by subclasses for every MQTT message.

        Waits while the inbox is full, so a node that falls behind slows its reader down.
        """
        if not payload:
            return  # a cleared retained topic
        chunk = _CHUNK_SUFFIX.search(topic)
        base_topic = topic[: chunk.start()] if chunk else topic
        if is_chunk(payload):
            try:
                whole = self._reassembler.add(payload)
            except DecodeError as exc:
                self.stats.chunks_rejected += 1
                if self.on_reject is not None:
                    self.on_reject(base_topic, exc)
                else:
                    log.warning("chunk rejected", topic=topic, reason=str(exc))
                return
            if whole is None:
                return
            payload = whole
        self.stats.count_received(_topic_kind(base_topic), len(payload))
        await self._inbox.put(Incoming(base_topic, payload, retain))
        self._queued.set()
