"""Configuration: one node (``NodeConfig``) or a whole federation (``FederationConfig``), from YAML.

A federation is a tree given level by level, from the root down to the workers::

    federation: lab
    levels:                       # top (root) first, workers last
      - {name: cloud, rounds: 30, downlink_codec: fp16}
      - {name: edge, rounds: 2, uplink_codec: q8, downlink_codec: fp16}
      - {name: worker, uplink_codec: q4}
    fanout: [4, 8]                # 4 edges under the cloud, 8 workers under each edge
    task: {dataset: digits, model: softmax, partition: {scheme: dirichlet, alpha: 0.5}}
    heterogeneity: {stragglers: 0.25, latency_ms: [5, 50], dropout: 0.02}   # optional

``rounds`` is how many rounds an aggregator runs with its children before it reports up (tau);
at the root, the number of global rounds. ``uplink_codec`` is how a level's nodes send deltas to
their parent, ``downlink_codec`` how an aggregator publishes its model. ``FederationConfig`` turns
into one ``NodeConfig`` per node; ``hfl-mqtt run`` takes a single node's file. ``heterogeneity``
gives simulated workers slower devices and links and dropouts, each worker's ``device`` drawn
reproducibly from its seed.

Errors name the file and the field: ``ConfigError: configs/x.yaml: levels.1.rounds: ...``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from hfl_mqtt.aggregation.auto_rounds import AutoRounds
from hfl_mqtt.aggregation.flower_config import FlowerStrategyConfig
from hfl_mqtt.aggregation.participation import ParticipationConfig
from hfl_mqtt.aggregation.privacy import CentralPrivacy, LocalPrivacy
from hfl_mqtt.aggregation.robust import RobustRule
from hfl_mqtt.aggregation.staleness import StalenessFunction
from hfl_mqtt.codec.spec import parse_spec
from hfl_mqtt.deployment import DeploymentConfig
from hfl_mqtt.errors import CodecSpecError, ConfigError
from hfl_mqtt.tasks.base import TaskConfig

__all__ = [
    "BrokerAddress",
    "ConfigError",
    "DeviceConfig",
    "DownstreamConfig",
    "FallbackParent",
    "FederationConfig",
    "FlowerParentConfig",
    "HeterogeneityConfig",
    "LevelConfig",
    "NodeConfig",
    "TlsConfig",
    "UpstreamConfig",
    "load_federation",
    "load_node",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Codec = Annotated[str, Field(min_length=1)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]
Fraction = Annotated[float, Field(gt=0, le=1)]
Count = Annotated[int, Field(ge=1)]


def _check_codec(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_spec(value)
    except CodecSpecError as exc:
        raise ValueError(str(exc)) from None
    return value


def _relative_to_config(value: Path | None, info: ValidationInfo) -> Path | None:
    """A relative path in a YAML file is relative to that file (``load_node`` says where)."""
    base = (info.context or {}).get(_BASE_DIR)
    if value is None or value.is_absolute() or base is None:
        return value
    return Path(base) / value


_BASE_DIR = "base_dir"
ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]
"""A file named in a config: absolute, or relative to the config file it is written in."""


class TlsConfig(_Frozen):
    """TLS for a link: the CA that signed the broker's certificate, and optionally this node's
    own certificate and key (for a broker that asks for client certificates)."""

    ca_file: ConfigPath | None = None
    """PEM file of the CA to trust; None: the system's trusted CAs."""
    cert_file: ConfigPath | None = None
    """PEM file of this node's client certificate (with ``key_file``)."""
    key_file: ConfigPath | None = None
    """PEM file of the private key of ``cert_file``."""
    insecure_skip_verify: bool = False
    """Accept any broker certificate, without checking its signature or host name: for a lab
    only, never for a fleet (a man in the middle could read and change every model)."""

    @model_validator(mode="after")
    def _cert_with_key(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


PASSWORD_ENV = "HFL_MQTT_PASSWORD"

AGGREGATOR_METRICS_INTERVAL_S = 1.0
"""An aggregator's metrics record, at most this often (docs/monitoring.md)."""
WORKER_METRICS_INTERVAL_S = 5.0
"""A worker's, at most this often: a board's link is often metered, a fleet has thousands of
workers, and what a worker does each round its parent's record counts too."""
"""Environment variable that, when set, overrides every ``password_file`` of the process."""


class BrokerAddress(_Frozen):
    """Where a link connects, and how it proves who it is.

    Secrets never sit in the YAML file: ``password_file`` names a file holding the password
    (its first line; the environment variable ``HFL_MQTT_PASSWORD`` overrides it when set),
    read when the link connects and never logged.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    """MQTT 5 (persistent sessions with an expiry); 3.1.1 only for brokers without 5."""
    tls: TlsConfig | None = None
    """None: plain TCP."""
    username: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """The broker user (one per node in a fleet: the ACL pins it to its topics with ``%u``)."""
    password_file: ConfigPath | None = None
    """File whose first line is the password of ``username``."""

    @model_validator(mode="after")
    def _password_needs_user(self) -> BrokerAddress:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        return self

    def password(self) -> str | None:
        """The password: ``HFL_MQTT_PASSWORD`` if set, else the first line of
        ``password_file``, else None. ``ConfigError`` if the file cannot be read."""
        if self.username is None:
            return None
        from_env = os.environ.get(PASSWORD_ENV)
        if from_env:
            return from_env
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf8")
        except OSError as exc:
            raise ConfigError(
                f"password_file {self.password_file}: cannot read: {exc.strerror}"
            ) from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ConfigError(f"password_file {self.password_file}: empty")
        return lines[0]


class RoundConfig(_Frozen):
    """How an aggregator works with its children: synchronous rounds, FedAsync or FedBuff."""

    mode: Literal["sync", "fedasync", "fedbuff"] = "sync"
    """``sync``: rounds that wait for the children; ``fedasync``: fold every update in as it
    arrives; ``fedbuff``: fold every ``buffer_size`` updates. See docs/asynchronous.md."""
    rounds: Annotated[int, Field(ge=1)] = 1
    """sync: rounds with the children before reporting up (tau); ``auto``: chosen each cycle
    to fit the run's deadline (``auto_rounds``, docs/auto-rounds.md). At the root: the global
    rounds (sync) or the model versions (fedasync, fedbuff) before the federation stops."""
    auto_rounds: AutoRounds | None = None
    """Set by ``rounds: auto`` (or given with its settings): the deadline and the bound."""
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """After this long a round closes with whoever answered, if there are enough of them."""
    min_fraction: Fraction = 0.5
    """Share of the children that must have answered for a round to close at its deadline
    (before it, a round closes as soon as every child still online has answered)."""
    min_children: Count | None = None
    """The same as a count; overrides ``min_fraction``."""
    server_lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    mixing: Annotated[float, Field(gt=0, le=1)] = 0.5
    """fedasync: ``a``, the share a fresh update gets (``a_t = a * s(staleness)``)."""
    buffer_size: Annotated[int, Field(ge=1)] = 4
    """fedbuff: K, the updates buffered before each step."""
    weight_by_examples: bool = True
    """fedbuff: weight each buffered delta by its example count too (the paper: no)."""
    staleness: StalenessFunction | None = None
    """The staleness weight; by default ``polynomial`` (a=0.5) for fedasync, ``fedbuff``
    (1/sqrt(1+t)) for fedbuff."""
    max_staleness: Annotated[int, Field(ge=0)] = 50
    """Asynchronous modes: an update more versions behind than this is refused (too_stale)."""
    report_every_updates: Count | None = None
    """Asynchronous, not the root: report up after this many folded updates (and, with
    ``report_every_s``, whichever comes first). Neither set: every len(children) updates."""
    report_every_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Asynchronous, not the root: report up at least this often (if anything was folded)."""
    publish_every_steps: Count = 1
    """Asynchronous: publish a new version after every this many steps (FedBuff's buffer
    steps, FedAsync's folds) rather than after each. Every version goes to every child, and a
    child trains on the newest one it holds when its run ends, so the versions published
    between two of its runs are bytes it never trains on. Staleness counts published versions."""
    publish_on_rebase: bool = True
    """Asynchronous, not the root: publish the rebased model as soon as the parent's new model
    arrives (a version of its own); False: it goes out with the next step's version."""
    eval_every: Count = 1
    """Asynchronous root: evaluate every this many model versions."""
    max_seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """At the root: stop the federation after this long, whatever round it is in."""
    flower_strategy: FlowerStrategyConfig | None = None
    """sync: aggregate with a Flower strategy instead of FedAvg: ``name`` (in
    ``flwr.server.strategy``) or ``class`` (``module:Class``), and ``options``."""
    robust: RobustRule | None = None
    """sync: aggregate with a robust rule instead of FedAvg (``median``, ``trimmed_mean``,
    ``clipped_mean``): see docs/robustness.md."""
    privacy: CentralPrivacy | None = None
    """sync: central differential privacy: clip every child's delta, noise the sum (DP-FedAvg,
    optionally with adaptive clipping): see docs/privacy.md."""
    participation: ParticipationConfig = ParticipationConfig()
    """sync: which children train each round (``policy``: all, random, loss, contribution,
    deadline; ``fraction``; ``every_rounds`` for fairness): see docs/participation.md."""
    checkpoint_every: Count = 1
    """Write a checkpoint before publishing every this many model versions (and after every
    report up, and at a clean stop); a resume from a checkpoint between two such versions goes
    on at a version beyond them. See docs/durability.md."""
    keep_models: Annotated[int, Field(ge=0)] = 5
    """At the root: the last this many evaluated models kept in ``models/`` (and the best)."""

    @model_validator(mode="after")
    def _publishing_is_async(self) -> RoundConfig:
        if self.mode == "sync" and (self.publish_every_steps != 1 or not self.publish_on_rebase):
            raise ValueError(
                "publish_every_steps and publish_on_rebase apply to mode: fedasync or fedbuff "
                "(a synchronous round publishes one version a round)"
            )
        return self

    @model_validator(mode="after")
    def _flower_strategy_fits(self) -> RoundConfig:
        if self.flower_strategy is not None:
            if self.mode != "sync":
                raise ValueError("flower_strategy works with mode: sync only (rounds of results)")
            if self.server_lr != 1.0:
                raise ValueError(
                    "server_lr does not apply with flower_strategy: give the strategy's own "
                    "(e.g. FedAdam's eta, FedAvgM's server_learning_rate) in its options"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _rounds_auto(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("rounds") == "auto":
            data = {**data, "rounds": 1, "auto_rounds": data.get("auto_rounds") or {}}
        return data

    @model_validator(mode="after")
    def _auto_rounds_are_sync(self) -> RoundConfig:
        if self.auto_rounds is not None and self.mode != "sync":
            raise ValueError("rounds: auto works with mode: sync only (rounds before a report)")
        return self

    @model_validator(mode="after")
    def _one_aggregation_rule(self) -> RoundConfig:
        chosen = [
            name
            for name in ("flower_strategy", "robust", "privacy")
            if getattr(self, name) is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} exclude each other: one aggregation rule")
        if chosen and chosen[0] != "flower_strategy" and self.mode != "sync":
            raise ValueError(f"{chosen[0]} works with mode: sync only (rounds of deltas)")
        if self.participation.policy != "all" and self.mode != "sync":
            raise ValueError(
                "participation works with mode: sync only (an asynchronous aggregator takes "
                "whoever answers, whenever)"
            )
        return self

    def min_count(self, children: int) -> int:
        """How many of ``children`` must answer before a round may close at its deadline."""
        if self.min_children is not None:
            return min(children, self.min_children)
        return max(1, math.ceil(self.min_fraction * children - 1e-9))

    @property
    def is_async(self) -> bool:
        return self.mode != "sync"

    def staleness_function(self) -> StalenessFunction:
        if self.staleness is not None:
            return self.staleness
        if self.mode == "fedbuff":
            return StalenessFunction(function="fedbuff")
        return StalenessFunction(function="polynomial", a=0.5)


class FallbackParent(_Frozen):
    """A parent to move to (docs/reparenting.md), and the broker it serves its children on."""

    parent: Identifier
    broker: BrokerAddress | None = None
    """None: the node's own upstream broker. Another broker (a sibling edge's, the cloud's)
    gets a connection of its own when the node first moves there."""


def _ids_as_fallbacks(value: Any) -> Any:
    """A fallback given as a bare id is on the node's own broker."""
    if isinstance(value, list):
        return [{"parent": item} if isinstance(item, str) else item for item in value]
    return value


class UpstreamConfig(_Frozen):
    """The link to a node's parent."""

    broker: BrokerAddress = BrokerAddress()
    parent: Identifier
    codec: Codec = "q8"
    """How this node's deltas travel up."""
    error_feedback: bool = False
    local_privacy: LocalPrivacy | None = None
    """A worker's local differential privacy: its delta is clipped and noised before it is
    encoded (docs/privacy.md)."""
    fallbacks: Annotated[list[FallbackParent], BeforeValidator(_ids_as_fallbacks)] = []
    """Parents to move to, in order, when ``parent`` goes offline: ids (on this node's broker)
    or ``{parent: ID, broker: {...}}``; each must list this node among its ``adoptees``. See
    docs/reparenting.md."""
    parent_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """Also move when the parent has sent no model for this long (None: only on its Last
    Will)."""
    return_to_parent: bool = True
    """Go back to ``parent`` when it is online again (False: stay where it moved)."""

    _codec = field_validator("codec")(_check_codec)

    @model_validator(mode="after")
    def _fallbacks_are_others(self) -> UpstreamConfig:
        ids = self.fallback_ids
        if self.parent in ids or len(set(ids)) != len(ids):
            raise ValueError("fallbacks must differ from the parent and from each other")
        return self

    @field_serializer("fallbacks", mode="wrap")
    def _fallbacks_as_ids(self, value: Any, handler: SerializerFunctionWrapHandler) -> Any:
        """A fallback on the node's own broker is written back as its bare id."""
        return [
            entry.parent if entry.broker is None else dumped
            for entry, dumped in zip(self.fallbacks, handler(value), strict=True)
        ]

    @property
    def fallback_ids(self) -> list[str]:
        """The fallback parents' ids, in order."""
        return [entry.parent for entry in self.fallbacks]

    def broker_of(self, parent: str) -> BrokerAddress:
        """Where ``parent`` serves its children: a fallback's broker if it names one, else
        this link's (a parent named by hand, not among the fallbacks, too)."""
        for entry in self.fallbacks:
            if entry.parent == parent and entry.broker is not None:
                return entry.broker
        return self.broker


def _check_server_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (an IPv6 host in brackets: [::1]:8080)")
    return value


class FlowerParentConfig(_Frozen):
    """A stock Flower server as the node's parent: the node joins it as a Flower client, and
    each ``fit`` runs a cycle of its subtree (``hfl_mqtt/flower/parent.py``)."""

    server_address: Annotated[str, AfterValidator(_check_server_address)] | None = None
    """The Flower server's address, ``HOST:PORT`` (a legacy gRPC server, ``start_server``);
    None under a SuperNode, which runs the node as its ClientApp (``hfl_mqtt.flower.edge_app``)."""
    root_certificates: Path | None = None
    """PEM file of the root certificates for a TLS server; None: an insecure connection."""
    connect_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    """How long to keep trying while the server is not up yet (then the node fails)."""


class DownstreamConfig(RoundConfig):
    """The link to a node's children and the rounds it runs with them."""

    broker: BrokerAddress = BrokerAddress()
    children: Annotated[list[Identifier], Field(min_length=1)]
    codec: Codec = "npy"
    """How this node's model travels down (every version, or with ``delta_codec`` the first)."""
    delta_codec: Codec | None = None
    """Delta coding down (``roles/downlink.py``): each version goes as a delta against the one
    before in this codec (say ``q8``), and every ``keyframe_every`` versions a whole model is
    retained for children that join; None: every version is a whole model."""
    keyframe_every: Annotated[int, Field(ge=1)] = 20
    adoptees: list[Identifier] = []
    """Nodes this one accepts as children when they join it (re-parenting); anyone else who
    is not a child is refused."""

    _codec = field_validator("codec", "delta_codec")(_check_codec)

    @model_validator(mode="after")
    def _enough_children(self) -> DownstreamConfig:
        if self.flower_strategy is not None:
            self.flower_strategy.check_children(len(self.children), "flower_strategy")
        return self


NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1)]
Slowdown = Annotated[float, Field(ge=1, allow_inf_nan=False)]


def _number_as_range(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (value, value)
    return value


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"a range is [low, high] with low <= high, got {list(value)}")
    return value


# A [low, high] range; a single number x means [x, x].
NonNegativeRange = Annotated[
    tuple[NonNegative, NonNegative], BeforeValidator(_number_as_range), AfterValidator(_ordered)
]
RateRange = Annotated[
    tuple[Rate, Rate], BeforeValidator(_number_as_range), AfterValidator(_ordered)
]


Poison = Literal["sign_flip", "scale"]


class DeviceConfig(_Frozen):
    """How one simulated worker's device differs from the machine it runs on: a slower CPU,
    a slower link to its parent, dropping out for a while (``hfl_mqtt/roles/worker.py``)."""

    seed: Annotated[int, Field(ge=0)] = 0
    """Seeds the worker's own draws (whether it drops out after a run, for how long)."""
    slowdown: Slowdown = 1.0
    """A training run takes at least ``slowdown * (training seconds + compute_s)``."""
    compute_s: NonNegative = 0.0
    """Simulated compute time added to every training run."""
    latency_s: NonNegative = 0.0
    """One-way latency added to the link to the parent, both directions."""
    up_bytes_per_s: Rate | None = None
    """Payload rate cap toward the parent; None: no cap."""
    down_bytes_per_s: Rate | None = None
    """Payload rate cap from the parent; None: no cap."""
    dropout: Probability = 0.0
    """Probability, after each training run, of going offline."""
    offline_s: NonNegativeRange = (1.0, 5.0)
    """How long a dropout lasts, drawn uniformly from this range each time."""
    poison: Poison | None = None
    """A poisoned worker, for robustness experiments: it sends ``-poison_scale`` times its
    delta (``sign_flip``) or ``poison_scale`` times it (``scale``)."""
    poison_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


_STRAGGLER_STREAM, _DEVICE_STREAM = 0, 1
"""Seed sequences ``[seed, 0]`` (the straggler permutation) and ``[seed, 1, worker]`` (one
worker's draws): distinct streams, so adding workers changes no other worker's device."""


class HeterogeneityConfig(_Frozen):
    """Simulated device differences across a federation's workers, drawn from ``seed``: the
    same configuration gives the same devices and the same dropouts."""

    seed: Annotated[int, Field(ge=0)] = 0
    compute_s: NonNegative = 0.0
    """Simulated compute time added to every worker's training runs."""
    stragglers: Probability = 0.0
    """Share of the workers that are slow, rounded to the nearest whole worker (chosen by a
    seeded permutation)."""
    slowdown: Slowdown = 10.0
    """How many times slower a straggler trains."""
    latency_ms: NonNegativeRange = (0.0, 0.0)
    """One-way latency each worker's link adds: a number, or [low, high] drawn per worker."""
    bandwidth_kbps: RateRange | None = None
    """Each worker's link cap in kbit/s, both directions: a number, [low, high] drawn per
    worker, or None (no cap)."""
    dropout: Probability = 0.0
    """Probability, after each training run, that a worker drops out."""
    offline_s: NonNegativeRange = (1.0, 5.0)
    """How long a dropped-out worker stays away, drawn per dropout."""
    poisoned: Probability = 0.0
    """Share of the workers that are poisoned, rounded to the nearest whole worker and spread
    evenly over the worker indexes (so over the edges): ``DeviceConfig.poison``."""
    poison: Poison = "sign_flip"
    poison_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0

    def poisoned_of(self, workers: int) -> set[int]:
        """Indexes of the poisoned workers among ``workers``: every ``1 / poisoned``-th."""
        count = math.floor(self.poisoned * workers + 0.5)
        return {math.floor((j + 0.5) * workers / count) for j in range(count)}

    def stragglers_of(self, workers: int) -> set[int]:
        """Indexes of the slow workers among ``workers``."""
        count = math.floor(self.stragglers * workers + 0.5)
        order = np.random.default_rng([self.seed, _STRAGGLER_STREAM]).permutation(workers)
        return {int(i) for i in order[:count]}

    def devices(self, workers: int) -> list[DeviceConfig]:
        """One device per worker, by worker index."""
        slow = self.stragglers_of(workers)
        poisoned = self.poisoned_of(workers)
        devices = []
        for index in range(workers):
            rng = np.random.default_rng([self.seed, _DEVICE_STREAM, index])
            # Every draw is made whatever the settings, so each keeps its place in the stream.
            latency_ms = rng.uniform(*self.latency_ms)
            kbps = rng.uniform(*(self.bandwidth_kbps or (1.0, 1.0)))
            seed = int(rng.integers(2**63))
            rate = None if self.bandwidth_kbps is None else float(kbps) * 1000 / 8
            devices.append(
                DeviceConfig(
                    seed=seed,
                    slowdown=self.slowdown if index in slow else 1.0,
                    compute_s=self.compute_s,
                    latency_s=float(latency_ms) / 1000,
                    up_bytes_per_s=rate,
                    down_bytes_per_s=rate,
                    dropout=self.dropout,
                    offline_s=self.offline_s,
                    poison=self.poison if index in poisoned else None,
                    poison_scale=self.poison_scale,
                )
            )
        return devices


NEEDS_PARTITION = "a worker (no downstream) needs its data partition"

_BUILDS_TASK = "builds_task"
"""Validation context: the node's task will be built from its ``task`` settings (a node's file,
``load_node``), so a worker must say which data partition it trains on."""


def _builds_task(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get(_BUILDS_TASK))


class NodeConfig(_Frozen):
    """Everything one node process needs (``hfl-mqtt run --config NODE.yaml``).

    A worker's ``partition`` is required where its task is built from ``task`` (a node's file;
    ``run_node`` without a ready task): a worker embedded with its own task object needs none.
    """

    federation: Identifier
    node: Identifier
    upstream: UpstreamConfig | None = None
    downstream: DownstreamConfig | None = None
    flower_parent: FlowerParentConfig | None = None
    """Instead of ``upstream``: a Flower server is the parent of this aggregator."""
    task: TaskConfig = TaskConfig()
    partition: Annotated[int, Field(ge=0)] | None = None
    """The worker's data partition (to build its task from ``task``); None for aggregators (the
    root evaluates on the test split)."""
    num_partitions: Annotated[int, Field(ge=1)] = 1
    level: Annotated[int, Field(ge=0)] = 0
    """Depth in the tree, 0 at the root (for accounting)."""
    chunk_size: Annotated[int, Field(ge=1024)] = 1 << 20
    device: DeviceConfig | None = None
    """A worker's simulated device (slower compute and link, dropouts); None: as it is."""
    uplink_latency_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Simulation, an aggregator's: one-way latency added to its link to its parent (each
    report up and each parent model wait this long; the aggregator waits with them)."""
    state_dir: ConfigPath | None = None
    """An aggregator's checkpoints (and, at the root, its models); default: under
    ``$HFL_MQTT_STATE_DIR``, systemd's ``$STATE_DIRECTORY`` or ``~/.local/state/hfl-mqtt``, in
    ``{federation}/{node}``."""
    metrics_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """How often, at most, the node publishes its metrics record (``hfl_mqtt.metrics``; only
    when something changed); 0: never; None: ``AGGREGATOR_METRICS_INTERVAL_S`` for an
    aggregator, ``WORKER_METRICS_INTERVAL_S`` for a worker."""

    @model_validator(mode="after")
    def _has_a_link(self, info: ValidationInfo) -> NodeConfig:
        if self.flower_parent is not None:
            if self.upstream is not None:
                raise ValueError("flower_parent and upstream exclude each other: one parent")
            if self.downstream is None:
                raise ValueError("flower_parent needs a downstream link: it is an aggregator's")
            if self.downstream.is_async:
                raise ValueError("flower_parent works with mode: sync (a fit is a cycle of rounds)")
        if self.upstream is None and self.downstream is None:
            raise ValueError("a node needs an upstream link, a downstream link, or both")
        if self.downstream is None and self.partition is None and _builds_task(info):
            raise ValueError(NEEDS_PARTITION)
        if self.device is not None and self.downstream is not None:
            raise ValueError("device applies to workers only (a node without downstream)")
        if self.uplink_latency_s and (self.downstream is None or self.upstream is None):
            raise ValueError(
                "uplink_latency_s applies to aggregators with a parent (a worker's link: device)"
            )
        auto = self.downstream.auto_rounds if self.downstream is not None else None
        if auto is not None and (self.upstream is None and self.flower_parent is None):
            raise ValueError("rounds: auto applies below the root (the root's are global rounds)")
        if auto is not None and auto.deadline_s is None:
            raise ValueError("rounds: auto needs auto_rounds.deadline_s (the run's deadline)")
        if self.downstream is not None and self.upstream and self.upstream.local_privacy:
            raise ValueError(
                "local_privacy applies to workers only (an aggregator uses downstream privacy)"
            )
        return self

    @property
    def flower_driven(self) -> bool:
        """Flower drives this aggregator (the ``flower`` plug-in runs it): a Flower server is
        its parent, or it is the root of a Flower app's run (``task.flower_app``)."""
        return self.flower_parent is not None or (
            self.role == "root" and self.task.flower_app is not None
        )

    @property
    def role(self) -> Literal["root", "aggregator", "worker"]:
        if self.upstream is None and self.flower_parent is None:
            return "root"
        return "aggregator" if self.downstream is not None else "worker"

    @property
    def metrics_every_s(self) -> float:
        """``metrics_interval_s``, or its default for the node's role (0: no records)."""
        if self.metrics_interval_s is not None:
            return self.metrics_interval_s
        if self.role == "worker":
            return WORKER_METRICS_INTERVAL_S
        return AGGREGATOR_METRICS_INTERVAL_S


