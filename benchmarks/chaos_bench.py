"""Chaos benchmark: real node processes, real kills, and what each failure costs the federation.

A 3-level federation (a synchronous cloud, ``--edges`` synchronous edges of ``--workers-per-edge``
workers; digits, softmax; deadlines and a minimum participation at every aggregator;
``checkpoint_every: 1``) runs as separate ``python -m hfl_mqtt.cli run --log-format json``
processes: the cloud alone, each edge alone, the workers ``--workers-per-process`` to a process,
so a ``kill -9`` is a real crash. Every aggregator checkpoints into the run's own directory. The
brokers are private Mosquitto processes on free loopback ports, with the settings the project
ships (``brokers/cloud.conf``: persistence, the database saved every 10 s).

Scenarios, each after ``--fault-after`` global rounds, at a random moment of the next round:

- ``broker_persistence`` / ``broker_no_persistence`` (a): the broker killed -9, down
  ``--outage-s``, started again on the same port with its database as last saved, or without
  persistence;
- ``workers`` (b): worker processes holding ``--worker-kill-fraction`` of the workers (rounded
  up; one worker a process by default) killed -9 at random moments within two rounds, each
  restarted ``--outage-s`` later;
- ``edge`` (c): ``edge-0``'s process killed -9 and restarted (it resumes from its checkpoint);
  with ``fallback_parents: true`` when ``FederationConfig`` has that setting;
- ``cloud`` (d): the cloud's process killed -9 and restarted (it resumes at the same version);
- ``injection`` (e): garbage, oversized (3 MiB declaring a 1 GiB body), replayed (a captured
  delta again) and spoofed (a captured message re-encoded with another node as its sender)
  payloads published with ``mosquitto_pub`` on every topic kind (model, up, status, ctl) of a
  worker, an edge and the cloud, in three bursts a round apart;
- ``site_cut`` (f): one broker per edge, bridged to the cloud's broker through a TCP relay of this
  script; ``edge-0``'s relay drops its connections and refuses new ones for ``--outage-s``.

Each is compared with a clean run of the same seed and broker layout, for every ``--seeds``
(clean runs first for even seeds, last for odd ones). Accounting survives kills:
an observer (one MQTT client per broker, subscribed to ``hfl/{fed}/#``) decodes every delta's
header (update id, sender, base version) as "sent"; "accepted" are the aggregators' ``update
accepted`` log lines followed by a ``round closed`` in the same process (an update taken by a node
that was killed before closing its round is not counted). The global rounds and their accuracy
come from the cloud's ``global round`` lines. Times count from the cloud's first model seen by the
observer. A node's move to another parent and back is read from the statuses it publishes (each
names its parent). The stall target counts from the moment the failed part is back or, if that
comes first, its children have all re-homed. Plots (accuracy against time, one panel per seed,
failures marked) go next to the JSON; ``--results-md`` rewrites the chaos section of RESULTS.md
from the results, ``--from-json`` does it (and the plots) again from a saved JSON.

    python benchmarks/chaos_bench.py --json benchmarks/out/chaos.json \\
        --results-md benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hfl_mqtt.brokers import (
    BridgeConfig,
    BrokerConfig,
    MosquittoBroker,
    edge_bridge_topics,
    find_mosquitto,
    free_port,
)
from hfl_mqtt.codec import Envelope, decode_envelope, encode_envelope
from hfl_mqtt.codec.chunking import CHUNK_MAGIC
from hfl_mqtt.codec.envelope import FLAG_ZSTD, FORMAT_VERSION, FRAME, FRAME_MAGIC
from hfl_mqtt.config import BrokerAddress, FederationConfig, LevelConfig
from hfl_mqtt.errors import DecodeError
from hfl_mqtt.topics import ctl_topic, model_topic, status_topic, up_topic

SCENARIOS = (
    "broker_persistence",
    "broker_no_persistence",
    "workers",
    "edge",
    "cloud",
    "injection",
    "site_cut",
)
TARGET_STALL_S = 5.0
TARGET_ACCURACY_POINTS = 0.01
END_GRACE_S = 30.0
"""How long the other processes may take to exit once the cloud has ended the run."""
STAYS_FOR = 3
"""Evaluations in a row at or above the target for it to count as reached."""
_SESSION_EXPIRY_S = 3600
_QUIET = logging.getLogger("chaos_bench.observer")
"""The observer's MQTT client logger: the broker crashes on purpose, its resets are no news."""
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


# --- the federation ---------------------------------------------------------------------------


def federation(args: argparse.Namespace, scenario: str, seed: int) -> FederationConfig:
    """The federation every run uses; ``site_cut`` on bridged per-edge brokers, ``edge`` with
    fallback parents when the config knows them."""
    levels = [
        LevelConfig(
            name="cloud",
            rounds=args.rounds,
            deadline_s=args.cloud_deadline_s,
            min_fraction=args.cloud_min_fraction,
            downlink_codec="fp16",
        ),
        LevelConfig(
            name="edge",
            rounds=1,
            deadline_s=args.edge_deadline_s,
            min_fraction=args.edge_min_fraction,
            uplink_codec="q8",
        ),
        LevelConfig(name="worker", uplink_codec="q8"),
    ]
    for level in levels:
        assert level.checkpoint_every == 1
    data: dict[str, Any] = {
        "federation": f"chaos-{scenario.replace('_', '-')}",
        "levels": [level.model_dump(mode="json") for level in levels],
        "fanout": [args.edges, args.workers_per_edge],
        "seed": seed,
        "brokers": "per_edge" if scenario == "site_cut" else "single",
        "task": {
            "dataset": "digits",
            "model": "softmax",
            "seed": seed,
            "partition": {"scheme": "iid"},
            "train": {
                "epochs": args.epochs,
                "batch_size": 16,
                "learning_rate": args.learning_rate,
            },
        },
    }
    if scenario == "edge" and has_fallback_parents():
        data["fallback_parents"] = True
    return FederationConfig.model_validate(data)


