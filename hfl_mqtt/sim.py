"""Run a whole federation on this machine (``hfl-mqtt sim``): brokers, nodes, results.

Brokers are started as configured (one, or one per edge bridged to the cloud's); every node
is a real MQTT client. Aggregators run in this process; workers are spread over worker
processes so every core trains. The root's evaluation after each global round is shown live and
appended to ``metrics.jsonl``, and so is every status and metrics message of the nodes (a "node"
line, ``hfl_mqtt.simwatch``); at the end ``summary.json`` and a plot are written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any, TextIO

import structlog

from hfl_mqtt.brokers import (
    BridgeConfig,
    BrokerConfig,
    MosquittoBroker,
    edge_bridge_topics,
    find_mosquitto,
)
from hfl_mqtt.config import BrokerAddress, FederationConfig, NodeConfig
from hfl_mqtt.embedded import EmbeddedBroker, embedded_available
from hfl_mqtt.errors import BrokerError, CheckpointError, TransportError
from hfl_mqtt.linkmeter import LinkMeter
from hfl_mqtt.logs import configure_logging
from hfl_mqtt.roles.aggregator import EventCallback
from hfl_mqtt.roles.messages import STOP
from hfl_mqtt.roles.node import Checkpoints, run_node
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.simwatch import MessageCallback, NodeWatch, NodeWatcher, read_evaluations
from hfl_mqtt.telemetry import load_pyplot, plot_staleness, staleness_summary
from hfl_mqtt.topics import ctl_topic
from hfl_mqtt.transport.mqtt import MqttLink

__all__ = ["SUMMARY_VERSION", "Progress", "configure_logging", "read_evaluations", "simulate"]

SUMMARY_VERSION = 2
_STOP_TIMEOUT_S = 30.0
log = structlog.get_logger("hfl_mqtt.sim")


class Progress:
    """A one-line live display of the global rounds (plain lines when not on a terminal).

    With a time budget (the root's ``max_seconds``) the line shows the seconds against it
    instead of the rounds against their (then nominal) total; without a total (None: a Flower
    app's ServerApp counts them) it shows the rounds alone.
    """

    def __init__(
        self,
        total_rounds: int | None,
        stream: TextIO | None = None,
        *,
        max_seconds: float | None = None,
    ) -> None:
        self.total = total_rounds
        self.max_seconds = max_seconds
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._line_open = False

    def round(self, event: dict[str, Any]) -> None:
        if self.max_seconds is None and self.total is not None:
            where = f"round {event['global_round']:>3}/{self.total}  "
            clock = f"{event['seconds']:6.1f} s"
        elif self.max_seconds is None:
            where = f"round {event['global_round']:>3}  "
            clock = f"{event['seconds']:6.1f} s"
        else:
            where = f"round {event['global_round']:>3}  "
            clock = f"{event['seconds']:6.1f}/{self.max_seconds:g} s"
        line = (
            f"{where}accuracy {event['accuracy']:.4f}  loss {event['loss']:.4f}  "
            f"{clock}  {event['tree_bytes'] / 1e6:8.2f} MB sent"
        )
        if self.live:
            self.stream.write("\r" + line)
            self._line_open = self.total is None or event["global_round"] < self.total
            if not self._line_open:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, text: str) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()


def _run_worker_group(
    configs: list[str], log_level: int, ready: Queue[int] | None = None
) -> list[dict[str, Any]]:
    """Entry point of a worker process: run its workers until they are told to stop; put
    their number on ``ready`` once every one of them is connected."""
    configure_logging(log_level)
    nodes = [NodeConfig.model_validate_json(text) for text in configs]
    waiting = len(nodes)

    def connected() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0 and ready is not None:
            ready.put(len(nodes))

    async def run_all() -> list[NodeReport]:
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(run_node(node, connected=connected)) for node in nodes]
        return [task.result() for task in running]

    return [report.to_dict() for report in asyncio.run(run_all())]


@contextlib.contextmanager
def _brokers(
    config: FederationConfig,
    workdir: Path,
    progress: Progress | None,
    meters: dict[str, LinkMeter] | None = None,
) -> Iterator[dict[str, BrokerAddress]]:
    """Start the brokers the federation asks for; yield which node's subtree uses which.

    Without a ``mosquitto`` binary, one embedded amqtt broker (MQTT 3.1.1) stands in, if the
    ``embedded`` extra is installed. With ``meters`` (a dict to fill), a ``LinkMeter`` stands in
    front of every broker, keyed by the node it serves; edge bridges reach the cloud through the
    cloud's.
    """
    root = config.levels[0].name
    if find_mosquitto() is None:
        if not embedded_available():
            raise BrokerError(
                "no mosquitto binary on PATH: install Mosquitto (apt-get install mosquitto), "
                "or the embedded fallback broker (pip install 'hfl-mqtt[embedded]')"
            )
        if config.brokers == "per_edge":
            raise BrokerError("per_edge brokers need Mosquitto (bridges): install it")
        if progress is not None:
            progress.say("no mosquitto on PATH: using the embedded amqtt broker (MQTT 3.1.1)")
        with EmbeddedBroker() as embedded, contextlib.ExitStack() as stack:
            if meters is not None:
                meters[root] = stack.enter_context(LinkMeter(embedded.host, embedded.port))
            yield {root: BrokerAddress(host=embedded.host, port=embedded.port, protocol="mqtt311")}
        return
    with contextlib.ExitStack() as stack:
        cloud = stack.enter_context(MosquittoBroker(BrokerConfig(), workdir / "broker-cloud"))
        addresses = {root: BrokerAddress(host=cloud.host, port=cloud.port)}
        bridge_to = (cloud.host, cloud.port)
        if meters is not None:
            meters[root] = stack.enter_context(LinkMeter(cloud.host, cloud.port))
            bridge_to = (meters[root].host, meters[root].port)
        if config.brokers == "per_edge":
            tree = config.tree()
            parents = {kid: parent for parent, kids in tree.items() for kid in kids}
            edges = [node for node, kids in tree.items() if all(k not in tree for k in kids)]
            for edge in edges:
                if edge == root:
                    continue
                bridge = BridgeConfig(
                    name=edge,
                    address=bridge_to[0],
                    port=bridge_to[1],
                    topics=tuple(edge_bridge_topics(config.federation, edge, parents[edge])),
                )
                broker = stack.enter_context(
                    MosquittoBroker(BrokerConfig(bridge=bridge), workdir / f"broker-{edge}")
                )
                addresses[edge] = BrokerAddress(host=broker.host, port=broker.port)
                if meters is not None:
                    meters[edge] = stack.enter_context(LinkMeter(broker.host, broker.port))
        yield addresses


def _through_meters(
    config: FederationConfig,
    nodes: list[NodeConfig],
    brokers: dict[str, BrokerAddress],
    meters: dict[str, LinkMeter],
) -> list[NodeConfig]:
    """Point every connection that would cross a network link at its broker's meter: workers'
    always, and with a single broker every node's but the root's (an edge is elsewhere). An
    aggregator with a broker of its own, or beside the root's, is on that broker's host."""
    metered = {
        brokers[name]: brokers[name].model_copy(update={"host": m.host, "port": m.port})
        for name, m in meters.items()
    }
    root = config.levels[0].name

    def moved(address: BrokerAddress) -> BrokerAddress:
        return metered.get(address, address)

    result = []
    for node in nodes:
        remote = node.role == "worker" or (config.brokers == "single" and node.node != root)
        if remote:
            update: dict[str, Any] = {}
            if node.upstream is not None:
                update["upstream"] = node.upstream.model_copy(
                    update={"broker": moved(node.upstream.broker)}
                )
            if node.downstream is not None:
                update["downstream"] = node.downstream.model_copy(
                    update={"broker": moved(node.downstream.broker)}
                )
            result.append(node.model_copy(update=update))
        else:
            result.append(node)
    return result


async def _cancel_and_wait(run: asyncio.Future[Any]) -> None:
    """Cancel ``run`` and wait until it ends. Python 3.11's ``asyncio.wait_for`` loses a
    cancellation that arrives just as what it awaits completes: so cancel until it ends."""
    while not run.done():
        run.cancel()
        await asyncio.wait({run}, timeout=0.1)
    if not run.cancelled():
        run.exception()  # retrieved, so not logged; awaiting ``run`` still raises it


async def _stop_after(
    root: asyncio.Future[Any], nodes: list[NodeConfig], done: asyncio.Future[Any]
) -> None:
    """Once ``root`` has ended, repeat the stop to ``nodes`` until ``done``."""
    await asyncio.wait({root})
    await _stop_nodes(nodes, done, "after-root")


async def _stop_nodes(
    nodes: list[NodeConfig], done: asyncio.Future[Any], name: str = "stop"
) -> None:
    """Send every node a stop on its control topic until ``done`` (bounded, best effort).

    A node still starting has not subscribed to its control topic yet, and a stop sent before
    that is lost (it is not retained): so the stop is repeated.
    """
    by_broker: dict[BrokerAddress, list[str]] = {}
    for node in nodes:
        assert node.upstream is not None
        topic = ctl_topic(node.federation, node.node)
        by_broker.setdefault(node.upstream.broker, []).append(topic)
    client_id = f"hfl-sim-{name}-{os.getpid()}"
    with contextlib.suppress(TransportError, TimeoutError):
        async with asyncio.timeout(_STOP_TIMEOUT_S), contextlib.AsyncExitStack() as stack:
            links: list[tuple[MqttLink, list[str]]] = []
            # Two addresses may be one broker (directly and through a link meter): one client
            # id each, or the broker would hand one session back and forth between them.
            for index, (broker, topics) in enumerate(by_broker.items()):
                link = MqttLink(
                    broker.host, broker.port, f"{client_id}-{index}", protocol=broker.protocol
                )
                links.append((await stack.enter_async_context(link), topics))
            while not done.done():
                for entered, topics in links:
                    for topic in topics:
                        await entered.publish(topic, STOP)
                await asyncio.wait({done}, timeout=0.5)


def _level_totals(
    config: FederationConfig, reports: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Payload bytes and messages per level: ``up`` is what the level's nodes sent to their
    parents, ``down`` what the level's aggregators published to their children."""
    names = [level.name for level in config.levels]
    volume = {name: {"up": 0, "down": 0} for name in names}
    count = {name: {"up": 0, "down": 0} for name in names}
    for report in reports:
        name = names[report["level"]]
        for direction, kind in (("up", "up"), ("down", "model")):
            stats = (report[direction] or {}).get("by_kind", {}).get(kind)
            if stats:
                volume[name][direction] += stats["bytes_sent"]
                count[name][direction] += stats["messages_sent"]
    return volume, count


async def _run_nodes(
    nodes: list[NodeConfig],
    groups: int,
    log_level: int,
    on_event: EventCallback,
    checkpoints: Checkpoints,
    workers_first: bool = False,
) -> tuple[list[NodeReport], list[dict[str, Any]]]:
    """Run the aggregators here and the workers in ``groups`` processes, until all have ended
    (or one has failed: then the others are stopped). ``workers_first``: start the aggregators
    once every worker is connected."""
    workers = [n for n in nodes if n.role == "worker"]
    aggregators = [n for n in nodes if n.role != "worker"]
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    # The manager outlives the pool: its worker processes hold proxies of its queue.
    with (
        context.Manager() if workers_first else contextlib.nullcontext() as manager,
        ProcessPoolExecutor(groups, mp_context=context) as pool,
    ):
        ready = manager.Queue() if manager is not None else None
        shares = [workers[i::groups] for i in range(groups)]
        worker_runs = [
            loop.run_in_executor(
                pool, _run_worker_group, [w.model_dump_json() for w in share], log_level, ready
            )
            for share in shares
        ]
        if ready is not None:
            await _workers_connected(ready, len(workers), worker_runs)
        aggregator_tasks = [
            asyncio.ensure_future(run_node(n, on_event=on_event, checkpoints=checkpoints))
            for n in aggregators
        ]
        aggregator_runs = asyncio.gather(*aggregator_tasks)
        workers_done = asyncio.gather(*worker_runs, return_exceptions=True)
        runs: set[asyncio.Future[Any]] = {aggregator_runs, *worker_runs}
        # The root tells its subtree to stop when it is done; a node that was not listening
        # yet (still starting, at a short max_seconds) would miss it and keep the run going.
        everyone_else = asyncio.gather(*aggregator_tasks[1:], workers_done, return_exceptions=True)
        stopper = asyncio.ensure_future(_stop_after(aggregator_tasks[0], nodes[1:], everyone_else))
        try:
            await asyncio.wait(runs, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            if not (aggregator_runs.done() and workers_done.done()):
                # An aggregator failed, a worker process failed (its task did not load, it
                # died), or we are cancelled: the other nodes would wait for it forever (a
                # root waits for its minimum of children), and leaving the pool waits for
                # every worker process. Stop the aggregators here, the workers by message.
                await _cancel_and_wait(aggregator_runs)
                await _stop_nodes(workers, workers_done)
        worker_reports = [r for group in await asyncio.gather(*worker_runs) for r in group]
        aggregator_reports = await aggregator_runs
        await stopper
    return aggregator_reports, worker_reports


async def _workers_connected(
    ready: Queue[int], workers: int, runs: list[asyncio.Future[Any]]
) -> None:
    """Wait until ``workers`` are connected (the groups' counts on ``ready``), or a group ended
    first (it failed: its error surfaces where the runs are awaited)."""
    connected = 0
    while connected < workers and not any(run.done() for run in runs):
        with contextlib.suppress(queue.Empty):
            connected += await asyncio.to_thread(ready.get, True, 0.2)


async def simulate(
    config: FederationConfig,
    out: Path,
    *,
    progress: Progress | None = None,
    processes: int | None = None,
    log_level: int = logging.WARNING,
    meter_links: bool = False,
    resume: Path | None = None,
    on_node_message: MessageCallback | None = None,
    watcher: NodeWatcher | None = None,
    workers_first: bool = False,
) -> dict[str, Any]:
    """Run ``config`` to the end; write ``out/summary.json``, ``metrics.jsonl``, the plot.

    The aggregators checkpoint into ``out/state/{node}``. With ``resume`` (an earlier run's
    ``out``), they go on from that run's checkpoints (``CheckpointError`` if they belong to
    another config); the workers start afresh, as restarted devices would. ``metrics.jsonl``
    then holds this run's evaluations, the summary and the plot the whole run's.

    With ``meter_links``, the bytes crossing each network link are measured on the wire by
    byte-counting proxies (``hfl_mqtt.linkmeter``): ``links`` in the summary (with each
    meter's CPU seconds), and in every evaluation ``link_bytes`` (each meter's count, by the
    node whose broker it fronts) and ``cloud_link_bytes`` (the links into the root's broker).
    Every evaluation carries its wall-clock time (``wall``), to line it up with other clocks.
    With ``workers_first``, the aggregators start only once every worker is connected, so the
    root's first model goes out to the whole federation (one start for every mode's clock).

    The nodes' status and metrics messages go to ``metrics.jsonl`` too, and to
    ``on_node_message`` (topic, payload, wall time) if given: a dashboard's view. A ``watcher``
    (the dashboard's process) hears them instead, and appends them to ``metrics.jsonl`` itself.
    """
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    workdir = out / "run"
    # Brokers start afresh: a database left by an earlier run would hand its retained models
    # and sessions to this one.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    state = out / "state"
    if resume is not None and resume.resolve() != out.resolve():
        if not (resume / "state").is_dir():
            raise CheckpointError(f"{resume} holds no checkpoints (no {resume / 'state'})")
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(resume / "state", state)
    metrics_path = out / "metrics.jsonl"
    events: list[dict[str, Any]] = []
    meters: dict[str, LinkMeter] | None = {} if meter_links else None
    metrics_path.write_text("")
    with (
        _brokers(config, workdir, progress, meters) as brokers,
        # Appending: a watcher's process appends to the same file (a whole line a write).
        metrics_path.open("a", encoding="utf-8") as metrics_file,
    ):
        nodes = [
            n if n.role == "worker" else n.model_copy(update={"state_dir": state / n.node})
            for n in config.node_configs(brokers)
        ]
        if meters is not None:
            nodes = _through_meters(config, nodes, brokers, meters)
        workers = [n for n in nodes if n.role == "worker"]
        aggregators = [n for n in nodes if n.role != "worker"]
        groups = min(processes or os.cpu_count() or 1, len(workers))
        if progress is not None:
            progress.say(
                f"{config.federation}: {len(config.levels)} levels, {len(aggregators)} "
                f"aggregators, {len(workers)} workers in {groups} processes, "
                f"{len(brokers)} broker(s) on ports "
                f"{', '.join(str(b.port) for b in brokers.values())}"
            )

        def on_event(event: dict[str, Any]) -> None:
            _stamp(event, meters, config.levels[0].name)
            events.append(event)
            metrics_file.write(json.dumps(event) + "\n")
            metrics_file.flush()
            if progress is not None:
                progress.round(event)

        async with contextlib.AsyncExitStack() as watching:
            if watcher is not None:
                await watcher.watch(config.federation, brokers.values(), metrics_path)
                watching.push_async_callback(watcher.drain)
            else:
                watch = NodeWatch(
                    config.federation, brokers.values(), metrics_file, on_message=on_node_message
                )
                await watching.enter_async_context(watch)
            aggregator_reports, worker_reports = await _run_nodes(
                nodes,
                groups,
                log_level,
                on_event,
                "fresh" if resume is None else "resume",
                workers_first,
            )
        links = {
            name: {
                "up": c.up,
                "down": c.down,
                "connections": c.connections,
                "cpu_seconds": m.cpu_seconds(),
            }
            for name, m, c in ((name, m, m.counts()) for name, m in (meters or {}).items())
        }
    reports = [r.to_dict() for r in aggregator_reports] + worker_reports
    # A resumed run's summary and plot cover the whole run; metrics.jsonl holds this part.
    earlier = _earlier_events(resume) if resume is not None else []
    events = earlier + events
    summary = _summary(config, reports, events, time.monotonic() - started, brokers)
    if meters is not None:
        summary["links"] = links
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(config, events, reports, out)
    return summary


def _stamp(event: dict[str, Any], meters: dict[str, LinkMeter] | None, root: str) -> None:
    """Stamp an evaluation with the wall clock and, with meters, every meter's count so far."""
    event["wall"] = round(time.time(), 3)
    if meters is not None:
        event["link_bytes"] = {name: m.counts().total for name, m in meters.items()}
        event["cloud_link_bytes"] = event["link_bytes"][root]


def _earlier_events(resume: Path) -> list[dict[str, Any]]:
    """The evaluations of the run ``resume`` holds (its metrics.jsonl), if it kept them."""
    path = resume / "metrics.jsonl"
    if not path.exists():
        return []
    return read_evaluations(path)


def _summary(
    config: FederationConfig,
    reports: list[dict[str, Any]],
    events: list[dict[str, Any]],
    wall_seconds: float,
    brokers: dict[str, BrokerAddress],
) -> dict[str, Any]:
    volume, count = _level_totals(config, reports)
    rejected: Counter[str] = Counter()
    for report in reports:
        rejected.update(report["updates_rejected"])
    last = events[-1] if events else {}
    return {
        "summary_version": SUMMARY_VERSION,
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "global_rounds": len(events),
        "wall_seconds": round(wall_seconds, 3),
        "levels": len(config.levels),
        "workers": config.num_workers,
        "bytes": volume,
        "messages": count,
        "total_bytes": sum(v["up"] + v["down"] for v in volume.values()),
        "updates_accepted": sum(r["updates_accepted"] for r in reports),
        "updates_rejected": dict(rejected),
        "staleness": staleness_summary(config, reports),
        "privacy": _privacy_summary(config, reports),
        "brokers": len(brokers),
        "nodes": reports,
        "config": config.model_dump(mode="json"),
    }


def _privacy_summary(
    config: FederationConfig, reports: list[dict[str, Any]]
) -> dict[str, dict[str, Any]] | None:
    """Per level with privacy on, the most any of its nodes spent (epsilon None: unbounded)."""
    by_level: dict[str, dict[str, Any]] = {}
    for report in reports:
        spent = report.get("privacy")
        if not spent:
            continue
        level = config.levels[report["level"]].name
        worst = by_level.get(level)
        epsilon = spent["epsilon"]
        if worst is None:
            by_level[level] = {**{k: v for k, v in spent.items() if k != "clip_norm"}, "nodes": 1}
            continue
        worst["nodes"] += 1
        worst["releases"] = max(worst["releases"], spent["releases"])
        if worst["epsilon"] is not None and (epsilon is None or epsilon > worst["epsilon"]):
            worst["epsilon"] = epsilon
    return by_level or None


def _plot(
    config: FederationConfig, events: list[dict[str, Any]], reports: list[dict[str, Any]], out: Path
) -> None:
    """accuracy.png after any global round; staleness.png if any update was accepted."""
    if not events and not any(r.get("arrivals") for r in reports):
        return
    plt = load_pyplot()
    if plt is None:
        return
    if events:
        _plot_accuracy(plt, events, out)
    plot_staleness(plt, config, reports, out)


def _plot_accuracy(plt: Any, events: list[dict[str, Any]], out: Path) -> None:
    """accuracy.png: test accuracy against global round and against bytes sent."""
    rounds = [e["global_round"] for e in events]
    accuracy = [e["accuracy"] for e in events]
    megabytes = [e["tree_bytes"] / 1e6 for e in events]
    figure, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    by_round.plot(rounds, accuracy, marker="o", markersize=3)
    by_round.set_xlabel("global round")
    by_round.set_ylabel("test accuracy")
    by_bytes.plot(megabytes, accuracy, marker="o", markersize=3, color="tab:orange")
    by_bytes.set_xlabel("payload bytes sent in the whole tree (MB)")
    for axis in (by_round, by_bytes):
        axis.grid(alpha=0.3)
    figure.suptitle(f"final accuracy {accuracy[-1]:.4f} after {rounds[-1]} global rounds")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)
