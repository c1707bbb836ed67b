"""A node's links toward its parents: its upstream link, and one per other broker a fallback
parent is on (docs/reparenting.md).

With ``brokers: per_edge`` a sibling edge serves its workers on a broker of its own, and the
cloud on the root's: a node moving there needs a connection to that broker. ``Uplinks`` opens it
when the node first moves to a parent on that broker (under the node's own id, with its status
and Last Will there too, so the new parent sees it come and go) and keeps it to the end.

Every topic of the scheme names a node, so the roles publish and subscribe as on one link and
``Uplinks`` routes: a parent's topics (its model and status, the join and up topics under it)
go through the link of that parent's broker; the node's own (its status, its control topic)
through every link it has. A subscription to a parent on a broker not connected yet waits until
the node connects there. What arrives on any link comes out of one ``receive``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType

import structlog

from hfl_mqtt.config import BrokerAddress, UpstreamConfig
from hfl_mqtt.errors import HflError, TransportError
from hfl_mqtt.roles.parentage import Parentage
from hfl_mqtt.topics import parse_topic
from hfl_mqtt.transport.base import Incoming, LinkBase

__all__ = ["OpenLink", "Uplinks"]

log = structlog.get_logger("hfl_mqtt.roles")

OpenLink = Callable[[BrokerAddress], LinkBase]
"""Makes (without entering it) a link to another broker, under the node's own client id and
owning the node's status topic."""


