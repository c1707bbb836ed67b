"""A simulation's dashboard in a process of its own (``hfl-mqtt sim --web``).

With a thousand workers, the nodes' records arrive by the hundred each second; folding them
into the view and building half-megabyte snapshots twice a second in the simulator's own event
loop slowed the aggregators' rounds, and the aggregators' bursts of work delayed the
dashboard. So the dashboard process (spawned, with its own interpreter) holds the view, the web
server and the simulation's ``NodeWatch``: it subscribes to the nodes' status and metrics
topics on the simulation's brokers and appends the "node" lines to ``metrics.jsonl`` (opened
for appending: the simulator appends its evaluations to the same file, a whole line a write).

The simulator drives it through a pipe: ``watch`` once the brokers are up, ``drain`` at the end
of the run (the nodes' last records are written), and leaving the context ends it. The page is
served from the start, so its address can be printed before the run begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from hfl_mqtt.config import BrokerAddress
from hfl_mqtt.errors import ConfigError, HflError

__all__ = ["SimDashboard"]

_START_TIMEOUT_S = 60.0
"""A spawned interpreter imports numpy, aiohttp and the package: seconds on a busy board."""
_REPLY_TIMEOUT_S = 30.0


class SimDashboard:
    """The dashboard of a simulation, served from another process at ``host:port``."""

    def __init__(self, host: str, port: int, *, log_level: int = logging.WARNING) -> None:
        self.host, self.port = host, port
        self.log_level = log_level
        self.url = ""
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    async def __aenter__(self) -> Self:
        if self._process is not None:
            raise RuntimeError("a SimDashboard can be entered only once")
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._conn = ours
        self._process = context.Process(
            target=_main,
            args=(theirs, self.host, self.port, self.log_level),
            name="hfl-sim-dashboard",
        )
        self._process.start()
        theirs.close()
        try:
            self.url = str(await self._reply("ready", _START_TIMEOUT_S))
        except BaseException:
            await self._end()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._end()

    async def watch(
        self, federation: str, brokers: Iterable[BrokerAddress], metrics_path: Path
    ) -> None:
        """Start hearing ``federation``'s nodes on ``brokers``, into ``metrics_path``."""
        addresses = [broker.model_dump(mode="json") for broker in brokers]
        self._send(("watch", federation, addresses, str(metrics_path)))
        await self._reply("watching", _REPLY_TIMEOUT_S)

    async def drain(self) -> int:
        """The run is over: wait for the nodes' last records; how many messages were written."""
        self._send(("drain",))
        count = await self._reply("drained", _REPLY_TIMEOUT_S)
        return count if isinstance(count, int) else 0

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise RuntimeError("the dashboard is not running: use it as `async with`")
        self._conn.send(message)

    async def _reply(self, expected: str, timeout: float) -> object:
        """The dashboard's answer ``(expected, value)``; its error, raised here."""
        conn = self._conn
        assert conn is not None
        ready = await asyncio.to_thread(conn.poll, timeout)
        if not ready:
            raise HflError(f"the dashboard process did not answer within {timeout:g} s")
        try:
            kind, value = conn.recv()
        except EOFError as exc:
            raise HflError("the dashboard process ended unexpectedly") from exc
        if kind == "config-error":
            raise ConfigError(str(value))
        if kind != expected:
            raise HflError(f"the dashboard process failed: {value}")
        return value

    async def _end(self) -> None:
        conn, process = self._conn, self._process
        self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("close",))
            conn.close()
        if process is not None:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.terminate()
                await asyncio.to_thread(process.join, 5)


def _main(conn: Connection, host: str, port: int, log_level: int) -> None:
    """The dashboard process: serve, and do what the simulator says until it says close."""
    from hfl_mqtt.logs import configure_logging

    configure_logging(log_level)
    try:
        asyncio.run(_serve(conn, host, port))
    except ConfigError as exc:
        conn.send(("config-error", str(exc)))
    except Exception as exc:  # told to the simulator, which raises it
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _serve(conn: Connection, host: str, port: int) -> None:
    from hfl_mqtt.monitor.view import FederationView
    from hfl_mqtt.monitor.web import Dashboard
    from hfl_mqtt.simwatch import NodeWatch

    view = FederationView()
    async with Dashboard(view, host, port) as dashboard, contextlib.AsyncExitStack() as stack:
        conn.send(("ready", dashboard.url))

        def observe(topic: str, payload: bytes, now: float) -> None:
            if view.observe(topic, payload, now):
                dashboard.changed()

        watch: NodeWatch | None = None
        while True:
            message = await asyncio.to_thread(conn.recv)
            if message[0] == "watch":
                _, federation, addresses, path = message
                view.federation = federation
                sink = stack.enter_context(Path(path).open("a", encoding="utf-8"))  # noqa: SIM115
                brokers = [BrokerAddress.model_validate(a) for a in addresses]
                watch = NodeWatch(federation, brokers, sink, on_message=observe)
                await stack.enter_async_context(watch)
                conn.send(("watching", None))
            elif message[0] == "drain":
                await stack.aclose()  # NodeWatch waits for the last records, the file closes
                conn.send(("drained", watch.messages if watch is not None else 0))
            else:  # "close"
                return
