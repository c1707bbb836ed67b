"""Link shaping in the application layer: added one-way latency and a bandwidth cap.

A simulated device's link to its parent is slower than loopback. ``LinkShaper`` is the time
arithmetic of a serial link (no I/O, any clock): a message of N bytes occupies the link for
N / bandwidth after the previous one has gone through, and then travels ``latency`` more::

    start = max(now, link free at)      link free at = start + N / bandwidth
    delivered (or sent) at = link free at + latency

Latency is propagation: it overlaps between messages; the transmission time does not.
``ShapedLink`` applies it around a link (a ``Channel``), both directions, with no ``tc`` needed: a
publish is held until its time, a received message is handed over no earlier than its time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from hfl_mqtt.transport.base import Channel, Incoming

__all__ = ["LinkShaper", "ShapedLink"]


@dataclass
class LinkShaper:
    """When messages through a link with ``latency_s`` and byte rates (None: no cap) arrive."""

    latency_s: float = 0.0
    up_bytes_per_s: float | None = None
    down_bytes_per_s: float | None = None
    _send_free_at: float = field(default=float("-inf"), init=False)
    _receive_free_at: float = field(default=float("-inf"), init=False)

    @property
    def shapes(self) -> bool:
        """False if the link is left as it is (no latency, no caps)."""
        caps = (self.up_bytes_per_s, self.down_bytes_per_s)
        return self.latency_s > 0 or any(cap is not None for cap in caps)

    def send(self, size: int, now: float) -> float:
        """When a publish of ``size`` bytes asked for at ``now`` may go to the broker."""
        self._send_free_at = max(now, self._send_free_at) + _transfer_s(size, self.up_bytes_per_s)
        return self._send_free_at + self.latency_s

    def receive(self, size: int, arrived_at: float) -> float:
        """When a message of ``size`` bytes that arrived at ``arrived_at`` may be delivered."""
        start = max(arrived_at, self._receive_free_at)
        self._receive_free_at = start + _transfer_s(size, self.down_bytes_per_s)
        return self._receive_free_at + self.latency_s


def _transfer_s(size: int, bytes_per_s: float | None) -> float:
    return 0.0 if bytes_per_s is None else size / bytes_per_s


class ShapedLink:
    """``link`` as seen through ``shaper``: the publish, subscribe and receive of a link.

    A reader task (running while the context is entered) stamps each message as it comes out
    of ``link``, so messages arriving during a delay are timed from their own arrival.
    """

    def __init__(
        self,
        link: Channel,
        shaper: LinkShaper,
        *,
        clock: Callable[[], float] | None = None,
        max_pending: int = 1000,
    ) -> None:
        self.link = link
        self.shaper = shaper
        self._clock = clock
        self._staged: asyncio.Queue[tuple[float, Incoming]] = asyncio.Queue(max_pending)
        self._head: tuple[float, Incoming] | None = None
        self._reader: asyncio.Task[None] | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def __aenter__(self) -> ShapedLink:
        self._reader = asyncio.create_task(self._read(), name="shaped-link-reader")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def _read(self) -> None:
        while True:
            message = await self.link.receive()
            due = self.shaper.receive(len(message.payload), self._now())
            await self._staged.put((due, message))  # full: the inner inbox fills, as it would

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish once the link would have carried ``payload`` to the broker."""
        now = self._now()
        await asyncio.sleep(max(0.0, self.shaper.send(len(payload), now) - now))
        await self.link.publish(topic, payload, retain=retain)

    async def subscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        await self.link.subscribe(topic_filter, chunked_retained=chunked_retained)

    async def unsubscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        await self.link.unsubscribe(topic_filter, chunked_retained=chunked_retained)

    async def receive(self) -> Incoming:
        """The next message, no earlier than the shaper allows."""
        if self._head is None:
            self._head = await self._staged.get()
        due, message = self._head
        await asyncio.sleep(max(0.0, due - self._now()))
        self._head = None  # only now: a receive cancelled while waiting loses nothing
        return message

    def receive_nowait(self) -> Incoming | None:
        """The next message if it is due, else None."""
        if self._head is None:
            try:
                self._head = self._staged.get_nowait()
            except asyncio.QueueEmpty:
                return None
        due, message = self._head
        if due > self._now():
            return None
        self._head = None
        return message
