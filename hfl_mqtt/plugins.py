"""Plug-ins: code that needs an extra, reached by the core through one small interface each.

The core never imports a plug-in. A plug-in registers under the entry-point group
``hfl_mqtt.plugins`` (in ``pyproject.toml``); the core looks it up by name when a configuration
asks for it, and a missing one is a ``ConfigError`` that names the pip extra to install.

``flower`` (``hfl_mqtt.flower``, the ``flower`` extra) is the only one today: Flower clients and
ClientApps as workers' tasks, Flower strategies as a level's aggregation, a Flower server or a
Flower ServerApp driving aggregators, and Flower's file format for exported models.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, cast

from hfl_mqtt.errors import ConfigError

if TYPE_CHECKING:
    import asyncio

    from hfl_mqtt.aggregation.base import Model, RoundStrategy
    from hfl_mqtt.aggregation.flower_config import FlowerStrategyConfig
    from hfl_mqtt.config import NodeConfig
    from hfl_mqtt.roles.aggregator_base import EventCallback
    from hfl_mqtt.roles.report import NodeReport
    from hfl_mqtt.tasks.base import Task, TaskConfig
    from hfl_mqtt.transport.base import LinkBase

__all__ = ["GROUP", "FlowerPlugin", "flower"]

GROUP = "hfl_mqtt.plugins"
"""The entry-point group plug-ins register under."""


class FlowerPlugin(Protocol):
    """What the core asks of the ``flower`` plug-in."""

    def load_task(
        self,
        config: TaskConfig,
        partition: int | None,
        num_partitions: int,
        *,
        federation: str,
        node: str,
    ) -> Task:
        """The task of ``config.flower_client``, or the ClientApp of ``config.flower_app``, for
        ``partition`` of node ``node``."""
        ...

    def round_strategy(self, config: FlowerStrategyConfig, node: str) -> RoundStrategy:
        """A level's Flower strategy, built and checked (``ConfigError`` if it cannot be)."""
        ...

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
        """Run an aggregator Flower drives (``NodeConfig.flower_driven``) until Flower ends it:
        an edge under a Flower server, or the root under a Flower app's ServerApp."""
        ...

    def encode_model(self, model: Model) -> bytes:
        """``model`` as Flower's serialized ``ArrayRecord`` (``hfl-mqtt export --format
        flower``)."""
        ...


_EXTRAS = {"flower": "flower"}


def flower() -> FlowerPlugin:
    """The ``flower`` plug-in; ``ConfigError`` if it is not installed."""
    return cast("FlowerPlugin", _load("flower"))


def _load(name: str) -> object:
    found = entry_points(group=GROUP, name=name)
    for entry in found:
        return entry.load()
    raise ConfigError(
        f"the {name} plug-in is not installed (no {GROUP!r} entry point named {name!r}): "
        f"pip install 'hfl-mqtt[{_EXTRAS.get(name, name)}]'"
    )
