"""One node process: its links, its role, and its run (``hfl-mqtt run --config NODE.yaml``).

Every node is the same program. A node with only an upstream link is a worker; with only a
downstream link, the root; with both, an aggregator at any depth. The upstream link carries
the node's status and Last Will (its parent watches it there); the root puts them on its
downstream link. An aggregator whose parent and children share a broker uses one connection
for both, under its own id as client id (so a broker ACL's ``%c`` rules apply to it); a move
to a fallback parent on another broker opens one more, under the same id (``roles/uplinks.py``).
An aggregator with a ``flower_parent`` instead of an upstream link serves a Flower server and,
like the root, keeps its status on its downstream link; the ``flower`` plug-in runs it
(``hfl_mqtt.plugins``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any, Literal

from hfl_mqtt.aggregation.base import RoundStrategy
from hfl_mqtt.checkpoint import CheckpointStore, NodeState
from hfl_mqtt.config import NEEDS_PARTITION, BrokerAddress, NodeConfig
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.plugins import flower
from hfl_mqtt.roles.aggregator import Aggregator, EventCallback, native_strategy
from hfl_mqtt.roles.async_aggregator import AsyncAggregator
from hfl_mqtt.roles.messages import status_payload
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.roles.worker import Worker
from hfl_mqtt.tasks.base import Task, load_task
from hfl_mqtt.topics import status_topic
from hfl_mqtt.transport.base import LinkBase
from hfl_mqtt.transport.mqtt import MqttLink

__all__ = ["Checkpoints", "LinkFactory", "run_node"]

Checkpoints = Literal["resume", "fresh", "off"]
"""An aggregator's checkpoints: resume from the one in its state directory (if any), start
over (removing it), or write none."""

LinkFactory = Callable[[BrokerAddress, str, str | None], LinkBase]
"""Makes a link from a broker address, a client id and the status topic it owns (or None)."""

FALLBACK_CONNECT_TIMEOUT_S = 5.0
"""How long a node moving to a parent on another broker tries to connect there before it
tries its next fallback."""


def mqtt_link_factory(chunk_size: int, *, connect_timeout: float = 20.0) -> LinkFactory:
    """Makes ``MqttLink``s; each fails with ``TransportError`` if it cannot connect within
    ``connect_timeout`` seconds."""

    def make(broker: BrokerAddress, client_id: str, status: str | None) -> LinkBase:
        return MqttLink(
            broker.host,
            broker.port,
            client_id,
            status_topic=status,
            online_payload=status_payload("online"),
            offline_payload=status_payload("offline"),
            chunk_size=chunk_size,
            connect_timeout=connect_timeout,
            protocol=broker.protocol,
            tls=broker.tls,
            username=broker.username,
            password=broker.password(),
        )

    return make


async def run_node(
    config: NodeConfig,
    *,
    links: LinkFactory | None = None,
    on_event: EventCallback | None = None,
    task: Task | None = None,
    stop: asyncio.Event | None = None,
    checkpoints: Checkpoints | None = None,
    connected: Callable[[], None] | None = None,
) -> NodeReport:
    """Connect, serve in the node's role until told to stop (or done, at the root).

    ``task``: a worker's (or the root's) training task, instead of building it from
    ``config.task``. ``stop``: set it to end the node cleanly from outside (a signal): a
    delta being sent is sent, the status goes offline, and the children are not stopped.
    ``checkpoints`` (aggregators): by default ``resume`` if the config names a ``state_dir``,
    else ``off``; a checkpoint that cannot be resumed from fails here, before connecting
    (``CheckpointError``). ``connected`` is called once the node's links are up (its status
    says online), before it serves.
    """
    make = links or mqtt_link_factory(config.chunk_size)
    make_fallback = links or mqtt_link_factory(
        config.chunk_size, connect_timeout=FALLBACK_CONNECT_TIMEOUT_S
    )
    state = _node_state(config, checkpoints)
    status = status_topic(config.federation, config.node)
    strategy = round_strategy(config)  # before connecting: a bad one fails at once
    if config.role == "worker" and task is None and config.partition is None:
        raise ConfigError(f"node {config.node}: {NEEDS_PARTITION} (or a ready task)")
    trains_or_evaluates = config.downstream is None or config.upstream is None
    if config.role == "root" and config.task.flower_app is not None:
        trains_or_evaluates = False  # the Flower app's ServerApp evaluates, if it does
    if task is None and trains_or_evaluates:
        # Before connecting, and off the event loop: loading data can take seconds on a
        # board, and a bad task fails before the node shows up online.
        partition = config.partition if config.downstream is None else None
        task = await asyncio.to_thread(
            functools.partial(
                load_task,
                config.task,
                partition,
                config.num_partitions,
                federation=config.federation,
                node=config.node,
            )
        )
    async with contextlib.AsyncExitStack() as stack:
        up = down = None
        if config.upstream is not None:
            up = await _enter(stack, make(config.upstream.broker, config.node, status))
        if config.downstream is not None:
            upstream = config.upstream
            if (
                up is not None
                and upstream is not None
                and config.downstream.broker == upstream.broker
            ):
                down = up  # one connection serves both sides, under the node's own client id
            else:
                down_status = status if up is None else None
                client_id = config.node if up is None else f"{config.node}.down"
                down = await _enter(stack, make(config.downstream.broker, client_id, down_status))

        if connected is not None:
            connected()

        def open_link(broker: BrokerAddress) -> LinkBase:
            """A link to a fallback parent's broker, with the node's status there too."""
            return make_fallback(broker, config.node, status)

        if down is None:
            assert up is not None
            assert task is not None
            return await Worker(config, up, task, open_link=open_link).run(stop)
        evaluator = task if up is None else None
        if config.flower_driven:  # a Flower server above, or a ServerApp at the root
            return await flower().run_driven(
                config, down, task=evaluator, strategy=strategy, on_event=on_event, stop=stop
            )
        is_async = config.downstream is not None and config.downstream.is_async
        if is_async:
            return await AsyncAggregator(
                config,
                down,
                up,
                evaluator=evaluator,
                on_event=on_event,
                state=state,
                open_link=open_link,
            ).run(stop)
        return await Aggregator(
            config,
            down,
            up,
            evaluator=evaluator,
            strategy=strategy,
            on_event=on_event,
            state=state,
            open_link=open_link,
        ).run(stop)
    raise AssertionError("unreachable")


def _node_state(config: NodeConfig, mode: Checkpoints | None) -> NodeState | None:
    """An aggregator's checkpoints, the one to resume from, and the root's model registry."""
    downstream = config.downstream
    if mode is None:
        mode = "resume" if config.state_dir is not None else "off"
    # Flower drives the cycles and keeps the state: nothing to resume here.
    if mode == "off" or downstream is None or config.flower_driven:
        return None
    store = CheckpointStore.for_node(config)
    if mode == "fresh":
        store.discard()
    resume_from = store.load() if mode == "resume" else None
    registry = None
    if config.role == "root" and downstream.keep_models > 0:
        from hfl_mqtt.registry import ModelRegistry

        registry = ModelRegistry(
            store.directory / "models",
            keep_last=downstream.keep_models,
            config_hash=store.fingerprint,
            codecs={"down": downstream.codec},
        )
    return NodeState(store, resume_from, registry)


def round_strategy(config: NodeConfig) -> RoundStrategy | None:
    """The synchronous aggregation ``config`` asks for (its ``flower_strategy``, resolved and
    checked, or a native rule: ``native_strategy``), built before connecting so that a bad one
    fails at once (``ConfigError``); None for a node without children."""
    downstream = config.downstream
    if downstream is None:
        return None
    if downstream.flower_strategy is not None:
        return flower().round_strategy(downstream.flower_strategy, config.node)
    return native_strategy(config)


async def _enter(stack: contextlib.AsyncExitStack, link: Any) -> LinkBase:
    entered: LinkBase = await stack.enter_async_context(link)
    return entered