def has_fallback_parents() -> bool:
    """Whether ``FederationConfig`` can give workers fallback parents (live re-parenting)."""
    return "fallback_parents" in FederationConfig.model_fields


# --- processes --------------------------------------------------------------------------------


@dataclass
class Exit:
    incarnation: int
    code: int
    killed: bool
    at: float


@dataclass
class NodeProcess:
    """One ``hfl-mqtt run`` process (one or more nodes), started again after a kill."""

    name: str
    nodes: list[str]
    configs: list[Path]
    workdir: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    exits: list[Exit] = field(default_factory=list)
    killed_now: bool = False

    def start(self) -> None:
        self.incarnation += 1
        self.killed_now = False
        argv = [sys.executable, "-m", "hfl_mqtt.cli", "run", "--log-format", "json"]
        for path in self.configs:
            argv += ["--config", str(path)]
        with (
            self.log_path(self.incarnation).open("wb") as err,
            self.out_path(self.incarnation).open("wb") as out,
        ):
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,
            )

    def log_path(self, incarnation: int) -> Path:
        return self.workdir / "logs" / f"{self.name}.{incarnation}.log"

    def out_path(self, incarnation: int) -> Path:
        return self.workdir / "logs" / f"{self.name}.{incarnation}.out"

    def kill(self) -> None:
        """SIGKILL this process (by its own pid) and wait for it."""
        if self.popen is not None and self.popen.poll() is None:
            self.killed_now = True
            self.popen.kill()
            self.reap()

    def reap(self) -> bool:
        """Record the exit of the current incarnation if it has ended; True if it has."""
        if self.popen is None:
            return True
        code = self.popen.poll()
        if code is None:
            return False
        self.exits.append(Exit(self.incarnation, code, self.killed_now, time.time()))
        self.popen = None
        return True

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout``: the end of a run that did not finish."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.reap()


# --- the observer -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """A node's status message as the observer saw it (``parent``: where the node says it is)."""

    at: float
    node: str
    state: str
    parent: str | None
    retained: bool


@dataclass(frozen=True, slots=True)
class Sent:
    update_id: str
    sender: str
    parent: str
    base_version: int | None
    seen: float


class Observer:
    """MQTT clients (one per broker) that record every delta sent, model published and status
    changed, reconnecting at once after a broker crash (persistent sessions, QoS 1)."""

    def __init__(self, federation: str, brokers: list[tuple[str, int]], tag: str) -> None:
        self.federation = federation
        self.brokers = brokers
        self.tag = tag
        self.sent: dict[str, Sent] = {}
        self.models: dict[tuple[str, int], float] = {}
        self.statuses: list[Status] = []
        self.samples: dict[str, bytes] = {}
        """The latest real message per topic (deltas and models), for replays and spoofs."""
        self.ignored: set[str] = set()
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for index, (host, port) in enumerate(self.brokers):
                group.create_task(self._watch(host, port, index), name=f"observer-{index}")

    async def _watch(self, host: str, port: int, index: int) -> None:
        while True:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = _SESSION_EXPIRY_S
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    identifier=f"chaos-observer-{self.tag}-{index}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=properties,
                    keepalive=5,
                    timeout=2,
                    logger=_QUIET,
                ) as client:
                    await client.subscribe(f"hfl/{self.federation}/#", qos=1)
                    async for message in client.messages:
                        if isinstance(message.payload, bytes):
                            await self._record(str(message.topic), message.payload, message.retain)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def _record(self, topic: str, payload: bytes, retained: bool) -> None:
        now = time.time()
        parts = topic.split("/")
        if len(parts) < 4 or parts[1] != self.federation:
            return
        node, kind = parts[2], parts[3]
        if kind == "status":
            with contextlib.suppress(ValueError, AttributeError):
                value = json.loads(payload)
                state, parent = value.get("state"), value.get("parent")
                if isinstance(state, str) and len(parts) == 4:
                    under = parent if isinstance(parent, str) else None
                    self.statuses.append(Status(now, node, state, under, retained))
        elif kind in ("model", "up") and not payload.startswith(CHUNK_MAGIC):
            try:
                header = decode_envelope(payload).header
            except DecodeError:
                return
            if header.federation != self.federation or header.update_id in self.ignored:
                return
            if kind == "model" and len(parts) == 4 and header.sender == node:
                self.models.setdefault((node, header.version), now)
                self.samples[topic] = payload
            elif kind == "up" and len(parts) == 5 and header.sender == parts[4]:
                if header.kind == "delta" and header.update_id not in self.sent:
                    self.sent[header.update_id] = Sent(
                        header.update_id, header.sender, node, header.base_version, now
                    )
                self.samples[topic] = payload
        async with self._changed:
            self._changed.notify_all()

    def versions(self, node: str) -> list[float]:
        """When each model version of ``node`` was first seen, in order."""
        return sorted(t for (n, _), t in self.models.items() if n == node)

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(predicate)
                return True
        except TimeoutError:
            return False

    def online_since(self, nodes: list[str], since: float) -> bool:
        live = {s.node for s in self.statuses if s.at >= since and s.state == "online"}
        return all(n in live for n in nodes)


# --- a relay that can cut a site's bridge ------------------------------------------------------


