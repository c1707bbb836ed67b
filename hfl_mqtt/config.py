"""Configuration: one node (``NodeConfig``) or a whole federation (``FederationConfig``), from YAML.

A federation is a tree given level by level, from the root down to the workers::

    federation: lab
    levels:                       # top (root) first, workers last
      - {name: cloud, rounds: 30, downlink_codec: fp16}
      - {name: edge, rounds: 2, uplink_codec: q8, downlink_codec: fp16}
      - {name: worker, uplink_codec: q4}
    fanout: [4, 8]                # 4 edges under the cloud, 8 workers under each edge
    task: {dataset: digits, model: softmax, partition: {scheme: dirichlet, alpha: 0.5}}

``rounds`` is how many rounds an aggregator runs with its children before it reports up (tau);
at the root, the number of global rounds. ``uplink_codec`` is how a level's nodes send deltas to
their parent, ``downlink_codec`` how an aggregator publishes its model. ``FederationConfig`` turns
into one ``NodeConfig`` per node; ``hfl-mqtt run`` takes a single node's file.

Errors name the file and the field: ``ConfigError: configs/x.yaml: levels.1.rounds: ...``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hfl_mqtt.codec.spec import parse_spec
from hfl_mqtt.errors import CodecSpecError, ConfigError
from hfl_mqtt.tasks.base import TaskConfig

__all__ = [
    "BrokerAddress",
    "ConfigError",
    "DownstreamConfig",
    "FederationConfig",
    "LevelConfig",
    "NodeConfig",
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


def _check_codec(value: str) -> str:
    try:
        parse_spec(value)
    except CodecSpecError as exc:
        raise ValueError(str(exc)) from None
    return value


class BrokerAddress(_Frozen):
    """Where a link connects."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    protocol: Literal["mqtt5", "mqtt311"] = "mqtt5"
    """MQTT 5 (persistent sessions with an expiry); 3.1.1 only for brokers without 5."""


class RoundConfig(_Frozen):
    """How an aggregator runs synchronous rounds with its children."""

    rounds: Annotated[int, Field(ge=1)] = 1
    """Rounds with the children before reporting up (tau); global rounds at the root."""
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    """After this long a round closes with whoever answered, if there are enough of them."""
    min_fraction: Fraction = 0.5
    """Share of the children that must have answered for a round to close at its deadline
    (before it, a round closes as soon as every child still online has answered)."""
    min_children: Count | None = None
    """The same as a count; overrides ``min_fraction``."""
    server_lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0

    def min_count(self, children: int) -> int:
        """How many of ``children`` must answer before a round may close at its deadline."""
        if self.min_children is not None:
            return min(children, self.min_children)
        return max(1, math.ceil(self.min_fraction * children - 1e-9))


class UpstreamConfig(_Frozen):
    """The link to a node's parent."""

    broker: BrokerAddress = BrokerAddress()
    parent: Identifier
    codec: Codec = "q8"
    """How this node's deltas travel up."""
    error_feedback: bool = False

    _codec = field_validator("codec")(_check_codec)


class DownstreamConfig(RoundConfig):
    """The link to a node's children and the rounds it runs with them."""

    broker: BrokerAddress = BrokerAddress()
    children: Annotated[list[Identifier], Field(min_length=1)]
    codec: Codec = "npy"
    """How this node's model travels down."""

    _codec = field_validator("codec")(_check_codec)


class NodeConfig(_Frozen):
    """Everything one node process needs (``hfl-mqtt run --config NODE.yaml``)."""

    federation: Identifier
    node: Identifier
    upstream: UpstreamConfig | None = None
    downstream: DownstreamConfig | None = None
    task: TaskConfig = TaskConfig()
    partition: Annotated[int, Field(ge=0)] | None = None
    """The worker's data partition; None for aggregators (the root evaluates on the test split)."""
    num_partitions: Annotated[int, Field(ge=1)] = 1
    level: Annotated[int, Field(ge=0)] = 0
    """Depth in the tree, 0 at the root (for accounting)."""
    chunk_size: Annotated[int, Field(ge=1024)] = 1 << 20

    @model_validator(mode="after")
    def _has_a_link(self) -> NodeConfig:
        if self.upstream is None and self.downstream is None:
            raise ValueError("a node needs an upstream link, a downstream link, or both")
        if self.downstream is None and self.partition is None:
            raise ValueError("a worker (no downstream) needs its data partition")
        return self

    @property
    def role(self) -> Literal["root", "aggregator", "worker"]:
        if self.upstream is None:
            return "root"
        return "aggregator" if self.downstream is not None else "worker"


class LevelConfig(_Frozen):
    """One tier of the tree; every node of a tier shares these settings."""

    name: Identifier
    rounds: Annotated[int, Field(ge=1)] = 1
    deadline_s: Annotated[float, Field(gt=0)] = 30.0
    min_fraction: Fraction = 0.5
    min_children: Count | None = None
    server_lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    uplink_codec: Codec = "q8"
    downlink_codec: Codec = "npy"
    error_feedback: bool = False

    _codecs = field_validator("uplink_codec", "downlink_codec")(_check_codec)


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
        return self

    @property
    def num_workers(self) -> int:
        count = 1
        for f in self.fanout:
            count *= f
        return count

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
                )
            downstream = None
            if node in tree:
                downstream = DownstreamConfig(
                    broker=brokers.get(node, default) if self.brokers == "per_edge" else default,
                    children=tree[node],
                    codec=level.downlink_codec,
                    rounds=level.rounds,
                    deadline_s=level.deadline_s,
                    min_fraction=level.min_fraction,
                    min_children=level.min_children,
                    server_lr=level.server_lr,
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


def _validate(model: type[M], data: Any, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_federation(path: str | Path) -> FederationConfig:
    """Read and check a federation file."""
    path = Path(path)
    return _validate(FederationConfig, _load_yaml(path), str(path))


def load_node(path: str | Path) -> NodeConfig:
    """Read and check a single node's file."""
    path = Path(path)
    return _validate(NodeConfig, _load_yaml(path), str(path))
