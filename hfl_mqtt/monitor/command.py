"""``hfl-mqtt monitor``: a view fed from a broker, shown in the terminal and served to Prometheus.

The command in ``hfl_mqtt/cli.py`` only parses options into ``MonitorOptions``; this module
wires the parts in one event loop: the MQTT source, the terminal (a live redraw, or with
``once`` a single rendering after a short wait), and the servers (``serve`` hooks: each an
async context manager over the view, entered once the broker has accepted us).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from rich.console import Console

from hfl_mqtt.config import BrokerAddress, TlsConfig
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.monitor.source import MonitorSource
from hfl_mqtt.monitor.terminal import live, render
from hfl_mqtt.monitor.view import FederationView
from hfl_mqtt.topics import check_id

__all__ = [
    "MonitorOptions",
    "Server",
    "monitor_options",
    "parse_host_port",
    "prometheus_server",
    "run_command",
    "run_monitor",
]

Server = Callable[[FederationView, MonitorSource], AbstractAsyncContextManager[object]]
"""Something served while the monitor runs (Prometheus, the web dashboard)."""


def parse_host_port(value: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:1883`` for IPv6) as (host, port); ``ConfigError`` naming
    ``option`` otherwise. Port 0 takes any free port."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{option} {value!r}: want HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


@dataclass(frozen=True)
class MonitorOptions:
    broker: BrokerAddress
    federation: str | None = None
    terminal: bool = True
    """Draw the live tree (off: only the servers run)."""
    once: bool = False
    """Print one rendering after ``once_after_s`` seconds and stop."""
    once_after_s: float = 2.0
    servers: list[Server] = field(default_factory=list)


def prometheus_server(host: str, port: int, *, console: Console | None = None) -> Server:
    """Serve ``/metrics`` on ``host:port`` (and say where on ``console``)."""

    @asynccontextmanager
    async def serve(view: FederationView, source: MonitorSource) -> AsyncIterator[int]:
        from hfl_mqtt.monitor.prometheus import prometheus_app, serving

        async with serving(prometheus_app(view), host, port) as bound:
            if console is not None:
                console.print(f"Prometheus: http://{host}:{bound}/metrics", style="dim")
            yield bound

    return serve


async def run_monitor(
    options: MonitorOptions,
    *,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
) -> FederationView:
    """Run until ``stop`` is set or cancelled (with ``once``: about ``once_after_s`` seconds);
    returns the view. A broker that refuses us raises ``AuthenticationError`` at once."""
    # Into a file or a pipe, rich would wrap at 80 columns, mid-value: a wide line instead.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    view = FederationView(options.federation)
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        source = await stack.enter_async_context(MonitorSource(options.broker, view))
        for server in options.servers:
            await stack.enter_async_context(server(view, source))
        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(source.run(), name="monitor:source")
        ]
        if options.once:
            tasks.append(asyncio.create_task(asyncio.sleep(options.once_after_s)))
        else:
            tasks.append(asyncio.create_task(stop.wait(), name="monitor:stop"))
            if options.terminal:
                tasks.append(asyncio.create_task(live(view, console=console), name="monitor:live"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the source's error (the broker refused us), if that ended it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if options.once:
            console.print(render(view.snapshot(time.time())))
    return view


def monitor_options(args: argparse.Namespace, *, console: Console | None = None) -> MonitorOptions:
    """The options of ``hfl-mqtt monitor`` (``ConfigError`` for a bad address or TLS setting)."""
    host, port = parse_host_port(args.broker, "--broker")
    if args.federation is not None:
        try:
            check_id(args.federation, "--federation")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    tls = None
    if args.tls or args.ca or args.cert or args.key:
        try:
            tls = TlsConfig(ca_file=args.ca, cert_file=args.cert, key_file=args.key)
        except ValueError as exc:
            raise ConfigError(f"monitor: {_first_error(exc)}") from None
    try:
        broker = BrokerAddress(
            host=host,
            port=port,
            tls=tls,
            username=args.username,
            password_file=args.password_file,
        )
    except ValueError as exc:
        raise ConfigError(f"monitor: {_first_error(exc)}") from None
    servers: list[Server] = []
    if args.prometheus:
        servers.append(
            prometheus_server(*parse_host_port(args.prometheus, "--prometheus"), console=console)
        )
    return MonitorOptions(
        broker=broker,
        federation=args.federation,
        terminal=not args.no_terminal,
        once=args.once,
        servers=servers,
    )


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        details = errors()
        if details:
            return str(details[0].get("msg", exc))
    return str(exc)


def run_command(options: MonitorOptions, *, console: Console | None = None) -> int:
    """Run the monitor until Ctrl-C (or once); 0, or 1 if ``once`` found no node at all."""
    try:
        view = asyncio.run(run_monitor(options, console=console))
    except KeyboardInterrupt:
        return 0
    if options.once and not view.nodes:
        which = f"federation {options.federation!r}" if options.federation else "any federation"
        broker = f"{options.broker.host}:{options.broker.port}"
        (console or Console(stderr=True)).print(
            f"hfl-mqtt: no status or metrics record of {which} on {broker}. A simulation runs "
            "its own broker: it prints its port ('... broker(s) on ports N')."
        )
        return 1
    return 0