class Relay:
    """A TCP relay on loopback between an edge broker's bridge and the cloud broker; ``cut()``
    drops its connections and refuses new ones (a site's uplink gone), ``heal()`` listens again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def heal(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Event:
    at: float
    what: str
    target: str


class Run:
    """One federation run of one scenario (or a clean run), from brokers up to the accounting."""

    def __init__(
        self, args: argparse.Namespace, scenario: str, seed: int, clean: bool, workdir: Path
    ) -> None:
        self.args = args
        self.scenario = scenario
        self.seed = seed
        self.clean = clean
        self.name = f"{scenario}-clean" if clean else scenario
        self.workdir = workdir
        self.config = federation(args, scenario, seed)
        self.fed = self.config.federation
        self.rng = random.Random(seed * 1000 + SCENARIOS.index(scenario))
        self.brokers: dict[str, MosquittoBroker] = {}
        self.relays: dict[str, Relay] = {}
        self.processes: list[NodeProcess] = []
        self.events: list[Event] = []
        self.returned: float | None = None
        self.injected: Counter[str] = Counter()
        self.observer: Observer | None = None
        self.t0: float | None = None
        self.hung: list[str] = []

    # -- set-up

    async def _start_brokers(self) -> dict[str, BrokerAddress]:
        persistence = not (self.scenario == "broker_no_persistence" and not self.clean)
        # As shipped: a SIGKILL loses what changed since the last save (up to 10 s). Saving on
        # every change instead stalls Mosquitto (single-threaded) rewriting its database while
        # megabytes are queued.
        base = BrokerConfig(persistence=persistence)
        cloud = MosquittoBroker(base, self.workdir / "broker-cloud")
        await asyncio.to_thread(cloud.start)
        self.brokers["cloud"] = cloud
        addresses = {"cloud": BrokerAddress(host=cloud.host, port=cloud.port)}
        if self.config.brokers == "per_edge":
            for edge in self.config.tree()["cloud"]:
                relay = Relay((cloud.host, cloud.port))
                await relay.heal()
                self.relays[edge] = relay
                bridge = BridgeConfig(
                    name=edge,
                    address="127.0.0.1",
                    port=relay.port,
                    topics=tuple(edge_bridge_topics(self.fed, edge, "cloud")),
                )
                broker = MosquittoBroker(
                    base.model_copy(update={"bridge": bridge}), self.workdir / f"broker-{edge}"
                )
                await asyncio.to_thread(broker.start)
                self.brokers[edge] = broker
                addresses[edge] = BrokerAddress(host=broker.host, port=broker.port)
            for edge in self.relays:
                await self.brokers[edge].wait_bridge_connected()
        return addresses

    def _write_nodes(self, addresses: dict[str, BrokerAddress]) -> None:
        nodes_dir = self.workdir / "nodes"
        nodes_dir.mkdir(parents=True)
        (self.workdir / "logs").mkdir()
        env = {**os.environ, "HFL_MQTT_STATE_DIR": str(self.workdir / "state")}
        env.pop("HFL_MQTT_PASSWORD", None)
        paths: dict[str, Path] = {}
        for node in self.config.node_configs(addresses):
            data = node.model_dump(mode="json")
            if node.downstream is not None:
                data["state_dir"] = str(self.workdir / "state" / node.node)
            path = nodes_dir / f"{node.node}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            paths[node.node] = path
        tree = self.config.tree()

        def process(name: str, nodes: list[str]) -> NodeProcess:
            configs = [paths[n] for n in nodes]
            return NodeProcess(name, nodes, configs, self.workdir, env)

        self.processes.append(process("cloud", ["cloud"]))
        self.processes += [process(edge, [edge]) for edge in tree["cloud"]]
        size = self.args.workers_per_process
        for edge in tree["cloud"]:
            kids = tree[edge]
            for at in range(0, len(kids), size):
                group = kids[at : at + size]
                name = group[0] if len(group) == 1 else f"{group[0]}+{len(group)}"
                self.processes.append(process(name, group))

    def process(self, name: str) -> NodeProcess:
        return next(p for p in self.processes if p.name == name)

    def mark(self, what: str, target: str) -> float:
        now = time.time()
        self.events.append(Event(now, what, target))
        return now

    # -- the run

    async def execute(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True)
        launched = time.time()
        try:
            addresses = await self._start_brokers()
            self._write_nodes(addresses)
            observed = [(b.host, b.port) for b in self.brokers.values()]
            self.observer = Observer(self.fed, observed, self.name)
            finished = False
            async with asyncio.TaskGroup() as group:
                watching = group.create_task(self.observer.run(), name="observer")
                await asyncio.sleep(0.3)  # the observer's subscriptions come first
                for proc in self.processes:
                    proc.start()
                first = await self.observer.wait_for(
                    lambda: bool(self.observer and self.observer.versions("cloud")), 60
                )
                if first:
                    self.t0 = self.observer.versions("cloud")[0]
                fault = None if self.clean else group.create_task(self._fault(), name="fault")
                finished = await self._wait_end(self.args.run_timeout_s)
                if fault is not None and not fault.done():
                    fault.cancel()
                watching.cancel()
        finally:
            for proc in self.processes:
                proc.terminate(5)
            for relay in self.relays.values():
                await relay.cut()
            for broker in self.brokers.values():
                await asyncio.to_thread(broker.stop)
        return self._account(finished, launched)

    async def _wait_end(self, timeout: float) -> bool:
        """Until the cloud's last process has ended and the others have followed it (within
        ``END_GRACE_S``); True if the cloud ended well. Processes still running are ``hung``."""
        deadline = time.monotonic() + timeout
        cloud = self.process("cloud")
        while time.monotonic() < deadline:
            for proc in self.processes:
                proc.reap()
            if cloud.exits and not cloud.exits[-1].killed and cloud.popen is None:
                deadline = min(deadline, time.monotonic() + END_GRACE_S)
                if not any(p.running for p in self.processes):
                    break
            await asyncio.sleep(0.1)
        self.hung = [p.name for p in self.processes if p.running]
        return bool(cloud.exits) and cloud.popen is None and cloud.exits[-1].code == 0

    # -- faults

    async def _fault(self) -> None:
        assert self.observer is not None
        observer = self.observer
        wanted = self.args.fault_after + 1
        await observer.wait_for(lambda: len(observer.versions("cloud")) >= wanted, 120)
        times = observer.versions("cloud")
        gaps = [b - a for a, b in itertools.pairwise(times)]
        round_s = max(statistics.median(gaps) if gaps else 1.0, 0.2)
        await asyncio.sleep(self.rng.uniform(0.1, 0.9) * round_s)
        outage = self.args.outage_s
        scenario = self.scenario
        if scenario.startswith("broker"):
            broker = self.brokers["cloud"]
            self.mark("kill", "broker")
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(outage)
            await asyncio.to_thread(broker.start)
            self.returned = self.mark("back", "broker")
        elif scenario == "workers":
            groups = [p for p in self.processes if p.name not in self.config.tree()]
            share = self.args.worker_kill_fraction * self.config.num_workers
            wanted = max(1, math.ceil(share - 1e-9))
            victims: list[NodeProcess] = []
            for proc in self.rng.sample(groups, len(groups)):
                if sum(len(v.nodes) for v in victims) >= wanted:
                    break
                victims.append(proc)
            moments = sorted(self.rng.uniform(0, 2 * round_s) for _ in victims)
            async with asyncio.TaskGroup() as group:
                for victim, moment in zip(victims, moments, strict=True):
                    group.create_task(self._crash(victim, moment, outage))
            self.returned = max(e.at for e in self.events if e.what == "back")
        elif scenario in ("edge", "cloud"):
            await self._crash(self.process("edge-0" if scenario == "edge" else "cloud"), 0, outage)
            self.returned = max(e.at for e in self.events if e.what == "back")
        elif scenario == "injection":
            for burst in range(3):
                if burst:
                    await asyncio.sleep(round_s)
                self.mark("inject", f"burst {burst + 1}")
                await self._inject()
            self.returned = self.events[-1].at
        elif scenario == "site_cut":
            relay = self.relays["edge-0"]
            self.mark("cut", "edge-0 site")
            await relay.cut()
            await asyncio.sleep(outage)
            await relay.heal()
            self.returned = self.mark("back", "edge-0 site")

    async def _crash(self, proc: NodeProcess, after: float, outage: float) -> None:
        assert self.observer is not None
        await asyncio.sleep(after)
        if not proc.running:
            return  # it ended already (the run is over)
        self.mark("kill", proc.name)
        proc.kill()
        await asyncio.sleep(outage)
        started = self.mark("restart", proc.name)
        proc.start()
        observer = self.observer
        await observer.wait_for(lambda: observer.online_since(proc.nodes, started), 60)
        self.mark("back", proc.name)

    async def _inject(self) -> None:
        """Every payload kind on every topic kind of a worker, an edge and the cloud."""
        assert self.observer is not None
        fed = self.fed
        tree = self.config.tree()
        edge, other_edge = tree["cloud"][0], tree["cloud"][1]
        worker, other_worker = tree[edge][0], tree[edge][1]
        targets = {
            "model": [(model_topic(fed, edge), other_edge), (model_topic(fed, "cloud"), edge)],
            "up": [
                (up_topic(fed, edge, worker), other_worker),
                (up_topic(fed, "cloud", edge), other_edge),
            ],
            "status": [(status_topic(fed, worker), other_worker), (status_topic(fed, edge), "x")],
            "ctl": [(ctl_topic(fed, worker), other_worker), (ctl_topic(fed, edge), other_edge)],
        }
        samples = self.observer.samples
        any_delta = next(v for k, v in samples.items() if "/up/" in k)
        burst: list[tuple[str, bytes]] = []
        for kind, pairs in targets.items():
            for topic, impostor in pairs:
                real = samples.get(topic, any_delta)
                payloads = {
                    "garbage": self.rng.randbytes(200),
                    "oversized": oversized_payload(3 << 20),
                    "replayed": real,
                    "spoofed": self._spoof(real, impostor),
                }
                for what, payload in payloads.items():
                    burst.append((topic, payload))
                    self.injected[f"{kind}:{what}"] += 1
        # All at once: one after the other, a burst outlasted short rounds (each mosquitto_pub
        # waits for its PUBACK without TCP_NODELAY, ~50 ms).
        async with asyncio.TaskGroup() as group:
            for index, (topic, payload) in enumerate(burst):
                group.create_task(self._publish(topic, payload, index))

    def _spoof(self, payload: bytes, sender: str) -> bytes:
        """The same message re-encoded with ``sender`` in its header (a fresh update id)."""
        assert self.observer is not None
        envelope = decode_envelope(payload)
        header = envelope.header.model_copy(
            update={"sender": sender, "update_id": f"spoof{self.rng.getrandbits(64):x}"}
        )
        self.observer.ignored.add(header.update_id)
        if header.kind == "model":
            header = header.model_copy(update={"version": header.version + 1000})
        return encode_envelope(Envelope(header=header, tensors=envelope.tensors))

    async def _publish(self, topic: str, payload: bytes, index: int) -> None:
        broker = self.brokers["cloud"]
        path = self.workdir / f"payload-{index}.bin"
        path.write_bytes(payload)
        command = [mosquitto_pub(), "-h", broker.host, "-p", str(broker.port), "-q", "1"]
        command += ["-t", topic, "-f", str(path), "-i", f"chaos-injector-{index}"]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await process.wait()

    # -- accounting

    def _account(self, finished: bool, launched: float) -> dict[str, Any]:
        assert self.observer is not None
        t0 = self.t0 or launched
        logs = [
            (proc, inc, read_log(proc.log_path(inc)))
            for proc in self.processes
            for inc in range(1, proc.incarnation + 1)
        ]
        accepted: set[str] = set()
        accepted_lines: set[str] = set()
        rejected: Counter[str] = Counter()
        errors = 0
        rounds: list[tuple[float, int, float]] = []
        for proc, _inc, lines in logs:
            closed_at = [line["t"] for line in lines if line["event"] == "round closed"]
            last_close = max(closed_at, default=-math.inf)
            for line in lines:
                event = line["event"]
                if event == "update accepted":
                    accepted_lines.add(line["update_id"])
                    if line["t"] <= last_close:
                        accepted.add(line["update_id"])
                elif event == "update rejected":
                    rejected[str(line.get("reason"))] += 1
                elif event == "global round" and proc.name == "cloud":
                    rounds.append((line["t"], int(line["round"]), float(line["accuracy"])))
                if line.get("level") in ("error", "critical"):
                    errors += 1
        rounds.sort()
        end = rounds[-1][0] if rounds and finished else math.inf
        sent = {i: s for i, s in self.observer.sent.items() if s.seen <= end}
        after_end = len(self.observer.sent) - len(sent)
        newest_accepted: dict[str, float] = {}
        for s in sent.values():
            if s.update_id in accepted:
                newest_accepted[s.sender] = max(newest_accepted.get(s.sender, 0.0), s.seen)
        lost = [
            s
            for s in sent.values()
            if s.update_id not in accepted and newest_accepted.get(s.sender, 0.0) <= s.seen
        ]
        times = [t0, *(t for t, _, _ in rounds)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        moves = self._moves()
        rehomed = self._rehomed(moves)
        recovered = min((t for t in (self.returned, rehomed) if t is not None), default=None)
        stall_after = None
        if recovered is not None:
            later = [t for t in times if t > recovered]
            if later:
                stall_after = max(
                    [later[0] - recovered] + [b - a for a, b in itertools.pairwise(later)]
                )
        crashed = [
            f"{proc.name}#{e.incarnation} (exit {e.code})"
            for proc in self.processes
            for e in proc.exits
            if not e.killed
            and proc.name not in self.hung
            and (e.code != 0 or (rounds and e.at < rounds[-1][0] - 0.5))
        ]
        crashed += [f"{name} (still running after the run)" for name in self.hung]
        curve = [(round(t - t0, 3), r, a) for t, r, a in rounds]
        return {
            "scenario": self.name,
            "seed": self.seed,
            "finished": finished,
            "updates_sent": len(sent),
            "updates_accepted": len(accepted & sent.keys()),
            "updates_lost": len(lost),
            "lost_ids": [f"{s.sender}->{s.parent}@{s.base_version}" for s in lost][:20],
            "accepted_then_killed": len((accepted_lines - accepted) & sent.keys()),
            "sent_after_the_end": after_end,
            "max_stall_s": round(max(gaps), 3) if gaps else None,
            "stall_after_return_s": round(stall_after, 3) if stall_after is not None else None,
            "seconds_to_target": seconds_to_target(curve, self.args.target),
            "final_accuracy": round(rounds[-1][2], 4) if rounds else None,
            "global_rounds": len({r for _, r, _ in rounds}),
            "nodes_crashed": crashed,
            "error_lines": errors,
            "rejected": dict(rejected),
            "injected": dict(self.injected),
            "startup_s": round(t0 - launched, 3),
            "wall_s": round((rounds[-1][0] if rounds else time.time()) - t0, 3),
            "events": [
                {"t": round(e.at - t0, 3), "what": e.what, "target": e.target} for e in self.events
            ],
            "returned_t": round(self.returned - t0, 3) if self.returned else None,
            "rehomed_t": round(rehomed - t0, 3) if rehomed else None,
            "moves": [
                {"t": round(m.at - t0, 3), "what": m.what, "target": m.target} for m in moves
            ],
            "curve": curve,
        }

    def _moves(self) -> list[Event]:
        """Nodes leaving their home parent (``rehome``) and coming back (``home``), from the
        statuses they published (each names the parent the node is under; none: its home)."""
        assert self.observer is not None
        home = {child: parent for parent, kids in self.config.tree().items() for child in kids}
        under = dict(home)
        moves: list[Event] = []
        for status in sorted(self.observer.statuses, key=lambda s: s.at):
            node = status.node
            if node not in home or status.retained or status.state == "offline":
                continue
            parent = status.parent or home[node]
            if parent != under[node]:
                under[node] = parent
                what = "home" if parent == home[node] else "rehome"
                moves.append(Event(status.at, what, f"{node} -> {parent}"))
        return moves

    def _rehomed(self, moves: list[Event]) -> float | None:
        """When the last child of the killed aggregators moved to another parent after the
        first kill; None if some child did not move (or nothing with children was killed)."""
        names = {proc.name: proc for proc in self.processes}
        kills = [e for e in self.events if e.what == "kill" and e.target in names]
        tree = self.config.tree()
        children = {c for e in kills for n in names[e.target].nodes for c in tree.get(n, [])}
        if not children:
            return None
        moved: dict[str, float] = {}
        for move in moves:
            child = move.target.split(" -> ")[0]
            if move.what == "rehome" and move.at >= kills[0].at and child in children:
                moved.setdefault(child, move.at)
        return max(moved.values()) if moved.keys() == children else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a node process's stderr, each with its time as ``t`` (epoch seconds)."""
    lines: list[dict[str, Any]] = []
    if not path.exists():
        return lines
    for raw in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and "timestamp" in line and "event" in line:
            line["t"] = datetime.fromisoformat(line["timestamp"]).timestamp()
            lines.append(line)
    return lines


