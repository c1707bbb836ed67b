"""Nodes in one process, ended cleanly by a signal (``hfl-mqtt run --config a.yaml ...``).

One lab machine can stand in for many devices against a real broker: every node runs in the
same event loop (workers train in threads), each exactly as it would on its own device, with
its own client id and connection. A node that fails is reported and the others go on, as
separate devices would.

SIGTERM (systemd stopping the service) and SIGINT (Ctrl-C) end the nodes cleanly: the first one
sets the ``stop`` event every node runs with, so each finishes what it is sending, publishes
its status offline and returns its report. A second signal cancels them at once: nothing more
is sent and the links close (statuses offline); a training run under way in a thread cannot
be interrupted, so the process exits when it returns. A node still connecting when the first
signal comes goes on connecting (up to its connect timeout) before it sees the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import ConfigError, HflError
from hfl_mqtt.roles.node import Checkpoints, LinkFactory, run_node
from hfl_mqtt.roles.report import NodeReport

__all__ = ["STOP_SIGNALS", "NodeOutcome", "SignalStop", "run_nodes"]

log = structlog.get_logger("hfl_mqtt.runner")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    """How one node ended: its report, or the error that ended it."""

    node: str
    report: NodeReport | None = None
    error: Exception | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as ``NodeReport.to_dict`` gives it, or ``{"node", "error"}``."""
        if self.report is not None:
            return self.report.to_dict()
        return {"node": self.node, "error": f"{type(self.error).__name__}: {self.error}"}


async def run_nodes(
    configs: Sequence[NodeConfig],
    *,
    stop: asyncio.Event | None = None,
    links: LinkFactory | None = None,
    checkpoints: Checkpoints | None = None,
) -> list[NodeOutcome]:
    """Run every node until it ends (or ``stop`` is set); one outcome per config, in order.

    Node ids must differ (each is the client id of its connection: two connections under one
    id would keep pushing each other off the broker); ``ConfigError`` otherwise.
    """
    seen: set[str] = set()
    for config in configs:
        if config.node in seen:
            raise ConfigError(f"node {config.node} is given twice: node ids must be unique")
        seen.add(config.node)

    async def one(config: NodeConfig) -> NodeOutcome:
        try:
            report = await run_node(config, links=links, stop=stop, checkpoints=checkpoints)
        except Exception as exc:  # reported with the node's name; the other nodes go on
            if isinstance(exc, HflError):
                log.error("node failed", node=config.node, error=f"{type(exc).__name__}: {exc}")
            else:
                log.error("node failed", node=config.node, exc_info=exc)
            return NodeOutcome(config.node, error=exc)
        return NodeOutcome(config.node, report=report)

    async with asyncio.TaskGroup() as group:
        running = [group.create_task(one(c), name=f"node:{c.node}") for c in configs]
    return [task.result() for task in running]


class SignalStop:
    """SIGTERM and SIGINT handlers on the running loop, while entered: the first signal sets
    ``stop``, a second one cancels ``task`` (by default, the task that entered).

    ``signals`` lists what arrived, in order (a caller exits with ``128 + signals[-1]`` after a
    hard stop). Where the loop cannot take signal handlers (Windows), nothing is installed.
    """

    def __init__(self, stop: asyncio.Event, task: asyncio.Task[Any] | None = None) -> None:
        self.stop = stop
        self.signals: list[signal.Signals] = []
        self._task = task
        self._installed: list[signal.Signals] = []
        self._entered = False

    def __enter__(self) -> SignalStop:
        if self._entered:
            raise RuntimeError("SignalStop is already installed: enter it only once")
        self._entered = True
        loop = asyncio.get_running_loop()
        self._task = self._task or asyncio.current_task()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._arrived, sig)
                self._installed.append(sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()
        self._entered = False

    def _arrived(self, sig: signal.Signals) -> None:
        self.signals.append(sig)
        if len(self.signals) == 1:
            log.warning("stopping: the nodes finish what they are sending", signal=sig.name)
            self.stop.set()
            return
        log.warning("stopping now", signal=sig.name)
        if self._task is not None:
            self._task.cancel()
