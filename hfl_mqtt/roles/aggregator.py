"""The aggregator: runs synchronous rounds with its children; the root is one with no parent.

One cycle of a non-root aggregator: take the parent's model, run ``rounds`` (tau) rounds with
the children (publish the model once, retained, and let the broker fan it out; collect deltas
against that version; aggregate), then send ``model - parent's model`` up and wait for the
parent's next model. A newer parent model that arrives mid-cycle wins: the cycle restarts
from it. The root runs ``rounds`` global rounds, evaluates after each, then tells its subtree to
stop.

A round closes when every child has answered; or when every child still online (Last Will
watched on the status topics) has answered and at least the minimum has; or at the deadline
with at least the minimum. Updates are checked on arrival: unknown sender, wrong federation
or kind, a base that is not the current version (stale), a second update in the round, bad
bytes, wrong shapes, NaN - each is refused, counted by reason and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model, RoundStrategy, StreamingStrategy, Update
from hfl_mqtt.aggregation.fedavg import FedAvg
from hfl_mqtt.codec import Compressor, ModelSpec, parse_spec
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import DecodeError, TransportError
from hfl_mqtt.roles.messages import (
    STOP,
    RecentIds,
    decode_from,
    delta_message,
    model_message,
    parse_ctl,
    parse_status,
    subtract,
)
from hfl_mqtt.roles.report import Arrival, NodeReport, reject_reason
from hfl_mqtt.tasks.base import Task
from hfl_mqtt.topics import (
    ctl_topic,
    model_topic,
    parse_topic,
    status_topic,
    up_filter,
    up_topic,
)
from hfl_mqtt.transport.base import Incoming, LinkBase

__all__ = ["Aggregator"]

log = structlog.get_logger("hfl_mqtt.roles")

EventCallback = Callable[[dict[str, Any]], None]


class Aggregator:
    """An edge, region or cloud node: rounds with its children, deltas to its parent."""

    def __init__(
        self,
        config: NodeConfig,
        down: LinkBase,
        up: LinkBase | None = None,
        *,
        evaluator: Task | None = None,
        strategy: RoundStrategy | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        if config.downstream is None:
            raise ValueError(f"aggregator {config.node} needs a downstream link")
        if (up is None) != (config.upstream is None):
            raise ValueError("an upstream link goes with an upstream config")
        self.config = config
        self.rounds_config = config.downstream
        self.children = list(config.downstream.children)
        self.down, self.up = down, up
        self.is_root = config.upstream is None
        if self.is_root and evaluator is None:
            raise ValueError("the root needs an evaluator task (its initial model and test data)")
        self.evaluator = evaluator
        self.strategy: RoundStrategy = strategy or FedAvg(config.downstream.server_lr)
        self._streaming = self.strategy if isinstance(self.strategy, StreamingStrategy) else None
        # A delta may not take the model beyond what the downlink can carry (fp16: 65504).
        fp16_down = parse_spec(config.downstream.codec).values == "fp16"
        self._value_limit = 65504.0 if fp16_down else 1e38
        self._model_peak = 0.0
        self.on_event = on_event
        role = "root" if self.is_root else "aggregator"
        self.report = NodeReport(
            config.node, role, config.level, up=up.stats if up else None, down=down.stats
        )
        for link in (down, up):
            if link is not None:
                link.on_reject = self.report.reject_decode
        self._down_codec = Compressor(config.downstream.codec, seed=config.task.seed + 7)
        self._up_codec: Compressor | None = None
        if config.upstream is not None:
            self._up_codec = Compressor(
                config.upstream.codec,
                error_feedback=config.upstream.error_feedback,
                seed=config.task.seed + 11,
            )
        self._events: asyncio.Queue[Incoming] = asyncio.Queue(1000)
        self._seen = RecentIds()
        self._offline: set[str] = set()
        self._children_bytes: dict[str, tuple[int, int]] = {}
        self.model: Model | None = None
        self.spec: ModelSpec | None = None
        self.version = 0
        self.parent_model: Model | None = None
        self.parent_version: int | None = None
        self._collecting: dict[str, Update] | None = None
        self._cycle_round = 0
        self._deadline = 0.0
        self._deadline_logged = False
        self._started = time.monotonic()
        self._finished = False
        self._log = log.bind(node=config.node, role=role)

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> NodeReport:
        """Run until the global rounds are done (root) or the parent says stop."""
        fed, me = self.config.federation, self.config.node
        async with asyncio.TaskGroup() as tasks:
            pumps = [tasks.create_task(self._pump(self.down), name=f"{me}:down")]
            if self.up is not None and self.up is not self.down:
                pumps.append(tasks.create_task(self._pump(self.up), name=f"{me}:up"))
            await self.down.subscribe(up_filter(fed, me))
            for child in self.children:
                await self.down.subscribe(status_topic(fed, child))
            control = self.up if self.up is not None else self.down
            await control.subscribe(ctl_topic(fed, me))
            if self.up is not None and self.config.upstream is not None:
                parent_model = model_topic(fed, self.config.upstream.parent)
                await self.up.subscribe(parent_model, chunked_retained=True)
            try:
                await self._loop()
            finally:
                for pump in pumps:
                    pump.cancel()
        return self.report

    async def _pump(self, link: LinkBase) -> None:
        while True:
            await self._events.put(await link.receive())

    async def _loop(self) -> None:
        if self.is_root:
            assert self.evaluator is not None
            self.model = await asyncio.to_thread(self.evaluator.get_weights)
            self.spec = ModelSpec.from_arrays(self.model)
            await self._start_round()
        while not self._finished:
            timeout = None
            if self._collecting is not None and not self._deadline_logged:
                timeout = max(0.0, self._deadline - time.monotonic())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as a message is queued, and the node would run on.
            try:
                async with asyncio.timeout(timeout):
                    message = await self._events.get()
            except TimeoutError:
                await self._maybe_close_round()
                continue
            await self._handle(message)

    async def _handle(self, message: Incoming) -> None:
        topic = parse_topic(message.topic)
        fed, me = self.config.federation, self.config.node
        if topic is None or topic.federation != fed:
            return
        if topic.kind == "ctl" and topic.node == me:
            if parse_ctl(message.payload) == "stop":
                self._log.info("stopping on request")
                await self._stop_children()
                self._finished = True
        elif topic.kind == "up" and topic.node == me and topic.child:
            await self._on_update(topic.child, message)
        elif topic.kind == "status" and topic.node in self.children:
            state = parse_status(message.payload)
            if state == "offline":
                self._offline.add(topic.node)
                self._log.info("child offline", child=topic.node)
                await self._maybe_close_round()
            elif state is not None:
                self._offline.discard(topic.node)
        elif (
            topic.kind == "model"
            and self.config.upstream is not None
            and topic.node == self.config.upstream.parent
        ):
            await self._on_parent_model(message)

    # --- the parent's model ---------------------------------------------------------------------

    async def _on_parent_model(self, message: Incoming) -> None:
        assert self.config.upstream is not None
        try:
            envelope = decode_from(
                message.payload,
                kind="model",
                sender=self.config.upstream.parent,
                federation=self.config.federation,
            )
            if self._seen.seen(envelope.header.update_id):
                return
            model = envelope.arrays(expect=self.spec)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return
        if self.spec is None:
            self.spec = ModelSpec.from_arrays(model)
        if self._collecting is not None:
            self._log.info("new parent model mid-cycle: restarting from it")
        self.parent_model = model
        self.parent_version = envelope.header.version
        self.model = {k: v.copy() for k, v in model.items()}
        self._cycle_round = 0
        await self._start_round()

    # --- rounds ---------------------------------------------------------------------------------

    async def _start_round(self) -> None:
        assert self.model is not None
        self.version += 1
        payload = model_message(
            self.config.federation,
            self.config.node,
            self.version,
            self.model,
            self._down_codec,
            {"round": self.report.rounds + 1},
        )
        await self.down.publish(
            model_topic(self.config.federation, self.config.node), payload, retain=True
        )
        self._collecting = {}
        self._model_peak = max(
            (float(np.abs(v).max()) for v in self.model.values() if v.size), default=0.0
        )
        if self._streaming is not None:
            self._streaming.start(self.model)
        self._deadline = time.monotonic() + self.rounds_config.deadline_s
        self._deadline_logged = False

    async def _on_update(self, child: str, message: Incoming) -> None:
        if child not in self.children:
            self.report.reject("unknown_sender", message.topic, child)
            return
        try:
            envelope = decode_from(
                message.payload, kind="delta", sender=child, federation=self.config.federation
            )
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return
        header = envelope.header
        if self._seen.seen(header.update_id):
            self.report.reject("duplicate", message.topic, header.update_id)
            return
        if self._collecting is None or header.base_version != self.version:
            self.report.reject(
                "stale", message.topic, f"base {header.base_version}, current {self.version}"
            )
            return
        if child in self._collecting:
            self.report.reject("duplicate", message.topic, "second update in one round")
            return
        try:
            delta = envelope.arrays(expect=self.spec)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return
        peak = max((float(np.abs(v).max()) for v in delta.values() if v.size), default=0.0)
        if self._model_peak + self.rounds_config.server_lr * peak > self._value_limit:
            self.report.reject("out_of_range", message.topic, f"|delta| up to {peak:.3g}")
            return
        tree_bytes = header.metrics.get("tree_bytes", 0)
        tree_messages = header.metrics.get("tree_messages", 0)
        if _is_count(tree_bytes) and _is_count(tree_messages):
            self._children_bytes[child] = (tree_bytes, tree_messages)  # type: ignore[assignment]
        update = Update(
            child, self.version, delta, header.num_examples, header.update_id, header.metrics
        )
        if self._streaming is not None:
            self._streaming.add(update)
            update = Update(child, self.version, {}, header.num_examples, header.update_id, {})
        self._collecting[child] = update
        self.report.accept(Arrival(time.monotonic() - self._started, child, 0, 1.0))
        await self._maybe_close_round()

    async def _maybe_close_round(self) -> None:
        collecting = self._collecting
        if collecting is None:
            return
        answered = len(collecting)
        needed = self.rounds_config.min_count(len(self.children))
        everyone = answered == len(self.children)
        # Every child not known to be offline has answered.
        all_online = answered >= needed and answered + len(
            self._offline - collecting.keys()
        ) >= len(self.children)
        past_deadline = time.monotonic() >= self._deadline
        if not (everyone or all_online or (past_deadline and answered >= needed)):
            if past_deadline and not self._deadline_logged:
                self._deadline_logged = True
                self._log.warning(
                    "deadline passed: waiting for the minimum", answered=answered, needed=needed
                )
            return
        await self._close_round(list(collecting.values()))

    async def _close_round(self, updates: list[Update]) -> None:
        assert self.model is not None
        self._collecting = None
        if self._streaming is not None:
            self.model = self._streaming.finish()
        else:
            self.model = self.strategy.aggregate(self.model, updates)
        self.report.rounds += 1
        self._cycle_round += 1
        examples = sum(u.num_examples for u in updates)
        self._log.info(
            "round closed",
            round=self.report.rounds,
            participants=len(updates),
            examples=examples,
        )
        if self.is_root:
            await self._evaluate(updates)
            if self.report.rounds >= self.rounds_config.rounds:
                await self._stop_children()
                self._finished = True
            else:
                await self._start_round()
        elif self._cycle_round < self.rounds_config.rounds:
            await self._start_round()
        else:
            await self._report_up(examples, updates)

    async def _report_up(self, examples: int, updates: list[Update]) -> None:
        assert self.up is not None
        assert self.config.upstream is not None
        assert self.model is not None
        assert self.parent_model is not None
        assert self._up_codec is not None
        assert self.parent_version is not None
        tree_bytes, tree_messages = self.tree_traffic()
        metrics: dict[str, float | int | str | bool] = {
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
            "participants": len(updates),
        }
        loss = _mean_metric(updates, "loss")
        if loss is not None:
            metrics["loss"] = loss
        payload = delta_message(
            self.config.federation,
            self.config.node,
            self.parent_version,
            subtract(self.model, self.parent_model),
            min(examples, _MAX_COUNT),
            self._up_codec,
            metrics,
        )
        parent = self.config.upstream.parent
        await self.up.publish(up_topic(self.config.federation, parent, self.config.node), payload)

    async def _evaluate(self, updates: list[Update]) -> None:
        assert self.evaluator is not None
        assert self.model is not None
        model = self.model

        def evaluate() -> Any:
            assert self.evaluator is not None
            self.evaluator.set_weights(model)
            return self.evaluator.evaluate()

        result = await asyncio.to_thread(evaluate)
        tree_bytes, tree_messages = self.tree_traffic()
        event: dict[str, Any] = {
            "global_round": self.report.rounds,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "seconds": time.monotonic() - self._started,
            "participants": len(updates),
            "examples": sum(u.num_examples for u in updates),
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
        }
        self.report.evaluations.append(event)
        self._log.info(
            "global round",
            round=event["global_round"],
            accuracy=round(result.accuracy, 4),
            loss=round(result.loss, 4),
        )
        if self.on_event is not None:
            self.on_event(event)

    def tree_traffic(self) -> tuple[int, int]:
        """Bytes and messages this subtree has published so far, as its children last told."""
        sent = self.report.bytes_sent + sum(b for b, _ in self._children_bytes.values())
        count = self.report.messages_sent + sum(m for _, m in self._children_bytes.values())
        return sent, count

    async def _stop_children(self) -> None:
        for child in self.children:
            with contextlib.suppress(TransportError):
                await self.down.publish(ctl_topic(self.config.federation, child), STOP)


def _mean_metric(updates: list[Update], name: str) -> float | None:
    values = [float(v) for u in updates if isinstance(v := u.metrics.get(name), int | float)]
    if not values:
        return None
    weights = [
        max(u.num_examples, 1) for u in updates if isinstance(u.metrics.get(name), int | float)
    ]
    return float(np.average(values, weights=weights))


_MAX_COUNT = 2**53


def _is_count(value: object) -> bool:
    """A byte or message count a child may report: an int that sums safely."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT
