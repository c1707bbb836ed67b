"""An embedded MQTT broker (amqtt) for machines without Mosquitto: the ``embedded`` extra.

amqtt is pure Python and speaks MQTT 3.1.1 only, without working persistent sessions, so nodes
talk to it with ``protocol: mqtt311`` and a broker restart loses queued messages. It is a
fallback for trying the simulator out, not for deployments or benchmarks: Mosquitto is used
whenever it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Any, Self

from hfl_mqtt.brokers import free_port
from hfl_mqtt.errors import BrokerError

__all__ = ["EmbeddedBroker", "embedded_available"]


def embedded_available() -> bool:
    """True when the ``embedded`` extra (amqtt) is installed."""
    try:
        import amqtt.broker  # noqa: F401
    except ImportError:
        return False
    return True


class EmbeddedBroker:
    """An amqtt broker on a free loopback port, in a thread with its own event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        if not embedded_available():
            raise BrokerError("the embedded broker needs amqtt: pip install 'hfl-mqtt[embedded]'")
        self._thread = threading.Thread(target=self._serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout) or self._error is not None:
            self.stop()
            raise BrokerError(
                f"the embedded broker did not start on port {self.port}: {self._error}"
            )

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._run())
        finally:
            self._loop.close()

    async def _run(self) -> None:
        from amqtt.broker import Broker

        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._stopped = asyncio.Event()
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        # amqtt's shutdown cancels the deliveries still waiting for a PUBACK and lets their
        # CancelledError out of shutdown(): the broker is down all the same.
        with contextlib.suppress(asyncio.CancelledError):
            await broker.shutdown()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(BrokerError):
            self.stop()
