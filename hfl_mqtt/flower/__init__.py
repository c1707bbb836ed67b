"""Flower on the hierarchy: everything of hfl-mqtt that talks to ``flwr`` (the ``flower`` extra).

The core never imports this package: it finds ``plugin`` through the ``hfl_mqtt.plugins``
entry point (``hfl_mqtt.plugins.FlowerPlugin``). Its modules import ``flwr`` only inside the
functions that need it, so the package itself loads without Flower installed.

- ``codec``: our tensors as Flower's ``ArrayRecord`` and legacy ``Parameters``.
- ``client``: an unmodified Flower client (``NumPyClient``) as a worker's task.
- ``strategy``: a legacy Flower strategy as a level's aggregation.
- ``parent``: an aggregator whose parent is a Flower server (legacy gRPC) or a SuperNode.
- ``edge_app``: the ClientApp a SuperNode runs for an edge (``hfl_mqtt.flower.edge_app:app``).
- ``app``, ``app_task``, ``grid``: a Flower app (Message API) on the tree, ``task.flower_app``:
  its ServerApp at the root through an MQTT ``Grid``, its ClientApp in every worker.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from hfl_mqtt.errors import ConfigError, TaskError

if TYPE_CHECKING:
    from hfl_mqtt.aggregation.base import Model, RoundStrategy
    from hfl_mqtt.aggregation.flower_config import FlowerStrategyConfig
    from hfl_mqtt.config import NodeConfig
    from hfl_mqtt.roles.aggregator_base import EventCallback
    from hfl_mqtt.roles.report import NodeReport
    from hfl_mqtt.tasks.base import Task, TaskConfig
    from hfl_mqtt.transport.base import LinkBase

__all__ = ["FlowerPlugin", "plugin"]


class FlowerPlugin:
    """The ``flower`` plug-in (``hfl_mqtt.plugins.FlowerPlugin``)."""

    def load_task(
        self,
        config: TaskConfig,
        partition: int | None,
        num_partitions: int,
        *,
        federation: str,
        node: str,
    ) -> Task:
        if config.flower_app is None:
            from hfl_mqtt.flower.client import make_flower_task

            return make_flower_task(config, partition, num_partitions)
        from hfl_mqtt.flower.app import load_flower_app, node_id
        from hfl_mqtt.flower.app_task import ClientAppTask

        if partition is None:
            raise TaskError(
                "a Flower app's ClientApp is a worker's task: the root runs its ServerApp"
            )
        app = load_flower_app(config.flower_app, config.params)
        from flwr.app import Context, RecordDict

        context = Context(
            run_id=node_id(federation),
            node_id=node_id(node),
            node_config={"partition-id": partition, "num-partitions": num_partitions},
            state=RecordDict(),
            run_config=dict(app.run_config),
        )
        return ClientAppTask(app.client_app(), context)

    def round_strategy(self, config: FlowerStrategyConfig, node: str) -> RoundStrategy:
        from hfl_mqtt.flower.strategy import FlowerStrategy

        return FlowerStrategy.from_config(config, node=node)

    async def run_driven(
        self,
        config: NodeConfig,
        down: LinkBase,
        *,
        task: Task | None,
        strategy: RoundStrategy | None,
        on_event: EventCallback | None,
        stop: asyncio.Event | None,
    ) -> NodeReport:
        if config.flower_parent is None:
            from hfl_mqtt.flower.grid import run_server_app

            return await run_server_app(config, down, on_event=on_event, stop=stop)
        from hfl_mqtt.flower.parent import run_under_flower_server

        if task is None:
            raise ConfigError(f"{config.node}: an edge under a Flower server needs its task")
        return await run_under_flower_server(
            config, down, task=task, strategy=strategy, on_event=on_event
        )

    def encode_model(self, model: Model) -> bytes:
        from hfl_mqtt.flower.codec import array_record_bytes

        return array_record_bytes(model)


plugin = FlowerPlugin()
