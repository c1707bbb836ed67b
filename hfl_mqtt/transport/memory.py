"""An in-memory broker and link with the MQTT link's interface, for unit tests only.

It keeps retained messages, matches ``+`` and ``#`` filters, and fires a link's Last Will when
the link is killed; integration tests use a real Mosquitto instead.
"""

from __future__ import annotations

from paho.mqtt.client import topic_matches_sub

from hfl_mqtt.codec.chunking import DEFAULT_CHUNK_SIZE
from hfl_mqtt.errors import TransportError
from hfl_mqtt.transport.base import LinkBase

__all__ = ["MemoryBroker", "MemoryLink"]


class MemoryBroker:
    """Routes messages between ``MemoryLink`` s in one event loop."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.links: list[MemoryLink] = []
        self.published = 0

    async def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published += 1
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for link in list(self.links):
            if any(topic_matches_sub(f, topic) for f in link.filters):
                await link._arrived(topic, payload, False)

    async def subscribed(self, link: MemoryLink, topic_filter: str) -> None:
        for topic, payload in list(self.retained.items()):
            if topic_matches_sub(topic_filter, topic):
                await link._arrived(topic, payload, True)


class MemoryLink(LinkBase):
    """A link to a ``MemoryBroker``; ``kill()`` drops it as a crash would, firing its Will."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        status_topic: str | None = None,
        online_payload: bytes = b'{"state": "online"}',
        offline_payload: bytes = b'{"state": "offline"}',
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(chunk_size=chunk_size)
        self.broker = broker
        self.client_id = client_id
        self.filters: list[str] = []
        self._status_topic = status_topic
        self.online_payload = online_payload
        self._offline_payload = offline_payload
        self._is_open = False

    @property
    def connected(self) -> bool:
        return self._is_open

    async def _open(self) -> None:
        self.broker.links.append(self)
        self._is_open = True
        if self._status_topic is not None:
            await self._send(self._status_topic, self.online_payload, True)

    async def _close(self) -> None:
        if self._is_open and self._status_topic is not None:
            await self._send(self._status_topic, self._offline_payload, True)
        self._drop()

    async def kill(self) -> None:
        """Vanish without a goodbye: the broker publishes the Last Will."""
        self._drop()
        if self._status_topic is not None:
            await self.broker.publish(self._status_topic, self._offline_payload, True)

    def _drop(self) -> None:
        self._is_open = False
        if self in self.broker.links:
            self.broker.links.remove(self)

    async def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        if not self._is_open:
            raise TransportError(f"link {self.client_id} is closed")
        await self.broker.publish(topic, payload, retain)

    async def _subscribe(self, topic_filter: str) -> None:
        if topic_filter not in self.filters:
            self.filters.append(topic_filter)
        await self.broker.subscribed(self, topic_filter)

    async def _unsubscribe(self, topic_filter: str) -> None:
        if topic_filter in self.filters:
            self.filters.remove(topic_filter)