def seconds_to_target(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """The first time accuracy reaches ``target`` and stays there ``STAYS_FOR`` evaluations."""
    for at in range(len(curve) - STAYS_FOR + 1):
        if all(a >= target for _, _, a in curve[at : at + STAYS_FOR]):
            return curve[at][0]
    return None


def oversized_payload(size: int) -> bytes:
    """``size`` bytes framed as an envelope whose zstd body declares 1 GiB once decompressed."""
    body = b"\0" * (size - FRAME.size)
    prefix = FRAME.pack(
        FRAME_MAGIC, FORMAT_VERSION, FLAG_ZSTD, 0, 1 << 30, len(body), bytes(FRAME.size - 24)
    )
    return prefix + body


def mosquitto_version() -> str | None:
    """The first line of ``mosquitto -h`` (``mosquitto version 2.0.11``)."""
    binary = find_mosquitto()
    if binary is None:
        return None
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0] if done.stdout or done.stderr else None


def mosquitto_pub() -> str:
    found = shutil.which("mosquitto_pub")
    if found is None:
        raise SystemExit("chaos_bench: mosquitto_pub not found (apt-get install mosquitto-clients)")
    return found


# --- targets, plots, main ---------------------------------------------------------------------


STALL_TARGET = (
    f"stall <= {TARGET_STALL_S:g} s after the failed part returns or its children re-home"
)
SPREAD_FIELDS = (
    "updates_sent",
    "updates_accepted",
    "updates_lost",
    "max_stall_s",
    "stall_after_return_s",
    "seconds_to_target",
    "final_accuracy",
    "clean_final_accuracy",
)
RESULTS_BEGIN = "<!-- chaos-results: begin (written by benchmarks/chaos_bench.py --results-md) -->"
RESULTS_END = "<!-- chaos-results: end -->"


