"""The monitor as a Prometheus exporter: the view's snapshot in Prometheus names and labels.

Every node's series carry ``federation``, ``node``, ``role``, ``level`` and ``parent``:

==========================================  =======  ===============================================
metric                                      type     what
==========================================  =======  ===============================================
``hfl_node_up``                             gauge    1 online or idle, 0 offline or unknown
``hfl_node_model_version``                  gauge    model version the node holds
``hfl_node_round``                          gauge    rounds done
``hfl_node_updates_accepted_total``         counter  updates accepted
``hfl_node_updates_rejected_total``         counter  updates rejected, by ``reason``
``hfl_node_bytes_sent_total``               counter  payload bytes sent, by topic ``kind``
``hfl_node_bytes_received_total``           counter  payload bytes received, by ``kind``
``hfl_node_messages_sent_total``            counter  messages sent, by ``kind``
``hfl_node_messages_received_total``        counter  messages received, by ``kind``
``hfl_node_reconnects_total``               counter  reconnects to the broker
``hfl_node_trained_total``                  counter  training runs (workers)
``hfl_node_resident_memory_bytes``          gauge    the node's process's resident memory
``hfl_node_cpu_seconds_total``              counter  the node's process's CPU time
``hfl_node_uptime_seconds``                 gauge    seconds since the node started
``hfl_node_record_age_seconds``             gauge    seconds since the node's last record
``hfl_node_staleness``                      gauge    staleness of accepted updates, by ``quantile``
                                                     (0.5, 0.95, 1 = max; aggregators)
``hfl_node_staleness_updates_total``        counter  accepted updates the staleness covers
``hfl_level_staleness``                     gauge    the same merged per receiving ``level``
``hfl_node_privacy_epsilon``                gauge    differential privacy spent (epsilon at the
                                                     node's delta), by ``kind`` (central, local)
``hfl_federation_accuracy``                 gauge    the root's last evaluation
``hfl_federation_loss``                     gauge    its loss
``hfl_federation_evaluated_version``        gauge    the version it evaluated
``hfl_federation_evaluations_total``        counter  evaluations so far
``hfl_federation_nodes``                    gauge    nodes known, and ``hfl_federation_nodes_up``
==========================================  =======  ===============================================

Byte and message rates are Prometheus's to compute (``rate(hfl_node_bytes_sent_total[1m])``).
The snapshot is taken on the event loop (the view is not thread-safe); the text is generated
from it in a thread, so a large tree's scrape does not stall the loop.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hfl_mqtt.errors import ConfigError
from hfl_mqtt.monitor.view import FederationView

__all__ = ["SnapshotCollector", "exposition", "prometheus_app", "serving"]

NODE_LABELS = ["federation", "node", "role", "level", "parent"]
_QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("1", "max"))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class SnapshotCollector(Collector):
    """Metrics of one snapshot (``FederationView.snapshot``), given by ``snapshot()``."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed set: the registry must not collect to learn the names

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        fed = snap.get("federation") or ""

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=NODE_LABELS + (extra or []))

        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=NODE_LABELS + (extra or []))

        up = gauge("hfl_node_up", "1 if the node is online or idle, 0 if offline or unknown")
        version = gauge("hfl_node_model_version", "Model version the node holds")
        rounds = gauge("hfl_node_round", "Rounds the node has done")
        accepted = counter("hfl_node_updates_accepted", "Updates the node accepted")
        rejected = counter("hfl_node_updates_rejected", "Updates the node rejected", ["reason"])
        bytes_sent = counter("hfl_node_bytes_sent", "Payload bytes sent", ["kind"])
        bytes_received = counter("hfl_node_bytes_received", "Payload bytes received", ["kind"])
        messages_sent = counter("hfl_node_messages_sent", "Messages sent", ["kind"])
        messages_received = counter("hfl_node_messages_received", "Messages received", ["kind"])
        reconnects = counter("hfl_node_reconnects", "Reconnects to the broker")
        trained = counter("hfl_node_trained", "Training runs")
        memory = gauge("hfl_node_resident_memory_bytes", "Resident memory of the node's process")
        cpu = counter("hfl_node_cpu_seconds", "CPU time of the node's process")
        uptime = gauge("hfl_node_uptime_seconds", "Seconds since the node started")
        age = gauge("hfl_node_record_age_seconds", "Seconds since the node's last record")
        staleness = gauge(
            "hfl_node_staleness", "Staleness of the updates the node accepted", ["quantile"]
        )
        covered = counter("hfl_node_staleness_updates", "Accepted updates the staleness covers")
        epsilon = gauge(
            "hfl_node_privacy_epsilon", "Differential privacy spent (epsilon)", ["kind"]
        )

        for node in snap["nodes"]:
            labels = [
                fed,
                node["id"],
                node["role"] or "",
                "" if node["level"] is None else str(node["level"]),
                node["parent"] or "",
            ]
            up.add_metric(labels, 1.0 if node["status"] in ("online", "idle") else 0.0)
            for family, key in (
                (version, "version"),
                (rounds, "round"),
                (accepted, "accepted"),
                (reconnects, "reconnects"),
                (trained, "trained"),
                (memory, "rss"),
                (cpu, "cpu_s"),
                (uptime, "uptime_s"),
                (age, "age_s"),
            ):
                value = _number(node.get(key))
                if value is not None:
                    family.add_metric(labels, value)
            for reason, count in (node.get("rejected") or {}).items():
                rejected.add_metric([*labels, reason], float(count))
            for kind, row in (node.get("traffic") or {}).items():
                messages_sent.add_metric([*labels, kind], float(row[0]))
                bytes_sent.add_metric([*labels, kind], float(row[1]))
                messages_received.add_metric([*labels, kind], float(row[2]))
                bytes_received.add_metric([*labels, kind], float(row[3]))
            summary = node.get("staleness") or {}
            for quantile, key in _QUANTILES:
                value = _number(summary.get(key))
                if value is not None:
                    staleness.add_metric([*labels, quantile], value)
            count = _number(summary.get("n"))
            if count is not None:
                covered.add_metric(labels, count)
            privacy = node.get("privacy") or {}
            spent = _number(privacy.get("epsilon"))
            if spent is not None:
                epsilon.add_metric([*labels, str(privacy.get("kind", ""))], spent)
        yield from (up, version, rounds, accepted, rejected, bytes_sent, bytes_received)
        yield from (messages_sent, messages_received, reconnects, trained, memory, cpu, uptime)
        yield from (age, staleness, covered, epsilon)
        yield from self._federation(fed, snap)

    @staticmethod
    def _federation(fed: str, snap: dict[str, Any]) -> Iterable[Metric]:
        level_staleness = GaugeMetricFamily(
            "hfl_level_staleness",
            "Staleness of the updates a level's aggregators accepted",
            labels=["federation", "level", "quantile"],
        )
        for level, summary in snap["staleness"].items():
            for quantile, key in _QUANTILES:
                value = _number(summary.get(key))
                if value is not None:
                    level_staleness.add_metric([fed, level, quantile], value)
        yield level_staleness
        totals = snap["totals"]
        yield _one("hfl_federation_nodes", "Nodes known", fed, totals["nodes"])
        yield _one("hfl_federation_nodes_up", "Nodes online or idle", fed, totals["online"])
        points = snap["accuracy"]
        evaluations = CounterMetricFamily(
            "hfl_federation_evaluations", "Evaluations of the global model", labels=["federation"]
        )
        evaluations.add_metric([fed], float(len(points)))
        yield evaluations
        if points:
            last = points[-1]
            accuracy = last["accuracy"]
            yield _one("hfl_federation_accuracy", "Accuracy of the last evaluation", fed, accuracy)
            if last["loss"] is not None:
                yield _one("hfl_federation_loss", "Loss of the last evaluation", fed, last["loss"])
            if last["version"] is not None:
                yield _one(
                    "hfl_federation_evaluated_version",
                    "Version of the last evaluated global model",
                    fed,
                    last["version"],
                )


def _one(name: str, doc: str, fed: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["federation"])
    family.add_metric([fed], float(value))
    return family


def exposition(snapshot: dict[str, Any]) -> bytes:
    """The Prometheus text format of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry)


def prometheus_app(
    view: FederationView, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """An aiohttp app serving ``GET /metrics`` (and ``/`` the same) from ``view``."""

    async def metrics(request: web.Request) -> web.Response:
        snapshot = view.snapshot(clock())  # on the loop: the view is not thread-safe
        body = await asyncio.to_thread(exposition, snapshot)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", metrics)
    return app


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``app`` on ``host:port`` in this event loop; yields the bound port (0: any free)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(
                f"cannot serve Prometheus metrics on {host}:{port}: {reason} "
                "(choose another HOST:PORT)"
            ) from None
        addresses = runner.addresses
        yield int(addresses[0][1]) if addresses else port
    finally:
        await runner.cleanup()
