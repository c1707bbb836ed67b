"""A worker embedded in your own program: ``Worker.connect(...)``, no CLI, no node file.

A board application with its own event loop joins a federation in a few lines::

    broker = hfl_mqtt.BrokerAddress(host="edge-1.local", port=8883, username="pi-7",
                                    password_file="/etc/hfl-mqtt/pi-7.password",
                                    tls=hfl_mqtt.TlsConfig(ca_file="/etc/hfl-mqtt/ca.pem"))
    async with hfl_mqtt.Worker.connect(broker, node="pi-7", parent="edge-1",
                                       federation="farm", task=my_task) as worker:
        report = await worker.run()   # until the parent says stop, or worker.stop()

Entering builds the task (if given a factory) and connects: a broker that cannot be reached
raises ``TransportError`` naming it, refused credentials ``AuthenticationError``. Once
connected the node's status is online; ``run`` trains on every model the parent publishes and
sends the deltas up, exactly as ``hfl-mqtt run`` does (``hfl_mqtt.roles.worker``); leaving
publishes the status offline and disconnects (and if the process dies instead, the broker
publishes the same through the Last Will).

Misuse is not an ``HflError`` (see ``hfl_mqtt.errors``): entering a worker that is already
entered, or calling ``run`` outside ``async with`` or twice, raises ``RuntimeError``; a task
that is neither a ``Task`` nor a callable returning one raises ``TypeError``. Settings that do
not validate (a bad codec, node id or chunk size) raise ``ConfigError`` naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeGuard, cast

from hfl_mqtt.config import BrokerAddress, NodeConfig, _validate
from hfl_mqtt.errors import TaskError
from hfl_mqtt.roles.node import LinkFactory, mqtt_link_factory
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.roles.worker import Worker as _Role
from hfl_mqtt.tasks.base import Task, TrainConfig
from hfl_mqtt.topics import status_topic

__all__ = ["CONNECT_TIMEOUT_S", "TaskSource", "Worker"]

CONNECT_TIMEOUT_S = 20.0
"""How long entering a worker keeps trying to reach its broker before ``TransportError``."""

TaskSource = Task | Callable[[], Task]
"""A ready ``Task``, or a callable without arguments that builds one (called on entering, in a
thread: a task that loads its data does not stall the event loop)."""


class Worker:
    """A worker node run from your own program: an async context manager that connects.

    Build it with ``Worker.connect(broker, node=..., parent=..., federation=..., task=...)``,
    or from a whole ``NodeConfig`` (its ``partition`` is not needed: the task is yours).
    ``links`` replaces the MQTT links with other ``LinkBase``s (tests use memory links).
    """

    def __init__(
        self,
        config: NodeConfig,
        task: TaskSource,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        links: LinkFactory | None = None,
    ) -> None:
        if config.role != "worker" or config.upstream is None:
            raise ValueError(f"node {config.node} is a {config.role}, not a worker")
        if not (_is_task(task) or callable(task)):
            raise TypeError(
                f"task must be a Task or a callable returning one, not {type(task).__name__}"
            )
        self.config = config
        self._task = task
        self._links = links or mqtt_link_factory(config.chunk_size, connect_timeout=connect_timeout)
        self._stack: contextlib.AsyncExitStack | None = None
        self._role: _Role | None = None
        self._report = NodeReport(config.node, "worker", config.level)
        self._stop = asyncio.Event()
        self._ran = False

    @classmethod
    def connect(
        cls,
        broker: BrokerAddress,
        *,
        node: str,
        parent: str,
        federation: str,
        task: TaskSource,
        codec: str = "q8",
        error_feedback: bool = False,
        train: TrainConfig | None = None,
        chunk_size: int = 1 << 20,
        level: int = 1,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        links: LinkFactory | None = None,
    ) -> Worker:
        """A worker ``node`` under ``parent`` in ``federation``, through ``broker``; connects
        when entered (``async with``).

        ``codec``: how deltas travel up (a codec spec: ``q8``, ``topk0.01+q8+zstd``, ...),
        with ``error_feedback`` to carry what a lossy codec dropped into the next delta. ``train``:
        the settings every ``task.train`` call gets (default ``TrainConfig()``). ``chunk_size``:
        the largest MQTT message sent; bigger ones are chunked. ``level``: the worker's depth in
        the tree (1 under the root), for its report. ``ConfigError`` if a setting is invalid.
        """
        data = {
            "federation": federation,
            "node": node,
            "upstream": {
                "broker": broker,
                "parent": parent,
                "codec": codec,
                "error_feedback": error_feedback,
            },
            "task": {"train": train or TrainConfig()},
            "chunk_size": chunk_size,
            "level": level,
        }
        config = _validate(NodeConfig, data, f"worker {node!r}")
        return cls(config, task, connect_timeout=connect_timeout, links=links)

    @property
    def report(self) -> NodeReport:
        """The worker's counters (models trained on, deltas and bytes sent, rejections): live
        while it runs, final once ``run`` has returned."""
        return self._report

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this Worker is already connected: enter it only once")
        upstream = self.config.upstream
        assert upstream is not None
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack  # entered: a second, concurrent enter fails at once
            try:
                task = await self._build_task()
                status = status_topic(self.config.federation, self.config.node)
                link = self._links(upstream.broker, self.config.node, status)
                up = await stack.enter_async_context(link)
                self._role = _Role(self.config, up, task)
            except BaseException:
                self._stack = None
                raise
            self._report = self._role.report
            self._ran = False
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._role = self._stack, None, None
        self._stop.set()  # tell a run() still going in another task to end
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            self._stop = asyncio.Event()  # for the next connection

    async def run(self) -> NodeReport:
        """Train on each model the parent publishes and send the deltas up, until the parent
        says stop or ``stop()`` is called; returns ``report``. Once per connection."""
        if self._role is None:
            raise RuntimeError(
                "this Worker is not connected: use `async with Worker.connect(...) as worker`"
            )
        if self._ran:
            raise RuntimeError("this Worker has run already: run() once per connection")
        self._ran = True
        return await self._role.run(self._stop)

    def stop(self) -> None:
        """End ``run`` cleanly at its next message boundary (a delta being sent is sent first);
        called before ``run``, it makes ``run`` return at once. Call it from the event loop's
        thread (from another thread or a signal handler: ``loop.call_soon_threadsafe``)."""
        self._stop.set()

    async def _build_task(self) -> Task:
        if _is_task(self._task):
            return self._task
        factory = cast("Callable[[], object]", self._task)
        task = await asyncio.to_thread(factory)
        if not _is_task(task):
            raise TaskError(f"the task factory returned {type(task).__name__}, which is not a Task")
        return task

    def __repr__(self) -> str:
        upstream = self.config.upstream
        assert upstream is not None
        state = "connected" if self._stack is not None else "not connected"
        return (
            f"Worker({self.config.node!r} under {upstream.parent!r} in "
            f"{self.config.federation!r}, {state})"
        )


def _is_task(value: object) -> TypeGuard[Task]:
    """An object implementing ``Task`` (a class with those methods is a factory, not a task)."""
    return isinstance(value, Task) and not isinstance(value, type)
