"""The MQTT link: one aiomqtt client, kept connected, with the node's status and Last Will.

- MQTT 5 with a persistent session (clean start off, a session expiry), so QoS 1 messages
  queued at the broker survive a lost connection and a broker restart with persistence on.
  A reader that needs nothing queued for it (the monitor) asks for ``persistent_session=False``:
  the broker then keeps nothing for it once it goes.
- TLS (a CA, optionally a client certificate) and a username and password, when given.
- TCP_NODELAY on the client socket: without it a small QoS 1 round trip takes ~40 ms here.
- Reconnects with exponential backoff and jitter (at most ``max_backoff`` seconds apart),
  re-subscribes, re-publishes the node's online status, then puts back what the broker may have
  lost (``LinkBase._restore``: retained messages, and what the node's reconnect hooks re-send).
  A broker restarted without persistence, or one that expired our session, has forgotten our
  subscriptions, our retained model and the messages it had queued; with persistence, whatever
  changed since its last save. Receivers drop duplicates by update id, so putting back is safe.
- Publishes wait for the connection and are retried after a reconnect (QoS 1 is at least once
  anyway). A publish the broker refuses (PUBACK reason >= 128, e.g. 135 when the ACL denies the
  topic) raises ``PublishRefusedError``; one not acknowledged in time while connected raises
  ``PublishTimeoutError``.
- A connection refused for a reason retrying cannot fix (bad credentials, not authorized, a TLS
  certificate that fails verification) fails the link at once with ``AuthenticationError``
  naming the broker and the reason; network failures are retried.
- The Last Will marks the node offline when its connection dies; a clean exit publishes the
  same offline status itself.
- aiomqtt's and paho's errors are translated into ``TransportError`` here and nowhere else, by
  type and reason code, never by the text of a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hfl_mqtt.codec.chunking import DEFAULT_CHUNK_SIZE
from hfl_mqtt.config import TlsConfig
from hfl_mqtt.errors import (
    AuthenticationError,
    ConfigError,
    PublishRefusedError,
    PublishTimeoutError,
    TransportError,
)
from hfl_mqtt.transport.base import LinkBase

__all__ = ["MqttLink", "tls_context"]

log = structlog.get_logger("hfl_mqtt.transport")

SESSION_EXPIRY_S = 3600
ATTEMPT_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0
PUBLISH_FLOOR_BYTES_PER_S = 2_000_000
"""A publish waits 10 s for its acknowledgement, plus one second per 2 MB, so a slow link does
not turn into a spurious timeout."""
SUBSCRIBE_BATCH = 100
"""Topic filters per SUBSCRIBE packet when subscriptions are replayed after a reconnect (a root
watching a thousand children's statuses re-subscribes in ten round trips, not a thousand)."""

_FATAL_CONNACK = {
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}
"""CONNACK reason codes (MQTT 5 numbering; paho maps MQTT 3.1.1's 1, 2, 4, 5 onto them) that
no retry can fix."""


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSL context for ``tls``: its CA (or the system's), its client certificate if any.

    ``ConfigError`` if a file cannot be read or holds no usable certificate or key.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file is not None else None
        )
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        files = [f for f in (tls.ca_file, tls.cert_file, tls.key_file) if f is not None]
        raise ConfigError(
            f"tls: cannot load {', '.join(map(str, files))}: {exc.strerror or exc}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _ConnectionLostError(Exception):
    """A publish was in flight when the connection dropped: send it again after reconnecting."""


class _Client(aiomqtt.Client):
    """aiomqtt's client, told what aiomqtt 2 does not pass on: the reason code of each PUBACK,
    whether the broker still had our session, and the TLS error of a failed handshake.

    Publishing goes through ``publish_acked``, which waits for the PUBACK itself. This relies on
    aiomqtt 2's ``_client`` (the paho client) and callback methods; aiomqtt is pinned below 3.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session_present = False
        self.tls_error: ssl.SSLError | None = None
        self._acks: dict[int, asyncio.Future[ReasonCode | None]] = {}
        paho_client: paho.Client = self._client
        receive = paho_client._sock_recv

        def keep_tls_error(size: int) -> bytes:
            # paho logs a failed read and keeps only "connection lost": keep the TLS alert.
            try:
                return receive(size)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                self.tls_error = exc
                raise

        paho_client._sock_recv = keep_tls_error  # type: ignore[method-assign, assignment]

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # aiomqtt schedules add_writer(fd) from paho's callback; if the connection drops before
        # the loop runs it, the socket is closed and add_writer raises (EBADF) inside the event
        # loop, or the number already names another socket. Register only a socket still open.
        def callback() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # paho: the connection broke; aiomqtt's own handling
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            current = client.socket()
            if current is not None and current is sock and current.fileno() != -1:
                self._loop.add_writer(current.fileno(), callback)

        self._loop.call_soon_threadsafe(register)

    def settle(self) -> None:
        """After the client's context: mark the disconnect's error as seen. aiomqtt's exit
        leaves it unretrieved when the connection dropped first (asyncio then logs "Future
        exception was never retrieved"); the link has logged the loss already."""
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()

    def _client_connect(self) -> None:
        try:
            super()._client_connect()
        except ssl.SSLError as exc:
            self.tls_error = exc  # aiomqtt keeps only the text
            raise

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            # Lost before the CONNACK: end the connect now, not at its timeout (under TLS 1.3
            # a broker refuses a client certificate with an alert only after the handshake).
            self._connected.set_exception(aiomqtt.MqttError("connection lost while connecting"))
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(_ConnectionLostError())
        self._acks.clear()
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        ack = self._acks.pop(mid, None)
        if ack is not None and not ack.done():
            ack.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(
        self, topic: str, payload: bytes, *, retain: bool, timeout: float
    ) -> ReasonCode | None:
        """Publish at QoS 1 and return the PUBACK's reason code (None from an MQTT 3.1.1
        broker). ``TimeoutError`` if no PUBACK within ``timeout``; ``_ConnectionLostError`` if the
        connection drops first."""
        paho_client: paho.Client = self._client
        info = paho_client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise _ConnectionLostError()  # not connected: paho refuses at once
        ack: asyncio.Future[ReasonCode | None] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = ack
        try:
            async with asyncio.timeout(timeout):
                reason = await ack
        finally:
            self._acks.pop(info.mid, None)
        return reason if isinstance(reason, ReasonCode) else None


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
        max_backoff: float = 2.0,
        tls: TlsConfig | None = None,
        username: str | None = None,
        password: str | None = None,
        persistent_session: bool = True,
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
        self._tls = tls_context(tls) if tls is not None else None
        self._username = username
        self._password = password  # never logged
        self._persistent = persistent_session
        self._client: _Client | None = None
        self._connected = asyncio.Event()
        self._generation = 0
        """Connections made so far: a subscribe that fails on connection n is replayed on n+1."""
        self._closing = False
        self._subscriptions: list[str] = []
        self._runner: asyncio.Task[None] | None = None
        self._restoring: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"MqttLink({self.client_id!r} at {self.broker})"

    @property
    def broker(self) -> str:
        """``host:port``, and the user if any (for messages)."""
        user = f"{self._username}@" if self._username else ""
        return f"{user}{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def reconnects(self) -> int:
        return self.stats.reconnects

    def _new_client(self) -> _Client:
        will = None
        if self._status_topic is not None:
            will = aiomqtt.Will(self._status_topic, self._offline_payload, qos=1, retain=True)
        session: dict[str, Any]
        if self._protocol == "mqtt311":
            session = {
                "protocol": aiomqtt.ProtocolVersion.V311,
                "clean_session": not self._persistent,
            }
        else:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S if self._persistent else 0
            session = {
                "protocol": aiomqtt.ProtocolVersion.V5,
                "clean_start": not self._persistent,
                "properties": properties,
            }
        return _Client(
            self.host,
            self.port,
            identifier=self.client_id,
            **session,
            username=self._username,
            password=self._password,
            tls_context=self._tls,
            will=will,
            keepalive=self._keepalive,
            # One connect attempt (and a subscribe) may take this long; a broker that accepts
            # the socket but never answers is then retried within connect_timeout.
            timeout=ATTEMPT_TIMEOUT_S,
            max_inflight_messages=64,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        self._closing = False
        self._runner = asyncio.create_task(self._run(), name=f"mqtt-link:{self.client_id}")
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives just as the connection is made, and the caller would carry on.
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._or_failure(self._connected.wait)
        except TimeoutError:
            await self._stop_runner()
            raise TransportError(
                f"could not connect to the MQTT broker at {self.broker} "
                f"within {self._connect_timeout:.0f} s"
            ) from None
        except BaseException:
            await self._stop_runner()  # failed or cancelled while connecting: no runner outlives
            raise

    async def _close(self) -> None:
        try:
            if self._status_topic is not None and self.connected:
                with contextlib.suppress(TransportError, TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self._send(self._status_topic, self._offline_payload, True)
        finally:
            self._closing = True
            await self._stop_runner()

    async def _stop_runner(self) -> None:
        for task in (self._restoring, self._runner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._runner = self._restoring = None
        self._connected.clear()

    async def _run(self) -> None:
        """Keep the client connected; read messages while it is. A failure no retry can fix
        ends the link (``_fail``): its error reaches every caller."""
        try:
            await self._keep_connected()
        except asyncio.CancelledError:
            raise
        except TransportError as exc:
            log.error("link failed", client=self.client_id, broker=self.broker, error=str(exc))
            self._fail(exc)
        except Exception as exc:
            log.exception("link failed", client=self.client_id, broker=self.broker)
            self._fail(TransportError(f"link {self.client_id} to {self.broker} failed: {exc!r}"))
        finally:
            self._connected.clear()

    async def _keep_connected(self) -> None:
        backoff = 0.1
        while True:
            # A new client for every connection: aiomqtt 2 re-entered after a lost connection
            # counts itself connected before the broker has answered (and ignores a refusal).
            client = self._new_client()
            try:
                async with client:
                    self._client = client
                    await self._resubscribe(client)
                    if self._status_topic is not None:
                        await client.publish_acked(
                            self._status_topic,
                            self.online_payload,
                            retain=True,
                            timeout=ATTEMPT_TIMEOUT_S,
                        )
                    self._generation += 1
                    self._connected.set()
                    backoff = 0.1
                    log.debug(
                        "connected",
                        client=self.client_id,
                        broker=self.broker,
                        session_present=client.session_present,
                    )
                    if self._generation > 1:
                        self.stats.reconnects += 1
                        self._restoring = asyncio.create_task(
                            self._restore_after_reconnect(client.session_present),
                            name=f"mqtt-link-restore:{self.client_id}",
                        )
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            await self._arrived(str(message.topic), bytes(payload), message.retain)
            except aiomqtt.MqttError as exc:
                self._raise_if_fatal(client, exc)
                log.warning(
                    "connection lost" if self.connected else "cannot connect",
                    client=self.client_id,
                    broker=self.broker,
                    error=str(exc),
                )
            except (_ConnectionLostError, TimeoutError):
                log.warning("connection lost", client=self.client_id, broker=self.broker)
            finally:
                client.settle()
            self._connected.clear()
            if self._restoring is not None:
                self._restoring.cancel()
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, self._max_backoff)

    def _raise_if_fatal(self, client: _Client, exc: aiomqtt.MqttError) -> None:
        """``AuthenticationError`` for a connection refused for good; else return (retry)."""
        if isinstance(exc, MqttConnectError) and isinstance(exc.rc, ReasonCode):
            reason = _FATAL_CONNACK.get(exc.rc.value)
            if reason is not None:
                raise AuthenticationError(
                    f"the MQTT broker at {self.broker} refused {self.client_id!r}: {reason} "
                    f"(reason code {exc.rc.value})"
                )
        tls_error, client.tls_error = client.tls_error, None
        if isinstance(tls_error, ssl.SSLCertVerificationError):
            raise AuthenticationError(
                f"the TLS certificate of the MQTT broker at {self.broker} failed verification: "
                f"{tls_error.verify_message}"
            )
        # An EOF or reset during the handshake is the network's doing; any other TLS error
        # is the broker refusing us (our certificate, protocol version, ciphers).
        if tls_error is not None and not isinstance(
            tls_error, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            raise AuthenticationError(
                f"the TLS handshake with the MQTT broker at {self.broker} failed: "
                f"{tls_error.reason or tls_error}"
            )

    async def _resubscribe(self, client: _Client) -> None:
        filters = list(self._subscriptions)
        for start in range(0, len(filters), SUBSCRIBE_BATCH):
            batch = filters[start : start + SUBSCRIBE_BATCH]
            codes = await client.subscribe([(f, 1) for f in batch])
            self._check_granted(batch, codes)

    def _check_granted(self, filters: list[str], codes: Any) -> None:
        for topic_filter, code in zip(filters, codes, strict=False):
            value = code.value if isinstance(code, ReasonCode) else int(code)
            if value >= 0x80:
                name = code.getName() if isinstance(code, ReasonCode) else str(value)
                raise AuthenticationError(
                    f"the MQTT broker at {self.broker} refused {self.client_id!r} a "
                    f"subscription to {topic_filter}: {name} (reason code {value})"
                )

    async def _restore_after_reconnect(self, session_present: bool) -> None:
        log.info(
            "reconnected: restoring",
            client=self.client_id,
            broker=self.broker,
            session_present=session_present,
            retained=len(self._retained),
        )
        try:
            await self._restore()
        except TransportError as exc:  # the connection dropped again: the next one restores
            log.debug("restore interrupted", client=self.client_id, error=str(exc))

    # --- messages -------------------------------------------------------------------------------

    async def _send(self, topic: str, payload: bytes, retain: bool) -> None:
        timeout = PUBLISH_TIMEOUT_S + len(payload) / PUBLISH_FLOOR_BYTES_PER_S
        while True:
            if self._closing:
                raise TransportError(f"link {self.client_id} is closed")
            await self._or_failure(self._connected.wait)
            client = self._client
            assert client is not None
            try:
                reason = await client.publish_acked(topic, payload, retain=retain, timeout=timeout)
            except TimeoutError:
                if self.connected:
                    raise PublishTimeoutError(
                        f"publish of {len(payload)} bytes to {topic} not acknowledged by "
                        f"{self.broker} within {timeout:.0f} s"
                    ) from None
                continue  # the connection dropped meanwhile: send again once reconnected
            except _ConnectionLostError:
                # The reader notices too; the next turn waits for the reconnect.
                await asyncio.sleep(0.05)
                continue
            if reason is not None and reason.value >= 0x80:
                self.stats.publishes_refused += 1
                log.error(
                    "publish refused",
                    client=self.client_id,
                    broker=self.broker,
                    topic=topic,
                    reason=reason.getName(),
                    code=reason.value,
                )
                raise PublishRefusedError(
                    f"the MQTT broker at {self.broker} refused {self.client_id!r} a publish to "
                    f"{topic}: {reason.getName()} (reason code {reason.value})",
                    code=reason.value,
                )
            return

    async def _subscribe(self, topic_filter: str) -> None:
        if topic_filter not in self._subscriptions:
            self._subscriptions.append(topic_filter)
        while True:
            await self._or_failure(self._connected.wait)
            client, generation = self._client, self._generation
            assert client is not None
            try:
                codes = await client.subscribe(topic_filter, qos=1)
            except aiomqtt.MqttError as exc:
                # The connection dropped (or the broker did not answer): the subscription is
                # replayed when the link reconnects, so a crash-and-restart of the broker while
                # a node starts up is not an error.
                log.debug("subscribe failed, retrying", topic=topic_filter, error=str(exc))
                if self._generation != generation:
                    return  # replayed on the new connection
                await asyncio.sleep(0.05)
                continue
            self._check_granted([topic_filter], codes)
            return

    async def _unsubscribe(self, topic_filter: str) -> None:
        if topic_filter not in self._subscriptions:
            return
        self._subscriptions.remove(topic_filter)
        await self._or_failure(self._connected.wait)
        client = self._client
        assert client is not None
        try:
            await client.unsubscribe(topic_filter)
        except aiomqtt.MqttError as exc:
            # The connection dropped: the subscription is gone from the list that a reconnect
            # replays, and a session the broker kept may deliver a little more, which
            # receivers ignore as they would any message they no longer want.
            log.debug("unsubscribe failed", topic=topic_filter, error=str(exc))
