"""The metrics record every node keeps on the broker: ``hfl/{fed}/{node}/metrics``, retained.

A monitor (``hfl-mqtt monitor``, or anything that subscribes) sees the whole tree from these
records alone: who a node's parent is, which version it holds, what it accepted and refused
and why, how stale the updates it took were, how many bytes and messages went each way per
topic kind, and the process's memory and CPU. The root adds its latest evaluations. A record is a
compact JSON object (docs/monitoring.md lists its fields); empty and zero fields are left out.

``MetricsPublisher`` builds it from the node's ``NodeReport``, its links' ``LinkStats`` and
what the role says of itself now (``NodeNow``), and publishes it (retained, QoS 1) on the link
that carries the node's status, so that it follows the node to another parent and broker: at
most once per ``NodeConfig.metrics_interval_s`` (by default 1 s for an aggregator, 5 s for a
worker), only when something changed, and once more at a clean stop. What only moves by
itself (the time, the uptime, memory, CPU, and the bytes of the records themselves) is no
change: an idle node publishes nothing.

Memory and CPU are the process's (a simulation runs hundreds of nodes in one): read from
``/proc/self`` (the ``resource`` module where there is none), at most every half second.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import HflError
from hfl_mqtt.topics import metrics_topic
from hfl_mqtt.transport.base import Channel, LinkStats

if TYPE_CHECKING:  # the roles import this module
    from hfl_mqtt.roles.report import NodeReport

__all__ = [
    "ACCURACY_HISTORY",
    "STALENESS_BUCKETS",
    "MetricsPublisher",
    "NodeNow",
    "ProcessUsage",
    "StalenessTally",
    "metrics_publisher",
    "process_usage",
]

log = structlog.get_logger("hfl_mqtt.metrics")

ACCURACY_HISTORY = 100
"""The root's record carries its last this many evaluations: the whole run's would make the
record, sent up to once a second, grow without end (a monitor watching keeps them all)."""

STALENESS_BUCKETS = 17
"""``hist[i]``: updates of staleness ``i``; the last bucket counts those of 16 and more."""

SAMPLE_EVERY_S = 0.5
"""How long the process's memory and CPU time, once read, stand for every node of it."""

_AWAY_POLL_S = 1.0
"""How often a node that dropped out looks whether it is back (then its record goes at once)."""

_IGNORED = ("t", "uptime_s", "rss", "cpu_s")
"""Fields that move by themselves: a record that differs only there is not published."""
_OWN_KIND = "metrics"


@dataclass(frozen=True, slots=True)
class NodeNow:
    """What a role says of itself at the moment: its parent (None at the root, or under a
    Flower server), what its status says, the model version it holds (None: none yet), and,
    for an aggregator, which of its children are down (offline, or idle with no child left)."""

    parent: str | None
    status: str
    version: int | None
    children_down: tuple[str, ...] = ()


# --- the process ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """The process's resident memory (bytes) and CPU time (user + system seconds)."""

    pid: int
    rss: int
    cpu_s: float


