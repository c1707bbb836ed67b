"""The worker: a leaf that trains on its own data and sends its delta up.

For every new model its parent publishes, the worker trains from it (in a thread, so the event
loop keeps the MQTT keepalives going) and publishes ``trained - received`` against the
version it received. Under a synchronous parent, a newer model that arrives during training
wins: the stale result is dropped, not sent (the parent would refuse it). An asynchronous
parent (its models say ``async``) takes late results, weighted by their staleness: the worker
sends what it trained and then trains from the newest model, skipping the ones in between.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model
from hfl_mqtt.codec import Compressor, Envelope, ModelSpec, decode_envelope
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import DecodeError
from hfl_mqtt.roles.messages import RecentIds, decode_from, delta_message, parse_ctl, subtract
from hfl_mqtt.roles.report import NodeReport, reject_reason
from hfl_mqtt.tasks.base import Task, TrainResult
from hfl_mqtt.topics import ctl_topic, model_topic, parse_topic, up_topic
from hfl_mqtt.transport.base import Incoming, LinkBase

__all__ = ["Worker"]

log = structlog.get_logger("hfl_mqtt.roles")


class Worker:
    """Trains on each model from the parent and sends the delta up."""

    def __init__(self, config: NodeConfig, up: LinkBase, task: Task) -> None:
        if config.upstream is None:
            raise ValueError(f"worker {config.node} needs an upstream link")
        self.config = config
        self.parent = config.upstream.parent
        self.up = up
        self.task = task
        self.report = NodeReport(config.node, "worker", config.level, up=up.stats)
        up.on_reject = self.report.reject_decode
        self._compressor = Compressor(
            config.upstream.codec,
            error_feedback=config.upstream.error_feedback,
            seed=config.task.seed * 100_003 + (config.partition or 0),
        )
        # The parent's models must fit this worker's own model: same names, shapes, dtypes.
        self._spec = ModelSpec.from_arrays(task.get_weights())
        self._seen = RecentIds()
        self._pending: deque[Incoming] = deque()
        self._log = log.bind(node=config.node, role="worker")

    async def run(self) -> NodeReport:
        """Serve until the parent says stop."""
        fed, me = self.config.federation, self.config.node
        await self.up.subscribe(model_topic(fed, self.parent), chunked_retained=True)
        await self.up.subscribe(ctl_topic(fed, me))
        while True:
            message = self._next_message() or await self.up.receive()
            topic = parse_topic(message.topic)
            if topic is None or topic.federation != fed:
                continue
            if topic.kind == "ctl" and topic.node == me:
                if parse_ctl(message.payload) == "stop":
                    self._log.info("stopping on request")
                    return self.report
            elif topic.kind == "model" and topic.node == self.parent:
                await self._on_model(message)

    async def _on_model(self, message: Incoming) -> None:
        try:
            envelope = decode_from(
                message.payload, kind="model", sender=self.parent, federation=self.config.federation
            )
            if self._seen.seen(envelope.header.update_id):
                return
            model = envelope.arrays(expect=self._spec)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return
        await self._train_and_send(envelope, model)

    async def _train_and_send(self, envelope: Envelope, model: Model) -> None:
        version = envelope.header.version
        log_round = self._log.bind(base_version=version)
        trained, result = await asyncio.to_thread(self._train, model)
        self.report.trained += 1
        newer_waiting = self._newer_model_waiting()  # also sets aside what arrived meanwhile
        if newer_waiting and not envelope.header.metrics.get("async"):
            log_round.info("newer model arrived during training: result dropped")
            return
        delta = subtract(trained, model)
        metrics: dict[str, float | int | str | bool] = {
            k: float(v) for k, v in result.metrics.items() if np.isfinite(v)
        }
        metrics["tree_bytes"] = self.report.bytes_sent
        metrics["tree_messages"] = self.report.messages_sent
        payload = delta_message(
            self.config.federation,
            self.config.node,
            version,
            delta,
            result.num_examples,
            self._compressor,
            metrics,
        )
        await self.up.publish(
            up_topic(self.config.federation, self.parent, self.config.node), payload
        )
        log_round.debug("delta sent", bytes=len(payload), examples=result.num_examples)

    def _train(self, model: Model) -> tuple[Model, TrainResult]:
        self.task.set_weights(model)
        result = self.task.train(self.config.task.train)
        return self.task.get_weights(), result

    def _next_message(self) -> Incoming | None:
        """The next message put aside during training, skipping models a later one replaces."""
        model = model_topic(self.config.federation, self.parent)
        while self._pending:
            message = self._pending.popleft()
            if message.topic != model or all(m.topic != model for m in self._pending):
                return message
        return None

    def _newer_model_waiting(self) -> bool:
        """Move what arrived during training aside; True if a new parent model is among it."""
        while (message := self.up.receive_nowait()) is not None:
            self._pending.append(message)
        model = model_topic(self.config.federation, self.parent)
        for message in self._pending:
            if message.topic != model:
                continue
            try:
                envelope = decode_envelope(message.payload)
            except DecodeError:
                continue
            if not self._seen.known(envelope.header.update_id):
                return True
        return False
