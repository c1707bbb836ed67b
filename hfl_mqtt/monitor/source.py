"""Feed a ``FederationView`` from a broker: subscribe to the nodes' status and metrics topics.

The monitor is one more MQTT client (``monitor-<random>``), reading only: it needs no status
topic of its own and publishes nothing, so an ACL need only let it read
``hfl/{fed}/+/status`` and ``hfl/{fed}/+/metrics``. The link is the nodes' ``MqttLink``, so
TLS, credentials and reconnects behave as theirs do; a refused password or certificate fails
``__aenter__`` at once with ``AuthenticationError``. Retained records arrive on subscribe: a
monitor started late sees every node's last state at once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

from hfl_mqtt.config import BrokerAddress
from hfl_mqtt.monitor.view import FederationView
from hfl_mqtt.topics import check_id
from hfl_mqtt.transport.mqtt import MqttLink

__all__ = ["MonitorSource", "monitor_filters"]


def monitor_filters(federation: str | None) -> list[str]:
    """The topic filters of one federation's statuses and metrics (every federation's if None)."""
    fed = "+" if federation is None else check_id(federation, "federation")
    return [f"hfl/{fed}/+/status", f"hfl/{fed}/+/metrics"]


class MonitorSource:
    """An MQTT subscriber that feeds ``view``; ``run`` reads until cancelled.

    ``changed`` is set whenever a message changed the view (a consumer clears it); each
    callback of ``listeners`` is called then too (cheap, synchronous: it must not block).
    """

    def __init__(
        self,
        broker: BrokerAddress,
        view: FederationView,
        *,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.view = view
        self.changed = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        self.messages = 0
        """Messages read so far."""
        self._clock = clock
        self._filters = monitor_filters(view.federation)
        self._link = MqttLink(
            broker.host,
            broker.port,
            client_id or f"monitor-{secrets.token_hex(4)}",
            connect_timeout=connect_timeout,
            protocol=broker.protocol,
            tls=broker.tls,
            username=broker.username,
            password=broker.password(),
            persistent_session=False,  # nothing queued for a monitor that has gone
        )

    def __repr__(self) -> str:
        return f"MonitorSource({self._link.client_id!r} at {self._link.broker})"

    @property
    def link(self) -> MqttLink:
        return self._link

    async def __aenter__(self) -> Self:
        await self._link.__aenter__()
        try:
            for topic_filter in self._filters:
                # A root's record with a long accuracy history may be chunked.
                await self._link.subscribe(topic_filter, chunked_retained=True)
        except BaseException as exc:
            await self._link.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._link.__aexit__(exc_type, exc, tb)

    def _take(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        if self.view.observe(topic, payload, self._clock()):
            self.changed.set()
            for listener in self.listeners:
                listener()

    async def run(self) -> None:
        """Read and feed the view until cancelled (or the link fails for good: its error)."""
        while True:
            message = await self._link.receive()
            self._take(message.topic, message.payload)
            # Drain what is already queued without a wait per message (a burst at subscribe).
            while (queued := self._link.receive_nowait()) is not None:
                self._take(queued.topic, queued.payload)