def _read_proc() -> ProcessUsage | None:
    """From ``/proc/self`` (Linux); None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
        with open("/proc/self/stat", encoding="ascii", errors="replace") as stat:
            # The command name (field 2) may hold spaces and parentheses: split after it.
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return ProcessUsage(os.getpid(), rss, cpu_s)


def _read_resource() -> ProcessUsage:
    """From ``getrusage``: where there is no ``/proc``; the memory is the peak, not the
    current (kilobytes on Linux, bytes on macOS)."""
    import resource
    import sys

    usage = resource.getrusage(resource.RUSAGE_SELF)
    scale = 1 if sys.platform == "darwin" else 1024
    return ProcessUsage(os.getpid(), usage.ru_maxrss * scale, usage.ru_utime + usage.ru_stime)


class _Sampler:
    """The last reading, shared by every node of the process."""

    taken: float = -math.inf
    usage: ProcessUsage | None = None


def process_usage(now: float | None = None) -> ProcessUsage:
    """The process's memory and CPU, read at most every ``SAMPLE_EVERY_S`` (``now``:
    ``time.monotonic``); a forked child reads its own."""
    now = time.monotonic() if now is None else now
    usage = _Sampler.usage
    if (
        usage is not None
        and 0 <= now - _Sampler.taken < SAMPLE_EVERY_S
        and usage.pid == os.getpid()
    ):
        return usage
    usage = _read_proc() or _read_resource()
    _Sampler.taken, _Sampler.usage = now, usage
    return usage


# --- staleness ------------------------------------------------------------------------------


class StalenessTally:
    """The staleness of the updates a node accepted, counted as they come (the arrivals of
    its ``NodeReport``, read once each)."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._read = 0

    def update(self, report: NodeReport) -> None:
        arrivals = report.arrivals
        for arrival in arrivals[self._read :]:
            self._counts[arrival.staleness] += 1
        self._read = len(arrivals)

    def summary(self) -> dict[str, Any] | None:
        """``n``, ``mean``, ``p50``, ``p95``, ``max`` (percentiles interpolated linearly, as
        numpy's default) and ``hist`` (without its trailing zeros); None before any update."""
        n = self._counts.total()
        if n == 0:
            return None
        values = sorted(self._counts)
        hist = [0] * STALENESS_BUCKETS
        for value, count in self._counts.items():
            hist[min(max(value, 0), STALENESS_BUCKETS - 1)] += count
        while hist and hist[-1] == 0:
            hist.pop()
        mean = sum(v * c for v, c in self._counts.items()) / n
        return {
            "n": n,
            "mean": _short(mean),
            "p50": _short(self._percentile(values, n, 0.50)),
            "p95": _short(self._percentile(values, n, 0.95)),
            "max": values[-1],
            "hist": hist,
        }

    def _percentile(self, values: list[int], n: int, q: float) -> float:
        position = q * (n - 1)
        low, high = self._nth(values, math.floor(position)), self._nth(values, math.ceil(position))
        return low + (high - low) * (position - math.floor(position))

    def _nth(self, values: list[int], index: int) -> int:
        seen = 0
        for value in values:
            seen += self._counts[value]
            if index < seen:
                return value
        return values[-1]


def _short(value: float) -> float | int:
    """A number as short as it can be written: an int if whole, else 3 decimals."""
    rounded = round(value, 3)
    return int(rounded) if rounded == int(rounded) else rounded


# --- the record -----------------------------------------------------------------------------


def _traffic(links: Iterable[LinkStats]) -> dict[str, list[int]]:
    """``[messages out, bytes out, messages in, bytes in]`` per topic kind over ``links``."""
    total: dict[str, list[int]] = {}
    for stats in links:
        for kind, values in stats.by_topic_kind.items():
            entry = total.setdefault(kind, [0, 0, 0, 0])
            for i, value in enumerate(values):
                entry[i] += value
    return {kind: total[kind] for kind in sorted(total)}


def _unique(links: Iterable[LinkStats]) -> list[LinkStats]:
    """Each link's stats once (an aggregator's two sides may be one connection)."""
    return list({id(stats): stats for stats in links}.values())


