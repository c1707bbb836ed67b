"""What every aggregator does, whatever its mode: links, checks, the parent's model, reporting up.

An aggregator (edge, region or cloud) is a model ``x`` at a version, published retained to its
children, and the updates they send against it. How updates become the next model is the mode's
business (``roles/aggregator.py``: synchronous rounds; ``roles/async_aggregator.py``: FedAsync
and FedBuff); this base owns the rest.

Versions across levels (docs/asynchronous.md has a worked example): a non-root aggregator
reports ``x - anchor`` against its parent's version and rebases onto each new parent model,
``x <- M' + (x - anchor)``; the bookkeeping lives in ``UpstreamLedger``
(``aggregation/ledger.py``), which checkpoints persist.

A report sent up is kept until the parent's next model. When the parent's current model
arrives again, the parent has put it back after a reconnect, and the broker may have lost the
report with its state: it is sent again (the parent drops a duplicate by update id).

A ``stop`` event set from outside (a signal) ends the node between two messages, without
stopping its children: they wait for it to come back.

Membership is live (docs/reparenting.md): a node among ``adoptees`` that joins (a join message,
or a status naming this node as its parent) becomes a child; a child whose status names another
parent, or that leaves, is no longer counted. An aggregator with ``fallbacks`` moves to another
parent as a worker does (``roles/parentage.py``), through ``roles/uplinks.py`` when that parent
is on another broker.

With a ``NodeState`` (``checkpoint.py``) the node writes its state before publishing every
``checkpoint_every``-th version, after every report up and at a clean stop, and a node given a
checkpoint resumes from it (``_resume``; docs/durability.md): at the same version, with the
same model message (its children re-send what the crash lost), or, if later versions may have
been published since the checkpoint, at a version beyond them. The root also keeps its
evaluated models in a ``ModelRegistry`` (``registry.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import structlog

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.ledger import UpstreamLedger
from hfl_mqtt.checkpoint import Checkpoint, NodeState
from hfl_mqtt.codec import Compressor, Envelope, Header, ModelSpec, parse_spec
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import DecodeError, TransportError
from hfl_mqtt.metrics import NodeNow, metrics_publisher
from hfl_mqtt.roles.downlink import DownlinkFollower, DownlinkWriter
from hfl_mqtt.roles.messages import (
    JOIN,
    LEAVE,
    STOP,
    RecentIds,
    decode_from,
    delta_message,
    new_update_id,
    parse_ctl,
    parse_reparent,
    parse_status,
    parse_status_parent,
    status_payload,
)
from hfl_mqtt.roles.parentage import Parentage
from hfl_mqtt.roles.report import NodeReport, reject_reason
from hfl_mqtt.roles.uplinks import OpenLink, Uplinks
from hfl_mqtt.tasks.base import RoundAware, Task
from hfl_mqtt.topics import (
    ctl_topic,
    join_filter,
    join_topic,
    model_topic,
    parse_topic,
    status_topic,
    up_filter,
    up_topic,
)
from hfl_mqtt.transport.base import Channel, Incoming, LinkBase, LinkStats

__all__ = ["AggregatorBase", "EventCallback", "Step"]

log = structlog.get_logger("hfl_mqtt.roles")

EventCallback = Callable[[dict[str, Any]], None]

Step = Callable[[], Awaitable[None]]
"""Work from outside the node's links, run by ``AggregatorBase.post`` between two messages."""

MetricDict = dict[str, float | int | str | bool]

_MAX_COUNT = 2**53
MAX_PARTICIPANTS_TEXT = 4000
"""Longest ``participants`` list a model carries (header strings stop at 4096): beyond it the
list is left out and children take their report as taken."""


