"""The MQTT link: one aiomqtt client, kept connected, with the node's status and Last Will.

- MQTT 5 with a persistent session (clean start off, a session expiry), so QoS 1 messages
  queued at the broker survive a lost connection and a broker restart with persistence on.
- TCP_NODELAY on the client socket: without it a small QoS 1 round trip takes ~40 ms here.
- Reconnects with exponential backoff and jitter, re-subscribes, and re-publishes the node's
  online status; publishes wait for the connection and are retried after a reconnect (QoS 1 is
  at least once anyway: receivers drop duplicates).
- The Last Will marks the node offline when its connection dies; a clean exit publishes the
  same offline status itself.
- aiomqtt's errors are translated into ``TransportError`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from types import TracebackType
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hfl_mqtt.codec.chunking import DEFAULT_CHUNK_SIZE
from hfl_mqtt.errors import PublishTimeoutError, TransportError
from hfl_mqtt.transport.base import LinkBase

__all__ = ["MqttLink"]

log = structlog.get_logger("hfl_mqtt.transport")

SESSION_EXPIRY_S = 3600
ATTEMPT_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0
PUBLISH_FLOOR_BYTES_PER_S = 2_000_000
"""aiomqtt waits 10 s for an acknowledgement by default; a large payload gets 10 s plus one
second per 2 MB, so a slow link does not turn into a spurious timeout."""


class MqttLink(LinkBase):
    """A QoS 1 link to one broker, for one node (``client_id``)."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        status_topic: str | None = None,
        online_payload: bytes = b'{"state": "online"}',
        offline_payload: bytes = b'{"state": "offline"}',
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        keepalive: int = 15,
        connect_timeout: float = 20.0,
        protocol: str = "mqtt5",
        max_backoff: float = 5.0,
    ) -> None:
        super().__init__(chunk_size=chunk_size)
        self.host, self.port, self.client_id = host, port, client_id
        self._status_topic = status_topic
        self.online_payload = online_payload
        self._offline_payload = offline_payload
        self._keepalive = keepalive
        self._protocol = protocol
        self._connect_timeout = connect_timeout
        self._max_backoff = max_backoff
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._subscriptions: list[str] = []
        self._runner: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _new_client(self) -> aiomqtt.Client:
        will = None
        if self._status_topic is not None:
            will = aiomqtt.Will(self._status_topic, self._offline_payload, qos=1, retain=True)
        session: dict[str, Any]
        if self._protocol == "mqtt311":
            session = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": False}
        else:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": False,
                "properties": properties,
            }
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            **session,
            will=will,
            keepalive=self._keepalive,
            # One connect attempt (and a subscribe) may take this long; a broker that accepts
            # the socket but never answers is then retried within connect_timeout.
            timeout=ATTEMPT_TIMEOUT_S,
            max_inflight_messages=64,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def __aenter__(self) -> MqttLink:
        self._closing = False
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-link:{self.client_id}")
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives just as the connection is made, and the caller would carry on.
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._connected.wait()
        except TimeoutError:
            await self._stop_runner()
            raise TransportError(
                f"could not connect to the MQTT broker at {self.host}:{self.port} "
                f"within {self._connect_timeout:.0f} s"
            ) from None
        except BaseException:
            await self._stop_runner()  # cancelled while connecting: no runner outlives us
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._status_topic is not None and self.connected:
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self._send(self._status_topic, self._offline_payload, True)
        finally:
            self._closing = True
            await self._stop_runner()

    async def _stop_runner(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        self._connected.clear()

    async def _run(self) -> None:
        """Keep the client connected; read messages while it is."""
        client = self._new_client()
        backoff = 0.1
        while True:
            try:
                async with client:
                    self._client = client
                    for topic_filter in self._subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    if self._status_topic is not None:
                        await client.publish(
                            self._status_topic, self.online_payload, qos=1, retain=True
                        )
                    self._connected.set()
                    backoff = 0.1
                    log.debug("connected", client=self.client_id, port=self.port)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            await self._arrived(str(message.topic), bytes(payload), message.retain)
            except aiomqtt.MqttError as exc:
                self._connected.clear()
                self.reconnects += 1
                log.warning("connection lost", client=self.client_id, error=str(exc))
            self._connected.clear()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        timeout = PUBLISH_TIMEOUT_S + len(payload) / PUBLISH_FLOOR_BYTES_PER_S
        while True:
            if self._closing:
                raise TransportError(f"link {self.client_id} is closed")
            await self._connected.wait()
            client = self._client
            assert client is not None
            try:
                await client.publish(topic, payload, qos=1, retain=retain, timeout=timeout)
                return
            except aiomqtt.MqttError as exc:
                if self.connected and "timed out" in str(exc):
                    raise PublishTimeoutError(
                        f"publish of {len(payload)} bytes to {topic} not acknowledged "
                        f"within {timeout:.0f} s"
                    ) from None
                # The connection dropped: the reader notices, and the next turn waits for the
                # reconnect before publishing again.
                log.debug("publish failed, retrying", topic=topic, error=str(exc))
                await asyncio.sleep(0.05)

    async def _subscribe(self, topic_filter: str) -> None:
        self._subscriptions.append(topic_filter)
        if self._client is not None and self.connected:
            try:
                await self._client.subscribe(topic_filter, qos=1)
            except aiomqtt.MqttError as exc:
                # Subscriptions are replayed on reconnect; only a live refusal is an error.
                if self.connected:
                    raise TransportError(f"subscribe to {topic_filter} failed: {exc}") from None