class MetricsPublisher:
    """Builds the node's record and keeps it on the broker (see the module docstring).

    ``channel``: the link (or ``Uplinks``) that carries the node's status. ``links``: every
    link of the node now (stats counted once each). ``now``: what the role says of itself.
    ``clock`` (monotonic) and ``wall`` (``time.time``) are for tests.
    """

    def __init__(
        self,
        config: NodeConfig,
        report: NodeReport,
        channel: Channel,
        *,
        links: Callable[[], Iterable[LinkStats]],
        now: Callable[[], NodeNow],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.interval_s = config.metrics_every_s
        self.topic = metrics_topic(config.federation, config.node)
        self._config = config
        self._report = report
        self._channel = channel
        self._links = links
        self._now = now
        self._clock = clock
        self._wall = wall
        self._staleness = StalenessTally()
        self._last: dict[str, Any] | None = None
        """What the last published record said, less what moves by itself."""
        self._last_at: float | None = None
        self._away = False
        """The node was offline at its last turn: look again soon, to say it is back."""
        self.published = 0

    def record(self) -> dict[str, Any]:
        """The record now (a JSON object)."""
        report, now = self._report, self._now()
        clock = self._clock()
        links = _unique(self._links())
        usage = process_usage(clock)
        record: dict[str, Any] = {
            "node": report.node,
            "role": report.role,
            "level": report.level,
            "parent": now.parent,
            "status": now.status,
            "version": now.version,
            "round": report.rounds,
            "t": round(self._wall(), 3),
            "uptime_s": round(clock - report.started, 1),
        }
        optional: dict[str, Any] = {
            "accepted": report.updates_accepted,
            "rejected": dict(sorted(report.updates_rejected.items())),
            "traffic": _traffic(links),
            "reconnects": sum(stats.reconnects for stats in links),
            "last_error": report.last_error,
            "trained": report.trained,
            # What the node's parent sees of its children: a monitor on another broker (the
            # root's, above a site broker) learns from it that a worker died.
            "children_down": list(now.children_down),
            "privacy": report.privacy,
        }
        if report.role != "worker":
            self._staleness.update(report)
            optional["staleness"] = self._staleness.summary()
        record |= {key: value for key, value in optional.items() if value}
        record |= {"pid": usage.pid, "rss": usage.rss, "cpu_s": round(usage.cpu_s, 2)}
        if report.evaluations:  # the root's latest: seconds, version, accuracy, loss, bytes
            record["accuracy"] = [
                [
                    round(float(e["seconds"]), 2),
                    e["version"],
                    round(float(e["accuracy"]), 4),
                    round(float(e["loss"]), 4),
                    e.get("tree_bytes"),
                ]
                for e in report.evaluations[-ACCURACY_HISTORY:]
            ]
        return record

    def _what_counts(self, record: dict[str, Any]) -> dict[str, Any]:
        counted = {k: v for k, v in record.items() if k not in _IGNORED}
        traffic = counted.get("traffic")
        if traffic is not None and _OWN_KIND in traffic:
            counted["traffic"] = {k: v for k, v in traffic.items() if k != _OWN_KIND}
        return counted

    def due_in(self) -> float:
        """Seconds until a record may be published again (0: now)."""
        if self._last_at is None:
            return 0.0
        return max(0.0, self._last_at + self.interval_s - self._clock())

    async def publish_if_due(self, *, final: bool = False) -> bool:
        """Publish the record if the interval has passed (``final``: whatever the interval)
        and it says something new; True if it was published. A refused or failed publish is
        the node's last error, logged, not raised: metrics never stop a node."""
        if not final and self.due_in() > 0:
            return False
        record = self.record()
        self._away = record["status"] == "offline" and not final
        if self._away:
            return False  # a device that dropped out says nothing until it is back
        counted = self._what_counts(record)
        if counted == self._last:
            return False
        payload = json.dumps(record, separators=(",", ":")).encode()
        try:
            await self._channel.publish(self.topic, payload, retain=True)
        except HflError as exc:
            self._report.error(f"metrics: {exc}")
            log.warning("metrics record not published", node=self._report.node, error=str(exc))
            self._last_at = self._clock()
            return False
        self._last = counted
        self._last_at = self._clock()
        self.published += 1
        return True

    async def run(self) -> None:
        """Publish records for as long as the node runs (cancel it to stop): the first at
        once, then on a phase of the node's own, so that the records of many nodes started
        together (a simulation, a fleet after a broker restart) do not all come at once."""
        await self.publish_if_due()
        await asyncio.sleep(self.interval_s * random.random())
        while True:
            await self.publish_if_due()
            if self._away:
                await asyncio.sleep(min(self.interval_s, _AWAY_POLL_S))
            else:
                await asyncio.sleep(max(self.due_in(), self.interval_s))

    def start(self, tasks: asyncio.TaskGroup) -> asyncio.Task[None]:
        """``run`` as a named task of the node's task group."""
        return tasks.create_task(self.run(), name=f"{self._config.node}:metrics")

    async def stop(self, task: asyncio.Task[None] | None) -> None:
        """Cancel ``task`` (``start``'s) and publish the final record (a clean stop)."""
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # its cancellation is not ours to raise
        await self.publish_if_due(final=True)


def metrics_publisher(
    config: NodeConfig,
    report: NodeReport,
    channel: Channel,
    *,
    links: Callable[[], Iterable[LinkStats]],
    now: Callable[[], NodeNow],
) -> MetricsPublisher | None:
    """The node's publisher, or None if its metrics are off (``metrics_interval_s`` 0)."""
    if config.metrics_every_s <= 0:
        return None
    return MetricsPublisher(config, report, channel, links=links, now=now)