class AggregatorBase(ABC):
    """An edge, region or cloud node: updates from its children, deltas to its parent."""

    driven: ClassVar[bool] = False
    """A root driven from outside (``roles/driven_root.py``) takes its models from its driver,
    and needs no evaluator."""

    def __init__(
        self,
        config: NodeConfig,
        down: LinkBase,
        up: LinkBase | None = None,
        *,
        evaluator: Task | None = None,
        on_event: EventCallback | None = None,
        state: NodeState | None = None,
        open_link: OpenLink | None = None,
    ) -> None:
        if config.downstream is None:
            raise ValueError(f"aggregator {config.node} needs a downstream link")
        if (up is None) != (config.upstream is None):
            raise ValueError("an upstream link goes with an upstream config")
        self.config = config
        self.rounds_config = config.downstream
        self.children = list(config.downstream.children)
        """The children now: those of the config that have not moved away, and adoptees that
        joined."""
        self._may_adopt = set(config.downstream.children) | set(config.downstream.adoptees)
        self._home_children = set(config.downstream.children)
        self._child_under: dict[str, str | None] = {}
        """Where each child's last online status says it is (None: not said, an adoptee's)."""
        self.parentage = (
            Parentage(config.upstream, time.monotonic()) if config.upstream is not None else None
        )
        self.down, self.up = down, up
        self.uplinks = _uplinks(config, down, up, open_link)
        """``up``, and the links to fallback parents on other brokers (``open_link``)."""
        self.is_root = config.role == "root"
        if self.is_root and evaluator is None and not self.driven:
            raise ValueError("the root needs an evaluator task (its initial model and test data)")
        self.evaluator = evaluator
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
        self._down_codec, self._up_codec = _codecs(config)
        # The model stream to the children (whole models, or deltas and keyframes), and the
        # parent's, as this node follows it.
        self.downlink = _downlink(config, self._down_codec)
        self.parent_stream = (
            DownlinkFollower(self.uplinks, config.federation) if self.uplinks is not None else None
        )
        self._events: asyncio.Queue[Incoming | Step] = asyncio.Queue(1000)
        self._seen = RecentIds()
        self._offline: set[str] = set()
        self._children_bytes: dict[str, tuple[int, int]] = {}
        self.model: Model | None = None
        self.spec: ModelSpec | None = None
        self.version = 0
        self.ledger = UpstreamLedger(config.node)
        """What was reported to the parent, against which of its versions, and what not."""
        self._untaken: tuple[int, str, bytes] | None = None
        """The last report sent up (parent version, topic, payload), until the parent's next
        model."""
        self._started = self.report.started
        max_seconds = config.downstream.max_seconds
        self._stop_at = self._started + max_seconds if self.is_root and max_seconds else None
        self.checkpoints = state.store if state is not None else None
        self.registry = state.registry if state is not None else None
        self._resume_from = state.resume_from if state is not None else None
        self._finished = False
        self._log = log.bind(node=config.node, role=role)

    # --- what a mode provides -------------------------------------------------------------------

    @abstractmethod
    async def _begin(self) -> None:
        """The root's first model is ready: start."""

    @abstractmethod
    async def _accept(self, child: str, envelope: Envelope, topic: str) -> None:
        """A decoded, unseen update from a known child: check its version, fold it in."""

    @abstractmethod
    async def _parent_model(self, model: Model, header: Header) -> None:
        """A new model from the parent (the ledger still holds the previous one; its
        ``parent_async`` says how the new one aggregates)."""

    @abstractmethod
    def _wakeup_in(self) -> float | None:
        """Seconds until ``_on_timer`` is due (None: nothing is)."""

    @abstractmethod
    async def _on_timer(self) -> None: ...

    async def _children_changed(self) -> None:  # noqa: B027 (optional hook)
        """A child went offline."""

    @abstractmethod
    def _mode_state(self) -> tuple[dict[str, Any], dict[str, Model], set[str]]:
        """The mode's own state for a checkpoint: values, models, and the ids of updates taken
        but not yet in the model (which children must be allowed to send again)."""

    @abstractmethod
    async def _resumed(
        self, values: Mapping[str, Any], models: Mapping[str, Model], republish: bool
    ) -> None:
        """Restore the mode's state and go on: publish the checkpointed version's messages
        again (``republish``), or else a new version as the mode would."""

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> NodeReport:
        """Run until the global rounds are done (root), the parent says stop, or ``stop`` is
        set (then the children are not stopped)."""
        fed, me = self.config.federation, self.config.node
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
            pumps = [tasks.create_task(self._pump(self.down), name=f"{me}:down")]
            if self.uplinks is not None:
                await stack.enter_async_context(self.uplinks)
                pumps.append(tasks.create_task(self._pump(self.uplinks), name=f"{me}:up"))
            if stop is not None:
                pumps.append(tasks.create_task(self._stop_on(stop), name=f"{me}:stop"))
            # The node's metrics record, on the link of its status (None: off).
            metrics = metrics_publisher(
                self.config,
                self.report,
                self.uplinks or self.down,
                links=self._link_stats,
                now=self._metrics_now,
            )
            publishing = metrics.start(tasks) if metrics is not None else None
            await self.down.subscribe(up_filter(fed, me))
            for child in sorted(self._may_adopt):
                await self.down.subscribe(status_topic(fed, child))
            if self.config.downstream is not None and self.config.downstream.adoptees:
                await self.down.subscribe(join_filter(fed, me))
            control: Channel = self.uplinks if self.uplinks is not None else self.down
            await control.subscribe(ctl_topic(fed, me))
            if self.uplinks is not None and self.parent_stream is not None and self.parentage:
                await self.parent_stream.follow(self.parent)
                if self.parentage.fallbacks or self.parentage.timeout_s is not None:
                    for parent in self.parentage.candidates:
                        await self.uplinks.subscribe(status_topic(fed, parent))
            try:
                await self._loop()
            finally:
                for task in [*pumps, publishing]:
                    if task is not None:
                        task.cancel()
            if metrics is not None:
                await metrics.stop(publishing)  # the final record, at a clean stop
            await self._save_checkpoint(final=True)
        return self.report

    def _link_stats(self) -> list[LinkStats]:
        return (
            [self.down.stats, *(link.stats for link in self.uplinks.links)]
            if self.uplinks
            else [self.down.stats]
        )

    def _metrics_now(self) -> NodeNow:
        said = self.uplinks.online_payload if self.uplinks is not None else self.down.online_payload
        parent = self.parent if self.parentage is not None else None
        down = tuple(sorted(child for child in self.children if child in self._offline))
        return NodeNow(parent, parse_status(said) or "online", self.version or None, down)

    async def _pump(self, link: Channel) -> None:
        while True:
            await self._events.put(await link.receive())

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()

        async def leave() -> None:
            self._log.info("stopping: asked to from outside (the children go on)")
            self._finished = True

        await self.post(leave)

    async def _loop(self) -> None:
        if self._resume_from is not None:
            await self._resume(self._resume_from)
            self._resume_from = None
        elif self.is_root:
            if self.evaluator is not None:
                self.model = await asyncio.to_thread(self.evaluator.get_weights)
                self.spec = ModelSpec.from_arrays(self.model)
            await self._begin()
        while not self._finished:
            timeout = self._wakeup_in()
            silent_in = self.parentage.due_in(time.monotonic()) if self.parentage else None
            if silent_in is not None:
                timeout = silent_in if timeout is None else min(timeout, silent_in)
            if self._stop_at is not None:
                until_stop = max(0.0, self._stop_at - time.monotonic())
                timeout = until_stop if timeout is None else min(timeout, until_stop)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as a message is queued, and the node would run on.
            try:
                async with asyncio.timeout(timeout):
                    message = await self._events.get()
            except TimeoutError:
                if self._stop_at is not None and time.monotonic() >= self._stop_at:
                    self._log.info("time budget spent: stopping")
                    await self._finish()
                elif self.parentage is not None and self.parentage.due_in(time.monotonic()) == 0:
                    target = self.parentage.silent(time.monotonic())
                    if target is not None:
                        self._log.info("moving: no model for parent_timeout_s")
                        await self._move(target)
                else:
                    await self._on_timer()
                continue
            if isinstance(message, Incoming):
                await self._handle(message)
            else:
                await message()

    async def post(self, step: Step) -> None:
        """Run ``step`` on the node's loop between two messages, as a message is handled: for
        work that comes from outside the links (a Flower server's fit, say). It sees the node
        in a consistent state, as no message is being handled meanwhile."""
        await self._events.put(step)

    async def _handle(self, message: Incoming) -> None:
        topic = parse_topic(message.topic)
        fed, me = self.config.federation, self.config.node
        if topic is None or topic.federation != fed:
            return
        if topic.kind == "ctl" and topic.node == me:
            command = parse_ctl(message.payload)
            if command == "stop":
                self._log.info("stopping on request")
                await self._finish()
            elif command == "reparent" and self.parentage is not None:
                target = parse_reparent(message.payload)
                if target is not None and target != me:
                    await self._move(target, by_hand=True)
        elif topic.kind == "up" and topic.node == me and topic.child:
            await self._on_update(topic.child, message)
        elif topic.kind == "join" and topic.node == me and topic.child:
            command = parse_ctl(message.payload)
            child = topic.child
            if command in ("join", "leave"):
                # A join or leave queued in our session since an earlier run must not undo
                # what the child's retained status (newer, the truth) says.
                known = child in self._child_under
                if known and (self._child_under[child] == me) != (command == "join"):
                    self._log.info("a join or leave its status contradicts: ignored", child=child)
                else:
                    await self._membership(child, command == "join", message.topic)
        elif topic.kind == "status" and topic.node in self._may_adopt:
            await self._child_status(topic.node, message.payload)
        elif self.parent_stream is not None and self.parent_stream.carries(message.topic):
            await self._on_parent_model(message)
        if (
            topic.kind == "status"
            and self.parentage is not None
            and topic.node in self.parentage.candidates
        ):
            state = parse_status(message.payload)
            if state in ("online", "offline"):
                target = self.parentage.status(topic.node, state == "online")
                if target is not None:
                    self._log.info("moving to another parent", reason=f"{topic.node} {state}")
                    await self._move(target)

    # --- who the children are, who the parent is ---------------------------------------------

    @property
    def parent(self) -> str:
        """The parent this node is under now."""
        assert self.parentage is not None, "the root has no parent"
        return self.parentage.current

    async def _child_status(self, child: str, payload: bytes) -> None:
        """A child's (or adoptee's) status: offline, online, or under another parent (a
        status without a parent means the child's own parent: us, for a child of ours)."""
        state = parse_status(payload)
        under = parse_status_parent(payload)
        if under is None and child in self._home_children:
            under = self.config.node
        if state == "online":
            self._child_under[child] = under
            if under is not None:
                await self._membership(child, under == self.config.node, "")
        if state in ("offline", "idle") and child in self.children:
            self._offline.add(child)  # an idle child (all its children gone) sends nothing
            self._log.info(f"child {state}", child=child)
            await self._children_changed()
        elif state is not None:
            self._offline.discard(child)

    async def _membership(self, child: str, joins: bool, topic: str) -> None:
        """``child`` joins or leaves; a join from a node we may not adopt is refused."""
        if joins and child not in self._may_adopt:
            self.report.reject("unknown_sender", topic, f"{child} may not join (not an adoptee)")
            return
        if joins == (child in self.children):
            return
        if joins:
            self.children.append(child)
            self._offline.discard(child)
        else:
            self.children.remove(child)
        self._log.info("child joined" if joins else "child left", child=child)
        if len(self.children) <= 1:
            await self._announce("online" if self.children else "idle")
        await self._children_changed()

    async def _announce(self, state: str) -> None:
        """Our status: ``idle`` while no child is left (the parent then waits for nothing from
        us), ``online`` (naming our parent if we moved) again once one joins."""
        if self.uplinks is None or self.parentage is None:
            return
        payload = status_payload(state, parent=self.parent)
        self.uplinks.online_payload = payload
        status = status_topic(self.config.federation, self.config.node)
        await self.uplinks.publish(status, payload, retain=True)

    async def _move(self, parent: str, *, by_hand: bool = False) -> None:
        """Leave the current parent for ``parent`` (or, if its broker cannot be reached, the
        next candidate): announce it, name it in our status, take its retained model (the
        ledger keeps what was not reported: docs/reparenting.md)."""
        assert self.parentage is not None
        assert self.uplinks is not None
        fed, me, old = self.config.federation, self.config.node, self.parent
        target = await self.uplinks.reach(parent, self.parentage, by_hand=by_hand)
        if target is None or target == old:
            return
        parent = target
        self.parentage.move(parent, time.monotonic(), by_hand=by_hand)
        self.ledger.rehome()
        self._untaken = None
        self.report.reparented += 1
        self._log.info("re-homed", parent_from=old, parent_to=parent, by_hand=by_hand)
        state = "online" if self.children else "idle"
        online = status_payload(state, parent=parent)
        self.uplinks.online_payload = online
        await self.uplinks.publish(status_topic(fed, me), online, retain=True)  # first: the truth
        await self.uplinks.publish(join_topic(fed, old, me), LEAVE)
        await self.uplinks.publish(join_topic(fed, parent, me), JOIN)
        if parent not in self.parentage.fallbacks and parent != self.parentage.home:
            await self.uplinks.subscribe(status_topic(fed, parent))
        assert self.parent_stream is not None
        await self.parent_stream.follow(parent)

    async def _finish(self) -> None:
        await self._stop_children()
        self._finished = True

    # --- updates from the children --------------------------------------------------------------

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
        if self._seen.seen(envelope.header.update_id):
            self.report.reject("duplicate", message.topic, envelope.header.update_id)
            return
        await self._accept(child, envelope, message.topic)

    def _delta_of(self, envelope: Envelope, topic: str, lr: float) -> Model | None:
        """The update's tensors, checked against the model and the downlink's range; None
        (counted, logged) if they do not fit."""
        try:
            delta = envelope.arrays(expect=self.spec)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), topic, str(exc))
            return None
        peak = max((float(np.abs(v).max()) for v in delta.values() if v.size), default=0.0)
        if self._model_peak + lr * peak > self._value_limit:
            self.report.reject("out_of_range", topic, f"|delta| up to {peak:.3g}")
            return None
        metrics = envelope.header.metrics
        tree_bytes, tree_messages = metrics.get("tree_bytes", 0), metrics.get("tree_messages", 0)
        if _is_count(tree_bytes) and _is_count(tree_messages):
            sender = envelope.header.sender
            self._children_bytes[sender] = (tree_bytes, tree_messages)  # type: ignore[assignment]
        return delta

    def _update(self, envelope: Envelope, delta: Mapping[str, Any]) -> Update:
        header = envelope.header
        return Update(
            header.sender,
            header.base_version or 0,
            delta,
            header.num_examples,
            header.update_id,
            header.metrics,
        )

    # --- the model down -------------------------------------------------------------------------

    async def _publish_model(self, metrics: MetricDict) -> None:
        """Publish ``model`` as the next version, retained, for the broker to fan out."""
        assert self.model is not None
        self.version += 1
        metrics = {"async": self.rounds_config.is_async, **metrics}
        if self.ledger.parent_version is not None:
            metrics["parent_version"] = self.ledger.parent_version
        messages = self.downlink.publish(self.version, self.model, metrics)
        every = self.checkpoints.every if self.checkpoints is not None else 0
        if every and self.version % every == 0:
            await self._save_checkpoint()  # before it is out: a resume publishes it again
        await self._send_down(messages)

    async def _republish(self) -> None:
        """Publish the current version's messages again (all the stream retains)."""
        await self._send_down(list(self.downlink.retained.items()))

    async def _send_down(self, messages: list[tuple[str, bytes]]) -> None:
        assert self.model is not None
        for topic, payload in messages:
            await self.down.publish(topic, payload, retain=True)
        self._model_peak = max(
            (float(np.abs(v).max()) for v in self.model.values() if v.size), default=0.0
        )

    @staticmethod
    def participants_metric(senders: list[str]) -> MetricDict:
        """The children whose updates a model took, if the list fits in a header."""
        text = ",".join(sorted(senders))
        return {"participants": text} if len(text) <= MAX_PARTICIPANTS_TEXT else {}

    # --- the parent's model ---------------------------------------------------------------------

    async def _on_parent_model(self, message: Incoming) -> None:
        assert self.parentage is not None
        assert self.parent_stream is not None
        stream = self.parent_stream
        if stream.reader.spec is None and self.spec is not None:
            stream.reader.spec = self.spec
        try:
            taken = await stream.take(message)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return
        if taken == "again":
            assert stream.header is not None
            await self._resend_untaken(stream.header.version)
            return
        if taken != "new":  # older versions (a replay of the stream's history) are no news
            return
        if self.config.uplink_latency_s:  # a simulated slow link from the parent
            await asyncio.sleep(self.config.uplink_latency_s)
        assert stream.header is not None
        assert stream.model is not None
        header = stream.header
        parent_version = self.ledger.parent_version
        if parent_version is not None and header.version <= parent_version:
            self.report.reject("stale", message.topic, f"parent version {header.version} again")
            return
        self.parentage.model_came(time.monotonic())
        self._untaken = None  # the parent has moved on: it took our report, or never will
        model = {k: v.copy() for k, v in stream.model.items()}  # the stream keeps its own
        if self.spec is None:
            self.spec = ModelSpec.from_arrays(model)
        self.ledger.parent_async = header.metrics.get("async") is True
        await self._parent_model(model, header)

    def _rebase(self, model: Model, header: Header) -> Model:
        """Move ``x`` onto the parent's new model, keeping what is not reported yet; returns
        the shift ``x_new - x_old``."""
        assert self.model is not None
        moved = self.ledger.rebase(
            self.model,
            model,
            header.version,
            participants=header.metrics.get("participants"),
            parent_async=self.ledger.parent_async,
        )
        if moved.taken is False:
            self._log.info("the parent did not take our report: it stays to be reported")
        self.model = moved.model
        return moved.shift

    def _adopt_parent(self, model: Model, header: Header) -> None:
        """Start over from the parent's model: ``x`` becomes a copy of it."""
        self.model = self.ledger.adopt(model, header.version, parent_async=self.ledger.parent_async)

    # --- reporting up ---------------------------------------------------------------------------

    async def _report_up(
        self,
        participants: int,
        loss: float | None,
        reply: MetricDict | None = None,
        *,
        codec: Compressor | None = None,
    ) -> None:
        """Send ``x - anchor`` against the parent's version (``UpstreamLedger.report``), with
        the subtree's ``reply`` to the parent's instruction (``roles/instructions.py``), in
        ``codec`` (default: the uplink's)."""
        assert self.uplinks is not None
        assert self.config.upstream is not None
        assert self.model is not None
        assert self._up_codec is not None
        if not self.ledger.based:
            # Moved to another parent, whose model has not come yet: what would be reported
            # stays in x - anchor, to be rebased onto that model (or dropped by a synchronous
            # cycle restarting from it).
            self._log.info("no model from the new parent yet: the report waits")
            return
        tree_bytes, tree_messages = self.tree_traffic()
        metrics: MetricDict = {
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
            "participants": participants,
        }
        if loss is not None:
            metrics["loss"] = loss
        metrics.update(reply or {})
        report = self.ledger.report(self.model, max_examples=_MAX_COUNT)
        update_id = new_update_id()
        payload = delta_message(
            self.config.federation,
            self.config.node,
            report.base_version,
            report.delta,
            report.examples,
            codec or self._up_codec,
            metrics,
            update_id=update_id,
        )
        topic = up_topic(self.config.federation, self.parent, self.config.node)
        self._untaken = (report.base_version, topic, payload)
        self.report.sent_ids.append(update_id)
        if self.config.uplink_latency_s:  # a simulated slow link to the parent
            await asyncio.sleep(self.config.uplink_latency_s)
        await self.uplinks.publish(topic, payload)
        if self.checkpoints is not None and self.checkpoints.every:
            await self._save_checkpoint()  # the ledger moved: a resume must not report it again

    async def _resend_untaken(self, version: int) -> None:
        """The parent's model ``version`` came again: if our last report is against it, send
        the report again (the parent reconnected; the broker may have lost it)."""
        if self._untaken is not None and self._untaken[0] == version and self.uplinks is not None:
            _, topic, payload = self._untaken
            self.report.resent += 1
            self._log.info("the parent's model came again: re-sending our report", version=version)
            await self.uplinks.publish(topic, payload)

    # --- checkpoints ----------------------------------------------------------------------------

    async def _save_checkpoint(self, *, final: bool = False) -> None:
        """Write the node's state (``CheckpointStore.save``, off the event loop); ``final``: at
        a clean stop, when nothing was published after it."""
        if self.checkpoints is None or self.model is None:
            return
        mode_values, mode_models, untaken_ids = self._mode_state()
        ledger_values, ledger_models = self.ledger.state()
        down_values, down_residuals = self._down_codec.state()
        stream_values, reference, blobs = self.downlink.state()
        values: dict[str, Any] = {
            "version": self.version,
            "rounds": self.report.rounds,
            "elapsed_s": time.monotonic() - self._started,
            "final": final,
            "every": self.checkpoints.every,
            "seen": [i for i in self._seen.ids() if i not in untaken_ids],
            "untaken": None if self._untaken is None else list(self._untaken[:2]),
            "ledger": ledger_values,
            "mode": mode_values,
            "down_codec": down_values,
            "downlink": stream_values,
            "evaluations": self.report.evaluations,
        }
        models: dict[str, Model] = {
            "model": self.model,
            "down_residuals": down_residuals,
            "downlink_reference": reference,
        }
        models |= {f"ledger.{k}": v for k, v in ledger_models.items()}
        models |= {f"mode.{k}": v for k, v in mode_models.items()}
        if self._up_codec is not None:
            values["up_codec"], models["up_residuals"] = self._up_codec.state()
        if self._untaken is not None:
            blobs["untaken"] = self._untaken[2]
        store = self.checkpoints
        await asyncio.to_thread(store.save, values, models, **blobs)

    async def _resume(self, checkpoint: Checkpoint) -> None:
        """Go on from ``checkpoint``: the same version and message if nothing can have been
        published after it, else a version beyond any that can."""
        values, models = checkpoint.values, checkpoint.models

        def group(prefix: str) -> dict[str, Model]:
            return {k[len(prefix) :]: v for k, v in models.items() if k.startswith(prefix)}

        self.model = dict(models["model"])
        self.spec = ModelSpec.from_arrays(self.model)
        self.version = int(values["version"])
        self.report.rounds = int(values["rounds"])
        self.report.evaluations = list(values["evaluations"])
        elapsed = float(values["elapsed_s"])  # time budgets and event times run on
        self._started -= elapsed
        self.report.started -= elapsed
        if self._stop_at is not None:
            self._stop_at -= elapsed
        self._seen = RecentIds(ids=values["seen"])
        self.ledger.load(values["ledger"], group("ledger."))
        self._down_codec.load(values["down_codec"], models["down_residuals"])
        if self._up_codec is not None and "up_codec" in values:
            self._up_codec.load(values["up_codec"], models["up_residuals"])
        untaken, blob = values["untaken"], checkpoint.blobs.get("untaken")
        if untaken is not None and blob is not None:
            self._untaken = (int(untaken[0]), str(untaken[1]), blob)
        every = int(values["every"])
        republish = "published" in checkpoint.blobs
        if not (every == 1 or values["final"]):
            self.version += max(every - 1, 0)  # versions published since: skip past them
            republish = False
        if republish:
            self._load_downlink(values, models, checkpoint.blobs)
        self._log.info(
            "resuming from the checkpoint",
            version=self.version,
            rounds=self.report.rounds,
            same_version=republish,
        )
        await self._resumed(values["mode"], group("mode."), republish)

    def _load_downlink(
        self, values: Mapping[str, Any], models: Mapping[str, Model], blobs: Mapping[str, bytes]
    ) -> None:
        """The model stream as the checkpoint left it, to publish its messages again (a
        checkpoint without one held the current version's whole model)."""
        stream = values.get("downlink")
        if stream is None:
            topic = model_topic(self.config.federation, self.config.node)
            self.downlink.retained = {topic: blobs["published"]}
            return
        self.downlink.load(stream, models.get("downlink_reference", {}), blobs)

    # --- the root -------------------------------------------------------------------------------

    async def _evaluate(self, participants: int, examples: int) -> None:
        assert self.evaluator is not None
        assert self.model is not None
        model = self.model

        def evaluate() -> Any:
            assert self.evaluator is not None
            self.evaluator.set_weights(model)
            if isinstance(self.evaluator, RoundAware):
                self.evaluator.begin_round(self.report.rounds)
            return self.evaluator.evaluate()

        result = await asyncio.to_thread(evaluate)
        tree_bytes, tree_messages = self.tree_traffic()
        event: dict[str, Any] = {
            "global_round": self.report.rounds,
            "version": self.version,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "seconds": time.monotonic() - self._started,
            "participants": participants,
            "examples": examples,
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
        }
        self.report.evaluations.append(event)
        if self.registry is not None:
            await asyncio.to_thread(
                self.registry.record,
                self.version,
                model,
                accuracy=result.accuracy,
                loss=result.loss,
                round=self.report.rounds,
                seconds=event["seconds"],
            )
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