class LevelConfig(RoundConfig):
    """One tier of the tree; every node of a tier shares these settings (the round settings
    apply to the tier's aggregators)."""

    name: Identifier
    uplink_codec: Codec = "q8"
    downlink_codec: Codec = "npy"
    downlink_delta_codec: Codec | None = None
    """The level's aggregators send each new model as a delta in this codec
    (``DownstreamConfig.delta_codec``); None: whole models."""
    keyframe_every: Annotated[int, Field(ge=1)] = 20
    """With delta coding: a whole model is retained every this many versions."""
    error_feedback: bool = False
    local_privacy: LocalPrivacy | None = None
    """The workers' level only: local differential privacy on every worker
    (``UpstreamConfig.local_privacy``)."""
    link_latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Simulation, an aggregator level below the root: one-way latency added to each of its
    nodes' links to their parents (``NodeConfig.uplink_latency_s``; a worker's link is the
    ``heterogeneity`` block's)."""

    _codecs = field_validator("uplink_codec", "downlink_codec", "downlink_delta_codec")(
        _check_codec
    )

    def round_config(self) -> dict[str, Any]:
        """The round settings, as keyword arguments of ``DownstreamConfig``."""
        return {name: getattr(self, name) for name in RoundConfig.model_fields}


class FederationConfig(_Frozen):
    """A whole federation: the tree, its brokers, its rounds and codecs, the task."""

    federation: Identifier = "hfl"
    levels: Annotated[list[LevelConfig], Field(min_length=2)]
    fanout: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]
    """Children per node at each level but the last: len(fanout) == len(levels) - 1."""
    brokers: Literal["single", "per_edge"] = "single"
    """One broker for everyone, or one per lowest aggregator bridged to the root's broker."""
    task: TaskConfig = TaskConfig()
    seed: int = 0
    chunk_size: Annotated[int, Field(ge=1024)] = 1 << 20
    heterogeneity: HeterogeneityConfig | None = None
    """Simulated device differences among the workers; None: every worker as it is."""
    deployment: DeploymentConfig | None = None
    """Brokers, sites and hosts of a real fleet, for ``hfl-mqtt plan`` (hfl_mqtt/deployment.py)."""
    fallback_parents: bool = False
    """Give every node below the root's children fallback parents (its parent's next sibling,
    then its grandparent, each with its broker where that is not the node's) and every
    aggregator the matching ``adoptees``: see docs/reparenting.md."""
    metrics_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = (
        AGGREGATOR_METRICS_INTERVAL_S
    )
    """Every aggregator's ``NodeConfig.metrics_interval_s`` (0: no metrics records)."""
    worker_metrics_interval_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = (
        WORKER_METRICS_INTERVAL_S
    )
    """Every worker's ``NodeConfig.metrics_interval_s`` (0: no metrics records)."""

    @model_validator(mode="after")
    def _shape(self) -> FederationConfig:
        if len(self.fanout) != len(self.levels) - 1:
            raise ValueError(
                f"fanout has {len(self.fanout)} entries; {len(self.levels)} levels need "
                f"{len(self.levels) - 1}"
            )
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ValueError("level names must be unique")
        root = self.levels[0]
        if root.auto_rounds is not None:
            raise ValueError(
                "levels.0.rounds: auto applies below the root (the root's rounds are the global "
                "rounds: give it max_seconds, the deadline the levels below fit into)"
            )
        for depth, level in enumerate(self.levels[1:-1], start=1):
            auto = level.auto_rounds
            if auto is not None and auto.deadline_s is None and root.max_seconds is None:
                raise ValueError(
                    f"levels.{depth}.rounds: auto needs a deadline: the root's max_seconds, or "
                    "auto_rounds.deadline_s"
                )
        for rule, hint in (("robust", ""), ("privacy", " (on the workers: local_privacy)")):
            if getattr(self.levels[-1], rule) is not None:
                raise ValueError(
                    f"levels.{len(self.levels) - 1}.{rule}: the workers' level aggregates "
                    f"nothing{hint}"
                )
        for depth, (level, children) in enumerate(zip(self.levels, self.fanout, strict=False)):
            if level.privacy is not None:
                problem = level.privacy.budget_problem(children)
                if problem is not None:
                    raise ValueError(f"levels.{depth}.privacy: {problem}")
        for depth, level in enumerate(self.levels):
            if level.link_latency_ms and depth in (0, len(self.levels) - 1):
                raise ValueError(
                    f"levels.{depth}.link_latency_ms applies to the levels between the root and "
                    "the workers (a worker's link: heterogeneity.latency_ms)"
                )
        for depth, level in enumerate(self.levels[:-1]):
            if level.local_privacy is not None:
                raise ValueError(
                    f"levels.{depth}.local_privacy: local privacy applies to the workers' level "
                    "(the last); an aggregator's level uses privacy"
                )
        for depth, (level, children) in enumerate(zip(self.levels, self.fanout, strict=False)):
            if level.flower_strategy is not None:
                level.flower_strategy.check_children(children, f"levels.{depth}.flower_strategy")
        if self.task.flower_app is not None:
            self._flower_app_fits()
        if self.deployment is not None:
            self.deployment.check_tree(self.tree(), self.levels[0].name)
        return self

    def _flower_app_fits(self) -> None:
        """A Flower app's ServerApp drives the root (hfl_mqtt/flower/grid.py): its strategy
        aggregates and counts the rounds, and every level answers each message in sync."""
        for depth, level in enumerate(self.levels[:-1]):
            if level.mode != "sync":
                raise ValueError(
                    f"levels.{depth}.mode: {level.mode}: a Flower app's messages are answered "
                    "in synchronous rounds (mode: sync)"
                )
        root = self.levels[0]
        given = [
            name
            for name in ("flower_strategy", "robust", "privacy")
            if getattr(root, name) is not None
        ]
        if root.rounds != 1:
            given.append("rounds")
        if root.participation.policy != "all":
            given.append("participation")
        if given:
            raise ValueError(
                f"levels.0.{', levels.0.'.join(given)}: not used with task.flower_app (the "
                "ServerApp's strategy picks, aggregates and counts the rounds; set them there)"
            )

    @property
    def num_workers(self) -> int:
        count = 1
        for f in self.fanout:
            count *= f
        return count

    def _round_settings(self, level: LevelConfig) -> dict[str, Any]:
        """``level``'s round settings for its nodes; ``rounds: auto`` gets the root's
        ``max_seconds`` as its deadline unless it names one."""
        settings = level.round_config()
        auto = level.auto_rounds
        if auto is not None and auto.deadline_s is None:
            settings["auto_rounds"] = auto.model_copy(
                update={"deadline_s": self.levels[0].max_seconds}
            )
        return settings

    def tree(self) -> dict[str, list[str]]:
        """Children of every aggregator, by node id: the root is named after the top level, the
        others ``{level}-{i}`` numbered across their level."""
        root = self.levels[0].name
        tree: dict[str, list[str]] = {}
        tier = [root]
        for depth, fan in enumerate(self.fanout, start=1):
            name = self.levels[depth].name
            next_tier: list[str] = []
            for parent in tier:
                kids = [f"{name}-{len(next_tier) + i}" for i in range(fan)]
                tree[parent] = kids
                next_tier.extend(kids)
            tier = next_tier
        return tree

    def node_configs(self, brokers: dict[str, BrokerAddress]) -> list[NodeConfig]:
        """One config per node, top down. ``brokers`` maps node ids to the broker their
        downstream link uses (its children connect there too); missing ids use the root's."""
        tree = self.tree()
        root = self.levels[0].name
        default = brokers.get(root, BrokerAddress())
        parents = {kid: parent for parent, kids in tree.items() for kid in kids}
        depth = {root: 0}
        for parent, kids in tree.items():
            for kid in kids:
                depth[kid] = depth[parent] + 1
        workers = [n for n in depth if n not in tree]
        devices = self.heterogeneity.devices(len(workers)) if self.heterogeneity else None

        def down_broker(node: str) -> BrokerAddress:
            return brokers.get(node, default) if self.brokers == "per_edge" else default

        fallbacks: dict[str, list[FallbackParent]] = {}
        adoptees: dict[str, list[str]] = {}
        if self.fallback_parents:
            for node, parent in parents.items():
                if parent == root:
                    continue  # the root has no sibling and no parent to stand in for it
                grandparent = parents[parent]
                uncles = tree[grandparent]
                at = uncles.index(parent)
                sibling = uncles[(at + 1) % len(uncles)]
                mine = self._broker_of(node, parent, brokers, default)
                chosen = [c for c in dict.fromkeys([sibling, grandparent]) if c != parent]
                fallbacks[node] = [
                    FallbackParent(
                        parent=c, broker=None if down_broker(c) == mine else down_broker(c)
                    )
                    for c in chosen
                ]
                for candidate in chosen:
                    adoptees.setdefault(candidate, []).append(node)
        configs = []
        for node, d in depth.items():
            level = self.levels[d]
            upstream = None
            if node in parents:
                parent = parents[node]
                upstream = UpstreamConfig(
                    broker=self._broker_of(node, parent, brokers, default),
                    parent=parent,
                    codec=level.uplink_codec,
                    error_feedback=level.error_feedback,
                    local_privacy=level.local_privacy,
                    fallbacks=fallbacks.get(node, []),
                )
            downstream = None
            if node in tree:
                downstream = DownstreamConfig(
                    broker=down_broker(node),
                    children=tree[node],
                    codec=level.downlink_codec,
                    delta_codec=level.downlink_delta_codec,
                    keyframe_every=level.keyframe_every,
                    adoptees=adoptees.get(node, []),
                    **self._round_settings(level),
                )
            configs.append(
                NodeConfig(
                    federation=self.federation,
                    node=node,
                    upstream=upstream,
                    downstream=downstream,
                    task=self.task,
                    partition=workers.index(node) if node not in tree else None,
                    num_partitions=len(workers),
                    level=d,
                    chunk_size=self.chunk_size,
                    device=devices[workers.index(node)] if devices and node not in tree else None,
                    uplink_latency_s=level.link_latency_ms / 1000 if node in parents else 0.0,
                    metrics_interval_s=self.metrics_interval_s
                    if node in tree
                    else self.worker_metrics_interval_s,
                )
            )
        return configs

    def _broker_of(
        self, node: str, parent: str, brokers: dict[str, BrokerAddress], default: BrokerAddress
    ) -> BrokerAddress:
        if self.brokers == "single":
            return default
        # Per-edge brokers: a node talks to the broker of whoever serves its subtree; an edge
        # itself reaches its parent through its own (bridged) broker.
        return brokers.get(node) or brokers.get(parent) or default


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


M = TypeVar("M", bound=BaseModel)


def _validate(
    model: type[M], data: Any, source: str, base_dir: Path | None = None, **context: Any
) -> M:
    try:
        return model.model_validate(data, context={_BASE_DIR: base_dir, **context})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_federation(path: str | Path) -> FederationConfig:
    """Read and check a federation file."""
    path = Path(path)
    return _validate(FederationConfig, _load_yaml(path), str(path), path.parent)


def load_node(path: str | Path) -> NodeConfig:
    """Read and check a single node's file (relative file paths in it are relative to it).
    Its task is built from its ``task`` settings: a worker's file names its data partition."""
    path = Path(path)
    return _validate(NodeConfig, _load_yaml(path), str(path), path.parent, **{_BUILDS_TASK: True})
