"""A byte-counting TCP proxy: what crosses one network link, measured on the wire.

``LinkMeter(host, port)`` listens on a free loopback port and forwards every connection to
``host:port``, counting the bytes each way (TCP payload: MQTT or gRPC framing included, TCP/IP
headers not). It runs in its own process, so forwarding costs the measured system no event-loop
time; the counts live in shared memory and can be read at any moment with ``counts()``.

Put one in front of a broker or server and point the clients at it: every client that connects
through the meter is one side of the link, the target the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from types import TracebackType
from typing import Self

from hfl_mqtt.errors import HflError

__all__ = ["LinkCounts", "LinkMeter"]

_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class LinkCounts:
    """Bytes through a meter so far: ``up`` from the clients to the target, ``down`` back."""

    up: int
    down: int
    connections: int

    @property
    def total(self) -> int:
        return self.up + self.down


class LinkMeter:
    """A counting proxy in front of ``target_host:target_port`` (a context manager)."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        context = multiprocessing.get_context("spawn")
        self._up: Synchronized[int] = context.Value("Q", 0, lock=False)
        self._down: Synchronized[int] = context.Value("Q", 0, lock=False)
        self._connections: Synchronized[int] = context.Value("Q", 0, lock=False)
        self._context = context
        self._process: multiprocessing.process.BaseProcess | None = None

    def counts(self) -> LinkCounts:
        return LinkCounts(self._up.value, self._down.value, self._connections.value)

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system) the meter's process has used so far: what metering costs
        the machine it shares with the system it measures. None when the meter is not running,
        or where there is no ``/proc`` (not Linux)."""
        if self._process is None or self._process.pid is None:
            return None
        try:
            stat = Path(f"/proc/{self._process.pid}/stat").read_text()
        except OSError:
            return None
        # Fields after the command name (which may hold spaces, in parentheses): state is
        # field 3, utime 14 and stime 15, in clock ticks.
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        listener = socket.create_server((self.host, 0))
        self.port = listener.getsockname()[1]
        self._process = self._context.Process(
            target=_serve,
            args=(listener, self.target, self._up, self._down, self._connections),
            name=f"linkmeter-{self.port}",
            daemon=True,
        )
        self._process.start()
        listener.close()  # the child has its own copy
        if not self._process.is_alive():
            raise HflError(f"the link meter in front of {self.target} did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(5)
            self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(
    listener: socket.socket,
    target: tuple[str, int],
    up: Synchronized[int],
    down: Synchronized[int],
    connections: Synchronized[int],
) -> None:
    asyncio.run(_proxy(listener, target, up, down, connections))


async def _proxy(
    listener: socket.socket,
    target: tuple[str, int],
    up: Synchronized[int],
    down: Synchronized[int],
    connections: Synchronized[int],
) -> None:
    async def pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Synchronized[int]
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                writer.write(data)
                counter.value += len(data)  # every writer runs on this one thread: no lock needed
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        for writer in (client_w, server_w):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections.value += 1
        await asyncio.gather(pump(client_r, server_w, up), pump(server_r, client_w, down))

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()
