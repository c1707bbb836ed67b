"""The web dashboard: a single page, the federation's state as JSON, and its changes pushed.

Routes: ``/`` the page (``hfl_mqtt/monitor/static/``, no CDN: boards and labs are often
offline), ``/static/*`` its script and style, ``GET /api/state`` the view's snapshot, and
``GET /api/events`` server-sent events: a snapshot whenever the view changed, at most one every
``interval`` seconds, and a comment line when nothing happened for a while (so proxies and the
browser keep the connection open).

The server is aiohttp, not starlette with uvicorn: one dependency that is both the framework and
the server, and it runs inside our asyncio loop beside the MQTT link (an ASGI app would need an
ASGI server started and stopped around it). One broadcaster computes a snapshot once per tick and
hands it to every client; a slow client only ever has the newest one waiting (no backlog), and a
client that went away is dropped when a write to it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import structlog
from aiohttp import web

from hfl_mqtt.errors import ConfigError

__all__ = ["Dashboard", "SnapshotSource", "parse_web_address", "static_dir", "web_server"]

log = structlog.get_logger("hfl_mqtt.monitor")

Mode = Literal["live", "replay"]
"""What the page is told it shows: the federation now, or a finished run replayed."""

_NO_CACHE = {"Cache-Control": "no-store"}
_END = b""
"""Offered to a client's stream when the server stops: the stream ends."""


class SnapshotSource(Protocol):
    """What the dashboard reads: a ``FederationView``, or anything with its ``snapshot``."""

    def snapshot(self, now: float) -> dict[str, Any]: ...


def parse_web_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0: any free one) as (host, port);
    ``ConfigError`` otherwise."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--web {value!r}: want HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def static_dir() -> Path:
    """The dashboard's files, shipped inside the package."""
    return Path(str(resources.files("hfl_mqtt.monitor") / "static"))


class _Listened(Protocol):
    """A monitor source: it calls each of its ``listeners`` when the view changed."""

    listeners: list[Callable[[], None]]


def web_server(
    host: str, port: int, *, say: Callable[[str], None] | None = None
) -> Callable[[SnapshotSource, _Listened], AbstractAsyncContextManager[Dashboard]]:
    """The dashboard as one of ``hfl-mqtt monitor``'s servers (``command.Server``): served
    over the monitor's view, pushed whenever its source changed the view."""

    @asynccontextmanager
    async def serve(view: SnapshotSource, source: _Listened) -> AsyncIterator[Dashboard]:
        async with Dashboard(view, host, port) as dashboard:
            if say is not None:
                say(f"dashboard: {dashboard.url}")
            source.listeners.append(dashboard.changed)
            try:
                yield dashboard
            finally:
                source.listeners.remove(dashboard.changed)

    return serve


class _Client:
    """One SSE connection: the newest snapshot not yet written to it (older ones are dropped)."""

    def __init__(self) -> None:
        self.pending: bytes | None = None
        self.ready = asyncio.Event()

    def offer(self, data: bytes) -> None:
        self.pending = data
        self.ready.set()


class Dashboard:
    """Serve ``view`` on ``host:port`` while entered (``port`` 0: a free one, see ``url``).

    Call ``changed()`` after the view took something new (``observe`` returned True): the
    clients get a snapshot within ``interval`` seconds. ``clock`` is the time the view is asked
    at: the wall clock, or a replay's. ``mode`` ("live" or "replay") goes in every snapshot
    sent, for the page to say so.
    """

    def __init__(
        self,
        view: SnapshotSource,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        interval: float = 0.5,
        keepalive: float = 15.0,
        clock: Callable[[], float] = time.time,
        mode: Mode = "live",
    ) -> None:
        self.view = view
        self.host, self.port = host, port
        self.interval = interval
        self.keepalive = keepalive
        self.clock = clock
        self.mode: Mode = mode
        self.sent = 0
        """Snapshots pushed so far (one per tick, whatever the number of clients)."""
        self._changed = asyncio.Event()
        self._clients: set[_Client] = set()
        self._runner: web.AppRunner | None = None
        self._broadcaster: asyncio.Task[None] | None = None
        self._entered = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def clients(self) -> int:
        """Event streams open now."""
        return len(self._clients)

    def changed(self) -> None:
        """The view changed: push a snapshot to the clients (coalesced, at most every
        ``interval`` seconds)."""
        self._changed.set()

    def state(self) -> dict[str, Any]:
        """The view's snapshot, with the dashboard's ``mode`` (ages in a replay are the run's)."""
        return {**self.view.snapshot(self.clock()), "mode": self.mode}

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_static("/static/", static_dir(), follow_symlinks=False)
        return app

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Dashboard can be entered only once")
        self._entered = True
        runner = web.AppRunner(
            self._app(), handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(
                f"cannot serve the dashboard on {self.host}:{self.port}: {reason} "
                "(choose another HOST:PORT)"
            ) from exc
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]
        self._broadcaster = asyncio.create_task(self._broadcast(), name="dashboard-broadcast")
        log.info("dashboard serving", url=self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._broadcaster is not None:
            self._broadcaster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broadcaster
        for client in self._clients:
            client.offer(_END)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _broadcast(self) -> None:
        """One snapshot per change (at most one per ``interval``), shared by every client."""
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            self._changed.clear()
            began = loop.time()
            if self._clients:
                data = _event(self.state())
                self.sent += 1
                for client in self._clients:
                    client.offer(data)
            # One tick from when this snapshot was begun, not from when it was done: building
            # a large tree's snapshot takes tens of milliseconds.
            await asyncio.sleep(max(0.0, began + self.interval - loop.time()))

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(static_dir() / "index.html", headers=_NO_CACHE)

    async def _state(self, request: web.Request) -> web.Response:
        return web.Response(
            text=_dumps(self.state()), content_type="application/json", headers=_NO_CACHE
        )

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a reverse proxy must not hold the stream back
            }
        )
        await response.prepare(request)
        client = _Client()
        client.offer(_event(self.state()))  # the current state at once, then the changes
        self._clients.add(client)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.keepalive):
                        await client.ready.wait()
                client.ready.clear()
                data, client.pending = client.pending, None
                if data == _END:
                    break
                await response.write(data if data is not None else b": keep-alive\n\n")
        except ConnectionError:  # the browser went away (aiohttp: ClientConnectionResetError)
            log.debug("dashboard client went away", peer=request.remote)
        finally:
            self._clients.discard(client)
        return response


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN or infinity is not JSON (a browser refuses it): null instead
        return json.dumps(_finite(value), separators=(",", ":"))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _event(snapshot: dict[str, Any]) -> bytes:
    return f"event: snapshot\ndata: {_dumps(snapshot)}\n\n".encode()
