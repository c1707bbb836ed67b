"""Flower on the hierarchy: everything of hfl-mqtt that talks to ``flwr`` (the ``flower`` extra).

The core never imports this package: it finds ``plugin`` through the ``hfl_mqtt.plugins``
entry point (``hfl_mqtt.plugins.FlowerPlugin``). Its modules import ``flwr`` only inside the
functions that need it, so the package itself loads without Flower installed.

- ``codec``: our tensors as Flower's ``ArrayRecord`` and legacy ``Parameters``.
- ``client``: an unmodified Flower client (``NumPyClient``) as a worker's task.
- ``strategy``: a legacy Flower strategy as a level's aggregation.
- ``parent``: an aggregator whose parent is a Flower server (legacy gRPC) or a SuperNode.
- ``edge_app``: the ClientApp a SuperNode runs for an edge (``hfl_mqtt.flower.edge_app:app``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

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

    def load_task(self, config: TaskConfig, partition: int | None, num_partitions: int) -> Task:
        from hfl_mqtt.flower.client import make_flower_task

        return make_flower_task(config, partition, num_partitions)

    def round_strategy(self, config: FlowerStrategyConfig, node: str) -> RoundStrategy:
        from hfl_mqtt.flower.strategy import FlowerStrategy

        return FlowerStrategy.from_config(config, node=node)

    def drives(self, config: NodeConfig) -> bool:
        return config.flower_parent is not None

    async def run_driven(
        self,
        config: NodeConfig,
        down: LinkBase,
        *,
        task: Task,
        strategy: RoundStrategy | None,
        on_event: EventCallback | None,
        stop: asyncio.Event | None,
    ) -> NodeReport:
        from hfl_mqtt.flower.parent import run_under_flower_server

        return await run_under_flower_server(
            config, down, task=task, strategy=strategy, on_event=on_event
        )

    def encode_model(self, model: Model) -> bytes:
        from hfl_mqtt.flower.codec import array_record_bytes

        return array_record_bytes(model)


plugin = FlowerPlugin()
