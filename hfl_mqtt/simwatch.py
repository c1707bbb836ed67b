"""What the simulator hears of its nodes: their status and metrics records, into metrics.jsonl.

The sim subscribes to ``hfl/{fed}/+/status`` and ``hfl/{fed}/+/metrics`` on every broker it
started (with brokers per edge, a worker's messages stay on its edge's broker) and appends each
message to ``metrics.jsonl`` as a "node" line::

    {"event": "node", "t": WALL, "topic": TOPIC, "payload": OBJ}

which ``hfl_mqtt.monitor.replay`` feeds to a dashboard after the run. Evaluation lines have no
"event" key; whatever reads evaluations skips the lines that have one. A message heard twice
(an edge's status on its own broker and, bridged, on the cloud's) is written once. This module
needs only the core: the monitor extra is imported by whoever passes ``on_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO

import structlog

from hfl_mqtt.config import BrokerAddress
from hfl_mqtt.errors import TransportError
from hfl_mqtt.transport.mqtt import MqttLink

__all__ = [
    "NODE_EVENT",
    "MessageCallback",
    "NodeWatch",
    "NodeWatcher",
    "is_evaluation",
    "read_evaluations",
]

NODE_EVENT = "node"
"""The "event" of a metrics.jsonl line that holds a node's status or metrics message."""

MessageCallback = Callable[[str, bytes, float], None]
"""Told of every new message: topic, payload, wall-clock time of arrival."""

_QUIET_S = 0.3
"""At the end, messages still arriving (the nodes' last records) are awaited until this long
passes without one, or ``drain_s``."""

log = structlog.get_logger("hfl_mqtt.sim")


class NodeWatcher(Protocol):
    """Hears the nodes somewhere else (``hfl_mqtt.monitor.sim_dashboard``: in the dashboard's
    process) and appends their "node" lines to ``metrics_path`` itself."""

    async def watch(
        self, federation: str, brokers: Iterable[BrokerAddress], metrics_path: Path
    ) -> None: ...

    async def drain(self) -> int: ...


def is_evaluation(line: dict[str, Any]) -> bool:
    """Whether a parsed metrics.jsonl line is one of the root's evaluations."""
    return "event" not in line


def read_evaluations(path: Path) -> list[dict[str, Any]]:
    """The root's evaluations in a metrics.jsonl, in order (the "node" lines skipped, and a
    last line cut short by a killed run)."""
    evaluations = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and is_evaluation(line):
            evaluations.append(line)
    return evaluations


class NodeWatch:
    """While entered, write every status and metrics message of ``federation`` heard on
    ``brokers`` to ``sink`` (and tell ``on_message``)."""

    def __init__(
        self,
        federation: str,
        brokers: Iterable[BrokerAddress],
        sink: TextIO,
        *,
        on_message: MessageCallback | None = None,
        drain_s: float = 2.0,
    ) -> None:
        self.federation = federation
        self.brokers = list(dict.fromkeys(brokers))
        self.sink = sink
        self.on_message = on_message
        self.drain_s = drain_s
        self.messages = 0
        """Messages written so far."""
        self._last: dict[str, bytes] = {}
        self._last_at = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._readers: list[asyncio.Task[None]] = []
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a NodeWatch can be entered only once")
        self._entered = True
        try:
            for index, broker in enumerate(self.brokers):
                link = MqttLink(
                    broker.host,
                    broker.port,
                    f"hfl-sim-watch-{os.getpid()}-{index}",
                    protocol=broker.protocol,
                    tls=broker.tls,
                    username=broker.username,
                    password=broker.password(),
                )
                entered = await self._stack.enter_async_context(link)
                for kind in ("status", "metrics"):
                    topic_filter = f"hfl/{self.federation}/+/{kind}"
                    await entered.subscribe(topic_filter, chunked_retained=True)
                self._readers.append(
                    asyncio.create_task(self._read(entered), name=f"sim-watch-{index}")
                )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self._drain()
        await self._close()

    async def _drain(self) -> None:
        """Wait for the nodes' last records: until quiet, bounded by ``drain_s``."""
        deadline = time.monotonic() + self.drain_s
        while time.monotonic() < deadline:
            quiet_until = self._last_at + _QUIET_S
            if time.monotonic() >= quiet_until:
                return
            await asyncio.sleep(min(quiet_until, deadline) - time.monotonic())

    async def _close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await self._stack.aclose()

    async def _read(self, link: MqttLink) -> None:
        try:
            while True:
                message = await link.receive()
                self._take(message.topic, message.payload)
        except TransportError as exc:
            # The run goes on without its record of the nodes (the brokers are ours; this is
            # the end of the run closing them, or a bug): say so once.
            log.warning("sim stopped hearing node records", broker=link.broker, error=str(exc))

    def _take(self, topic: str, payload: bytes) -> None:
        if self._last.get(topic) == payload:
            return  # the same message again: bridged from an edge's broker
        self._last[topic] = payload
        self._last_at = time.monotonic()
        try:
            value = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.debug("not JSON, not recorded", topic=topic)
            return
        now = time.time()
        line = {"event": NODE_EVENT, "t": round(now, 3), "topic": topic, "payload": value}
        self.sink.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.sink.flush()
        self.messages += 1
        if self.on_message is not None:
            self.on_message(topic, payload, now)