def check(record: dict[str, Any]) -> dict[str, str]:
    """The scenario's targets, met or missed."""

    def state(ok: bool) -> str:
        return "met" if ok else "missed"

    stall = record["stall_after_return_s"]
    clean, final = record["clean_final_accuracy"], record["final_accuracy"]
    targets = {
        "0 updates lost": state(record["finished"] and record["updates_lost"] == 0),
        STALL_TARGET: state(stall is not None and stall <= TARGET_STALL_S),
        "no node crashes but the killed": state(not record["nodes_crashed"]),
    }
    if clean is not None:
        targets["final accuracy within 1 point of the clean run"] = state(
            final is not None and abs(final - clean) <= TARGET_ACCURACY_POINTS + 1e-9
        )
    return targets


def spread(values: list[Any]) -> dict[str, Any]:
    """Median and range of a metric over seeds (``missing``: seeds where it has no value)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None, "missing": len(values)}
    return {
        "median": statistics.median(known),
        "min": min(known),
        "max": max(known),
        "missing": len(values) - len(known),
    }


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per scenario: each metric's median and range over the seeds, and in how many
    seeds each target was met."""
    summary = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        runs = [r for r in records if r["scenario"] == scenario]
        entry: dict[str, Any] = {"scenario": scenario, "seeds": [r["seed"] for r in runs]}
        for name in SPREAD_FIELDS:
            entry[name] = spread([r[name] for r in runs])
        entry["accuracy_vs_clean_points"] = spread(
            [
                round(100 * (r["final_accuracy"] - r["clean_final_accuracy"]), 2)
                if r["final_accuracy"] is not None and r["clean_final_accuracy"] is not None
                else None
                for r in runs
            ]
        )
        entry["nodes_crashed"] = sum(len(r["nodes_crashed"]) for r in runs)
        entry["targets"] = {
            name: f"met in {sum(r['targets'][name] == 'met' for r in runs)} of {len(runs)}"
            for name in runs[0]["targets"]
        }
        summary.append(entry)
    return summary