def mean_metric(updates: list[Update], name: str) -> float | None:
    """The example-weighted mean of a metric the updates report, if any does."""
    values = [float(v) for u in updates if isinstance(v := u.metrics.get(name), int | float)]
    if not values:
        return None
    weights = [
        max(u.num_examples, 1) for u in updates if isinstance(u.metrics.get(name), int | float)
    ]
    return float(np.average(values, weights=weights))


def _uplinks(
    config: NodeConfig, down: LinkBase, up: LinkBase | None, open_link: OpenLink | None
) -> Uplinks | None:
    if up is None or config.upstream is None:
        return None
    return Uplinks(
        up,
        config.upstream,
        federation=config.federation,
        node=config.node,
        open_link=open_link,
        read_home=up is not down,  # else it is read as the downstream link
    )


def _codecs(config: NodeConfig) -> tuple[Compressor, Compressor | None]:
    """The compressors of an aggregator's model (down) and of its reports (up, if any)."""
    assert config.downstream is not None
    down = Compressor(config.downstream.codec, seed=config.task.seed + 7)
    if config.upstream is None:
        return down, None
    up = Compressor(
        config.upstream.codec,
        error_feedback=config.upstream.error_feedback,
        seed=config.task.seed + 11,
    )
    return down, up


def _downlink(config: NodeConfig, codec: Compressor) -> DownlinkWriter:
    """The writer of an aggregator's model stream (``codec``: its whole models)."""
    assert config.downstream is not None
    spec = config.downstream.delta_codec
    delta = Compressor(spec, seed=config.task.seed + 13) if spec is not None else None
    return DownlinkWriter(
        config.federation, config.node, codec, delta, config.downstream.keyframe_every
    )


def _is_count(value: object) -> bool:
    """A byte or message count a child may report: an int that sums safely."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_COUNT