class Uplinks:
    """Routes a node's upward traffic to the broker of each parent (see the module docstring).

    ``home`` is the node's upstream link, entered by its owner. ``read_home``: False when the
    owner reads ``home`` itself (an aggregator whose children share that connection).
    ``open_link``: None when the node may not connect anywhere else (a move to a parent on
    another broker then fails with ``TransportError``).
    """

    def __init__(
        self,
        home: LinkBase,
        upstream: UpstreamConfig,
        *,
        federation: str,
        node: str,
        open_link: OpenLink | None = None,
        read_home: bool = True,
    ) -> None:
        self.home = home
        self._upstream = upstream
        self._federation, self._node = federation, node
        self._open_link = open_link
        self._read_home = read_home
        self._links: dict[BrokerAddress, LinkBase] = {upstream.broker: home}
        self._everywhere: dict[tuple[str, bool], None] = {}
        """Subscriptions to the node's own topics (an ordered set): made on every link."""
        self._wanted: dict[BrokerAddress, dict[tuple[str, bool], None]] = {}
        """Subscriptions to parents' topics, by the broker they are on (made once connected)."""
        self._inbox: asyncio.Queue[Incoming | HflError] = asyncio.Queue(1000)
        self._pumps: list[asyncio.Task[None]] = []
        self._pumped: list[LinkBase] = []
        """The links a pump reads."""
        self._stack: contextlib.AsyncExitStack | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Uplinks:
        if self._stack is not None:
            raise RuntimeError("Uplinks entered twice")
        self._stack = contextlib.AsyncExitStack()
        if self._read_home:
            self._pump(self.home)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._pumps.clear()
        self._pumped.clear()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()  # closing a link publishes the node's offline status there

    def _pump(self, link: LinkBase) -> None:
        async def pump() -> None:
            try:
                while True:
                    # Taken and handed on in one step: until then it is still the link's, and
                    # receive_nowait sees it there.
                    message = link.receive_nowait()
                    if message is None:
                        await link.wait_queued()
                    else:
                        await self._inbox.put(message)
            except HflError as exc:  # the link failed: its error reaches the reader
                await self._inbox.put(exc)

        name = f"{self._node}:uplink:{len(self._pumps)}"
        self._pumps.append(asyncio.create_task(pump(), name=name))
        self._pumped.append(link)

    # --- links ----------------------------------------------------------------------------------

    @property
    def links(self) -> list[LinkBase]:
        """Every open link, the home link first."""
        return list(self._links.values())

    @property
    def online_payload(self) -> bytes:
        return self.home.online_payload

    @online_payload.setter
    def online_payload(self, payload: bytes) -> None:
        """What the node's status says on every link, after a reconnect too."""
        for link in self._links.values():
            link.online_payload = payload

    def connected_to(self, parent: str) -> bool:
        return self._upstream.broker_of(parent) in self._links

    async def connect(self, parent: str) -> None:
        """Make sure there is a link to ``parent``'s broker; ``TransportError`` if it cannot
        be reached (or the node has no way to connect there)."""
        broker = self._upstream.broker_of(parent)
        if broker in self._links:
            return
        if self._stack is None:
            raise TransportError("Uplinks is not open: use it as `async with`")
        if self._open_link is None:
            raise TransportError(f"no link can be opened to {parent}'s broker")
        link = self._open_link(broker)
        link.online_payload = self.home.online_payload
        link.on_reject = self.home.on_reject
        await self._stack.enter_async_context(link)
        for topic_filter, chunked in [*self._everywhere, *self._wanted.get(broker, {})]:
            await link.subscribe(topic_filter, chunked_retained=chunked)
        self._links[broker] = link
        self._pump(link)

    async def reach(self, parent: str, parentage: Parentage, *, by_hand: bool) -> str | None:
        """``parent``, connected to; if its broker cannot be reached, the next candidate's
        that can (None: none can, or a move by hand failed: the node stays where it is)."""
        target: str | None = parent
        while target is not None and not self.connected_to(target):
            try:
                await self.connect(target)
            except TransportError as exc:
                log.warning(
                    "a parent's broker is out of reach",
                    node=self._node,
                    parent=target,
                    error=str(exc),
                )
                target = None if by_hand else parentage.unreachable(target)
        return target

    def _broker_for(self, topic: str) -> BrokerAddress | None:
        """The broker a topic belongs on; None: the node's own topic (every broker)."""
        parsed = parse_topic(topic)
        if parsed is None:
            return self._upstream.broker
        if parsed.node == self._node:
            return None
        return self._upstream.broker_of(parsed.node)

    # --- messages -------------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        broker = self._broker_for(topic)
        if broker is None:
            for link in list(self._links.values()):
                await link.publish(topic, payload, retain=retain)
        else:
            await self._links.get(broker, self.home).publish(topic, payload, retain=retain)

    async def subscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        broker = self._broker_for(topic_filter)
        entry = (topic_filter, chunked_retained)
        if broker is None:
            self._everywhere[entry] = None
            for link in list(self._links.values()):
                await link.subscribe(topic_filter, chunked_retained=chunked_retained)
            return
        self._wanted.setdefault(broker, {})[entry] = None
        there = self._links.get(broker)
        if there is not None:
            await there.subscribe(topic_filter, chunked_retained=chunked_retained)

    async def unsubscribe(self, topic_filter: str, *, chunked_retained: bool = False) -> None:
        broker = self._broker_for(topic_filter)
        entry = (topic_filter, chunked_retained)
        if broker is None:
            self._everywhere.pop(entry, None)
            links = list(self._links.values())
        else:
            self._wanted.get(broker, {}).pop(entry, None)
            links = [self._links[broker]] if broker in self._links else []
        for link in links:
            await link.unsubscribe(topic_filter, chunked_retained=chunked_retained)

    async def receive(self) -> Incoming:
        """The next message from any link (a link's error if it failed)."""
        return _raised(await self._inbox.get())

    def receive_nowait(self) -> Incoming | None:
        """The next message if one is waiting, else None. What has reached a link but not yet
        been moved over by its pump counts as waiting: a worker asks this the moment its
        training ends, to learn whether a newer model came meanwhile."""
        try:
            return _raised(self._inbox.get_nowait())
        except asyncio.QueueEmpty:
            pass
        for link in self._pumped:
            message = link.receive_nowait()
            if message is not None:
                return message
        return None


def _raised(item: Incoming | HflError) -> Incoming:
    if isinstance(item, HflError):
        raise item
    return item