def plot(
    scenario: str, runs: list[tuple[dict[str, Any], dict[str, Any] | None]], path: Path
) -> None:
    """Accuracy against time, one panel per seed, the clean run dashed beside it, outages
    shaded, kills and cuts red, injections orange, re-homing green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(
        len(runs), 1, figsize=(7, 1.2 + 2.4 * len(runs)), squeeze=False, sharex=True
    )
    for (record, clean), (axes,) in zip(runs, panels, strict=True):
        if clean is not None and clean["curve"]:
            xs, _, ys = zip(*clean["curve"], strict=True)
            axes.plot(xs, ys, color="0.6", linestyle="--", marker=".", label="clean run")
        if record["curve"]:
            xs, _, ys = zip(*record["curve"], strict=True)
            axes.plot(xs, ys, color="tab:blue", marker="o", markersize=3, label=scenario)
        down: dict[str, float] = {}
        for event in record["events"]:
            t, what, target = event["t"], event["what"], event["target"]
            if what in ("kill", "cut"):
                down[target] = t
                axes.axvline(t, color="tab:red", linewidth=0.8)
            elif what == "back" and target in down:
                axes.axvspan(down.pop(target), t, color="tab:red", alpha=0.15)
            elif what == "inject":
                axes.axvline(t, color="tab:orange", linewidth=0.8)
        for move in record.get("moves", []):
            if move["what"] == "rehome":
                axes.axvline(move["t"], color="tab:green", linewidth=0.6, linestyle=":")
        axes.set_ylabel("test accuracy")
        axes.set_title(f"seed {record['seed']}", fontsize=9, loc="left")
        axes.legend(loc="lower right", fontsize=8)
        axes.grid(alpha=0.3)
    panels[-1][0].set_xlabel("seconds since the first global model")
    figure.suptitle(f"{scenario}: outages shaded, kills red, injections orange, re-homing green")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def layout(scenario: str) -> str:
    """Which clean run a scenario compares with (its broker layout and re-parenting setting)."""
    if scenario == "site_cut":
        return "site_cut"
    if scenario == "edge" and has_fallback_parents():
        return "edge"
    return "broker_persistence"


def clean_of(record: dict[str, Any], cleans: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The clean run (same seed and layout) a scenario's run is compared with."""
    name = f"{layout(record['scenario'])}-clean"
    return next((c for c in cleans if c["scenario"] == name and c["seed"] == record["seed"]), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here (plots beside it)")
    parser.add_argument("--results-md", type=Path, help="rewrite the chaos section of this file")
    parser.add_argument(
        "--from-json", type=Path, help="run nothing: report (and plot) the results of this file"
    )
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--no-clean", action="store_true", help="skip the clean runs")
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--workers-per-edge", type=int, default=5)
    parser.add_argument("--workers-per-process", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="global rounds per run")
    parser.add_argument("--epochs", type=int, default=100, help="local epochs (round length)")
    parser.add_argument("--edge-deadline-s", type=float, default=5.0)
    parser.add_argument("--edge-min-fraction", type=float, default=0.5)
    parser.add_argument("--cloud-deadline-s", type=float, default=10.0)
    parser.add_argument("--cloud-min-fraction", type=float, default=0.5)
    parser.add_argument("--fault-after", type=int, default=4, help="global rounds before")
    parser.add_argument("--outage-s", type=float, default=4.0)
    parser.add_argument("--worker-kill-fraction", type=float, default=0.3)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--target", type=float, default=0.9, help="accuracy target")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-timeout-s", type=float, default=240.0)
    parser.add_argument("--workdir", type=Path, help="keep every run's configs and logs here")
    args = parser.parse_args(argv)
    if args.edges < 2 or args.workers_per_edge < 2:
        parser.error("need at least 2 edges of 2 workers (the faults pick a node and a sibling)")
    return args


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario, and the clean runs they compare with, for every seed. The clean runs
    go first for even seeds and last for odd ones (a drift of the machine's load over the
    benchmark then favours neither side)."""
    records: list[dict[str, Any]] = []
    cleans: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory("-chaos")))
        for index, seed in enumerate(args.seeds):
            bases = [] if args.no_clean else list(dict.fromkeys(map(layout, args.scenarios)))
            jobs = [(base, True) for base in bases] + [(s, False) for s in args.scenarios]
            if index % 2:
                jobs = jobs[len(bases) :] + jobs[: len(bases)]
            for scenario, clean in jobs:
                workdir = root / f"seed{seed}" / (f"{scenario}-clean" if clean else scenario)
                record = asyncio.run(Run(args, scenario, seed, clean, workdir).execute())
                (cleans if clean else records).append(record)
                say(record)
    for record in records:
        clean_run = clean_of(record, cleans)
        record["clean_final_accuracy"] = clean_run["final_accuracy"] if clean_run else None
        record["clean_seconds_to_target"] = clean_run["seconds_to_target"] if clean_run else None
        record["targets"] = check(record)
    targets = {
        f"{scenario}: {name}": "met" if all(r["targets"][name] == "met" for r in runs) else "missed"
        for scenario in args.scenarios
        if (runs := [r for r in records if r["scenario"] == scenario])
        for name in runs[0]["targets"]
    }
    return {
        "benchmark": "chaos",
        "command": " ".join(["python", "benchmarks/chaos_bench.py", *args.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "fallback_parents": has_fallback_parents(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "mosquitto": mosquitto_version(),
        },
        "targets": targets,
        "summary": summarize(records),
        "records": records,
        "clean": cleans,
    }


# --- reporting --------------------------------------------------------------------------------


def _cell(value: dict[str, Any], unit: str = "", digits: int = 0, none: str = "-") -> str:
    """``median (min to max)`` of a spread, or the value alone when every seed agrees; ``none``
    stands for a seed without a value."""

    def show(v: float) -> str:
        return f"{v:.{digits}f}" if digits else f"{v:g}"

    if value["median"] is None:
        return none
    text = show(value["median"]) + unit
    if value["min"] != value["max"]:
        text += f" ({show(value['min'])} to {show(value['max'])})"
    if value["missing"]:
        text += f"; {none} in {value['missing']}"
    return text


def _timeline(record: dict[str, Any]) -> str:
    """What was done to one run and what the run did, in one line."""
    parts: list[str] = []
    for event in record["events"]:
        if event["what"] != "restart":
            parts.append(f"{event['what']} {event['target']} at {event['t']:.1f} s")
    moves = record.get("moves", [])
    rehomes = [m for m in moves if m["what"] == "rehome"]
    if rehomes:
        first, last = rehomes[0]["t"], rehomes[-1]["t"]
        parts.append(f"{len(rehomes)} re-homed ({first:.1f}-{last:.1f} s)")
        homes = [m for m in moves if m["what"] == "home"]
        if homes:
            parts.append(f"{len(homes)} back home by {homes[-1]['t']:.1f} s")
    refused = ", ".join(f"{n} {reason}" for reason, n in sorted(record["rejected"].items()))
    parts.append(f"refused: {refused or 'none'}")
    if record["nodes_crashed"]:
        parts.append(f"crashed: {', '.join(record['nodes_crashed'])}")
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    """The RESULTS.md section of a run of this benchmark, from its JSON alone."""
    params = result["parameters"]
    seeds = params["seeds"]
    lines = [
        f"`{result['command']}` on {result['date']}, {result['machine']['cpu_count']} cores, "
        f"{result['machine']['mosquitto']}, Python {result['machine']['python']}; "
        f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}): the median, and the range in "
        "brackets when the seeds differ.",
        "",
        f"| scenario | sent | accepted | lost | max stall | stall after recovery "
        f"| to {params['target']:g} | final accuracy | clean | vs clean (points) | crashed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in summarize(result["records"]):
        lines.append(
            f"| {entry['scenario']} | {_cell(entry['updates_sent'])} "
            f"| {_cell(entry['updates_accepted'])} | {_cell(entry['updates_lost'])} "
            f"| {_cell(entry['max_stall_s'], ' s', 2)} "
            f"| {_cell(entry['stall_after_return_s'], ' s', 2, 'no round after')} "
            f"| {_cell(entry['seconds_to_target'], ' s', 1, 'not reached')} "
            f"| {_cell(entry['final_accuracy'], '', 4)} "
            f"| {_cell(entry['clean_final_accuracy'], '', 4)} "
            f"| {_cell(entry['accuracy_vs_clean_points'], '', 2)} | {entry['nodes_crashed']} |"
        )
    cleans = result["clean"]
    if cleans:
        reached = ", ".join(
            f"{c['scenario']} seed {c['seed']}: {c['seconds_to_target']} s" for c in cleans
        )
        lines += ["", f"Clean runs, seconds to {params['target']:g}: {reached}."]
    targets = result["targets"]
    missed = [name for name, state in targets.items() if state == "missed"]
    lines += [
        "",
        f"Targets (each must hold in every seed): {len(targets) - len(missed)} of "
        f"{len(targets)} met.",
    ]
    for name in missed:
        scenario, target = name.split(": ", 1)
        runs = [r for r in result["records"] if r["scenario"] == scenario]
        where = ", ".join(
            f"seed {r['seed']}: {_measured(r, target)}"
            for r in runs
            if r["targets"][target] == "missed"
        )
        lines.append(f"- missed: {name} ({where})")
    lines += ["", "What each run did (times from the first global model):", ""]
    for record in result["records"]:
        lines.append(f"- {record['scenario']}, seed {record['seed']}: {_timeline(record)}.")
    return "\n".join(lines)


def _measured(record: dict[str, Any], target: str) -> str:
    """The measured value behind a missed target."""
    if target == "0 updates lost":
        if not record["finished"]:
            return "the run did not finish"
        return f"{record['updates_lost']} lost: {', '.join(record['lost_ids'])}"
    if target == STALL_TARGET:
        stall = record["stall_after_return_s"]
        return "no global round after the recovery" if stall is None else f"{stall} s"
    if target == "no node crashes but the killed":
        return ", ".join(record["nodes_crashed"])
    return f"{record['final_accuracy']} against {record['clean_final_accuracy']}"


def write_results_md(path: Path, section: str) -> None:
    """Replace the text between the chaos markers of ``path`` with ``section``."""
    text = path.read_text()
    begin, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"chaos_bench: {path} has no {RESULTS_BEGIN!r} ... {RESULTS_END!r}")
    head = text[: begin + len(RESULTS_BEGIN)]
    path.write_text(f"{head}\n{section}\n{text[end:]}")


def print_table(result: dict[str, Any]) -> None:
    print()
    header = f"{'scenario':<24}{'seed':>5}{'sent':>6}{'acc':>6}{'lost':>6}{'stall':>8}{'after':>8}"
    print(header + f"{'to tgt':>8}{'final':>8}{'clean':>8}  crashed")
    for r in result["records"]:
        print(
            f"{r['scenario']:<24}{r['seed']:>5}{r['updates_sent']:>6}{r['updates_accepted']:>6}"
            f"{r['updates_lost']:>6}{r['max_stall_s']!s:>8}{r['stall_after_return_s']!s:>8}"
            f"{r['seconds_to_target']!s:>8}{r['final_accuracy']!s:>8}"
            f"{r['clean_final_accuracy']!s:>8}  {len(r['nodes_crashed'])}"
        )
    targets = result["targets"]
    missed = [name for name, state in targets.items() if state == "missed"]
    print(f"targets: {len(targets) - len(missed)} met, {len(missed)} missed")
    for name in missed:
        print(f"  missed: {name}")


def plot_all(result: dict[str, Any], directory: Path) -> None:
    """``chaos-{scenario}.png`` in ``directory`` for every scenario of ``result``."""
    for entry in result["summary"]:
        scenario = entry["scenario"]
        runs = [
            (r, clean_of(r, result["clean"]))
            for r in result["records"]
            if r["scenario"] == scenario
        ]
        plot(scenario, runs, directory / f"chaos-{scenario}.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        plot_all(result, args.from_json.parent)
    else:
        result = run_all(args)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
            plot_all(result, args.json.parent)
    print_table(result)
    if args.results_md is not None:
        write_results_md(args.results_md, markdown(result))
    return 0 if all(state == "met" for state in result["targets"].values()) else 1


def say(record: dict[str, Any]) -> None:
    print(
        f"{record['scenario']} (seed {record['seed']}): {record['global_rounds']} rounds, final "
        f"{record['final_accuracy']}, sent {record['updates_sent']}, lost "
        f"{record['updates_lost']}, max stall {record['max_stall_s']} s, after recovery "
        f"{record['stall_after_return_s']} s, crashed {record['nodes_crashed']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
