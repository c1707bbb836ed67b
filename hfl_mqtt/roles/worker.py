"""The worker: a leaf that trains on its own data and sends its delta up.

For every new model its parent publishes, the worker trains from it (in a thread, so the event
loop keeps the MQTT keepalives going) and publishes ``trained - received`` against the
version it received. Under a synchronous parent, a newer model that arrives during training
wins: the stale result is dropped, not sent (the parent would refuse it). An asynchronous
parent (its models say ``async``) takes late results, weighted by their staleness: the worker
sends what it trained and then trains from the newest model, skipping the ones in between; if
no newer one has come, it trains again on the one it has (like a FedBuff client, it never idles).

The last delta sent is kept until the parent publishes a newer model (which took it, or moved
on). When the parent's current model arrives again, the parent has put it back after a
reconnect (its subscriptions are in place again), and the broker may have lost our delta with
its state: the worker sends it again (the parent drops a duplicate by its update id).
A ``stop`` event set from outside (a signal) ends the worker at the next message boundary: a
delta being sent is sent first.

A worker with ``fallbacks`` moves to another parent when its own goes offline (or falls
silent), and back (``roles/parentage.py``, docs/reparenting.md); a ``reparent`` control
message moves it by hand. A fallback on another broker is reached through a link of its own
(``roles/uplinks.py``).

A worker with a ``device`` (``NodeConfig.device``) plays a slower board: each training run
takes at least ``slowdown * (training seconds + compute_s)``, its link to the parent adds
latency and a bandwidth cap both ways (``hfl_mqtt.transport.shaping``), and after a run it may
drop out for a while: status offline, everything but a stop ignored, then online again and on
from the newest model its parent published.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any, Literal

import numpy as np
import structlog

from hfl_mqtt.accounting import PrivacyAccountant
from hfl_mqtt.aggregation.base import Model, subtract
from hfl_mqtt.aggregation.privacy import privatize
from hfl_mqtt.codec import Compressor, Header, ModelSpec
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import DecodeError, TaskError
from hfl_mqtt.metrics import NodeNow, metrics_publisher
from hfl_mqtt.roles.downlink import DownlinkFollower
from hfl_mqtt.roles.instructions import ZERO_DELTA, Instruction, instruction_of, reply_entries
from hfl_mqtt.roles.messages import (
    JOIN,
    LEAVE,
    decode_from,
    delta_message,
    new_update_id,
    parse_ctl,
    parse_reparent,
    parse_status,
    status_payload,
)
from hfl_mqtt.roles.parentage import Parentage
from hfl_mqtt.roles.report import NodeReport, reject_reason
from hfl_mqtt.roles.uplinks import OpenLink, Uplinks
from hfl_mqtt.tasks.base import Instructed, RoundAware, Task, TrainResult
from hfl_mqtt.topics import (
    ctl_topic,
    join_topic,
    parse_topic,
    status_topic,
    up_topic,
)
from hfl_mqtt.transport.base import Channel, Incoming, LinkBase, LinkStats
from hfl_mqtt.transport.shaping import LinkShaper, ShapedLink

__all__ = ["Worker"]

log = structlog.get_logger("hfl_mqtt.roles")

_STOPPED = Incoming("", b"")
"""What ``Worker._receive`` returns once the stop event is set."""
_SILENT = Incoming("", b"")
"""What ``Worker._receive`` returns when the parent has sent no model for its timeout."""

_Kind = Literal["stop", "model", "status", "reparent", "silent"]


def picked(header: Header, node: str) -> bool:
    """Whether the parent's model ``header`` asks ``node`` to train (its ``train`` list, or not
    in its ``skip`` list; neither: everyone)."""
    train, skip = header.metrics.get("train"), header.metrics.get("skip")
    if isinstance(train, str):
        return node in train.split(",")
    if isinstance(skip, str):
        return node not in skip.split(",")
    return True


class Worker:
    """Trains on each model from the parent and sends the delta up.

    ``open_link``: how to connect to a fallback parent's broker when it is not ``up``'s.
    """

    def __init__(
        self, config: NodeConfig, up: LinkBase, task: Task, *, open_link: OpenLink | None = None
    ) -> None:
        if config.upstream is None:
            raise ValueError(f"worker {config.node} needs an upstream link")
        self.config = config
        self.parentage = Parentage(config.upstream, time.monotonic())
        self.up = up
        self.uplinks = Uplinks(
            up, config.upstream, federation=config.federation, node=config.node, open_link=open_link
        )
        self.task = task
        self.report = NodeReport(config.node, "worker", config.level, up=up.stats)
        up.on_reject = self.report.reject_decode
        self._compressor = Compressor(
            config.upstream.codec,
            error_feedback=config.upstream.error_feedback,
            seed=config.task.seed * 100_003 + (config.partition or 0),
        )
        settings = config.upstream.local_privacy
        self._privacy = None
        if settings is not None:
            self._privacy = PrivacyAccountant("local", settings.noise_multiplier, settings.delta)
        entropy = None if settings is None or settings.seed is None else settings.seed
        self._privacy_rng = np.random.default_rng(
            None if entropy is None else [entropy, config.partition or 0]
        )
        # The parent's models must fit this worker's own model: same names, shapes, dtypes. A
        # task that knows its model only once told (a Flower ClientApp) takes the first's.
        own = task.get_weights()
        self._spec = ModelSpec.from_arrays(own) if own else None
        self._pending: deque[Incoming] = deque()
        self._keep_training_on: tuple[Header, Model] | None = None
        """The newest model of an asynchronous parent: trained on again while no newer comes."""
        self._untaken: tuple[int, str, bytes] | None = None
        """The last delta sent (base version, topic, payload) until the parent moves on."""
        self._stop: asyncio.Event | None = None
        self._version: int | None = None
        """The version of the parent's model trained on last (the metrics record's)."""
        self._offline = False
        self._log = log.bind(node=config.node, role="worker")
        self.device = config.device
        # The worker's own draws (dropouts): the same device seed, the same sequence.
        self._rng = np.random.default_rng(self.device.seed if self.device else 0)
        self._link: Channel = self.uplinks
        if self.device is not None:
            shaper = LinkShaper(
                self.device.latency_s, self.device.up_bytes_per_s, self.device.down_bytes_per_s
            )
            if shaper.shapes:
                self._link = ShapedLink(self.uplinks, shaper)
        self.stream = DownlinkFollower(self._link, config.federation, self._spec)
        """The parent's model stream (``roles/downlink.py``)."""

    @property
    def parent(self) -> str:
        """The parent the worker is under now."""
        return self.parentage.current

    async def run(self, stop: asyncio.Event | None = None) -> NodeReport:
        """Serve until the parent says stop, or ``stop`` is set."""
        self._stop = stop
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
            await stack.enter_async_context(self.uplinks)
            if isinstance(self._link, ShapedLink):
                await stack.enter_async_context(self._link)
            if self.device is not None:
                self._log.debug("simulated device", **self.device.model_dump())
            metrics = metrics_publisher(
                self.config, self.report, self.uplinks, links=self._link_stats, now=self._now
            )
            publishing = metrics.start(tasks) if metrics is not None else None
            try:
                report = await self._serve()
            finally:
                if publishing is not None:
                    publishing.cancel()
            if metrics is not None:
                await metrics.stop(publishing)  # the final record, at a clean stop
            return report
        raise AssertionError("unreachable")

    def _link_stats(self) -> list[LinkStats]:
        return [link.stats for link in self.uplinks.links]

    def _now(self) -> NodeNow:
        status = (
            "offline" if self._offline else parse_status(self.uplinks.online_payload) or "online"
        )
        return NodeNow(self.parent, status, self._version)

    async def _serve(self) -> NodeReport:
        fed, me = self.config.federation, self.config.node
        await self.stream.follow(self.parent)
        await self._link.subscribe(ctl_topic(fed, me))
        if self.parentage.fallbacks or self.parentage.timeout_s is not None:
            for parent in self.parentage.candidates:
                await self._link.subscribe(status_topic(fed, parent))
        while True:
            message = await self._next_message()
            if message is None and self._keep_training_on is not None:
                # An asynchronous parent takes every result: never idle, train again on the
                # newest model there is (a FedBuff or FedAsync client's loop).
                await self._train_and_send(*self._keep_training_on)
            else:
                message = message or await self._receive()
                kind = self._kind(message)
                if kind == "stop":
                    self._log.info("stopping on request")
                    return self.report
                if kind in ("status", "reparent", "silent"):
                    await self._parent_news(kind, message)
                    continue
                if kind != "model" or not await self._on_model(message):
                    continue
            if self._drops_out() and await self._stay_offline():
                return self.report

    def _kind(self, message: Incoming) -> _Kind | None:
        """A stop or reparent on our control topic, a model from our parent, a status of a
        parent we may be under, our parent's silence, or something to ignore."""
        if message is _STOPPED:
            return "stop"
        if message is _SILENT:
            return "silent"
        topic = parse_topic(message.topic)
        if topic is None or topic.federation != self.config.federation:
            return None
        if topic.kind == "ctl" and topic.node == self.config.node:
            command = parse_ctl(message.payload)
            return command if command in ("stop", "reparent") else None  # type: ignore[return-value]
        if self.stream.carries(message.topic):
            return "model"
        if topic.kind == "status" and topic.node in self.parentage.candidates:
            return "status"
        return None

    # --- re-parenting ---------------------------------------------------------------------------

    async def _parent_news(self, kind: _Kind, message: Incoming) -> None:
        """A parent's status, our parent's silence, or an operator's move: move if due."""
        now = time.monotonic()
        if kind == "reparent":
            target = parse_reparent(message.payload)
            if target is None or target == self.config.node:
                self._log.warning("a reparent without a valid parent id: ignored")
                return
            await self._move(target, by_hand=True)
            return
        if kind == "silent":
            target = self.parentage.silent(now)
            reason = "no model for parent_timeout_s"
        else:
            topic = parse_topic(message.topic)
            state = parse_status(message.payload)
            if topic is None or state not in ("online", "offline"):
                return
            target = self.parentage.status(topic.node, state == "online")
            reason = f"{topic.node} is {state}"
        if target is not None:
            self._log.info("moving to another parent", reason=reason)
            await self._move(target)

    async def _move(self, parent: str, *, by_hand: bool = False) -> None:
        """Leave the current parent for ``parent`` (or, if its broker cannot be reached, the
        next candidate): announce it, say so in our status, and take the new parent's retained
        model (a fresh subscription delivers it)."""
        fed, me = self.config.federation, self.config.node
        old = self.parent
        target = await self.uplinks.reach(parent, self.parentage, by_hand=by_hand)
        if target is None or target == old:
            return
        parent = target
        self.parentage.move(parent, time.monotonic(), by_hand=by_hand)
        self._untaken = None
        self._keep_training_on = None
        self._log.info("re-homed", parent_from=old, parent_to=parent, by_hand=by_hand)
        self.report.reparented += 1
        online = status_payload("online", parent=parent)
        self.uplinks.online_payload = online
        await self._link.publish(status_topic(fed, me), online, retain=True)  # first: the truth
        await self._link.publish(join_topic(fed, old, me), LEAVE)
        await self._link.publish(join_topic(fed, parent, me), JOIN)
        if parent not in self.parentage.fallbacks and parent != self.parentage.home:
            await self._link.subscribe(status_topic(fed, parent))
        await self.stream.follow(parent)  # its current model is to be trained on

    async def _on_model(self, message: Incoming) -> bool:
        """Train on a new model (and send the result); False if there was nothing to train on."""
        if await self._take_model(message) != "new":
            return False
        header, model = self.stream.header, self.stream.model
        assert header is not None
        assert model is not None
        self.parentage.model_came(time.monotonic())
        self._untaken = None  # the parent has moved on: it took our delta, or never will
        asynchronous = header.metrics.get("async") is True
        self._keep_training_on = (header, model) if asynchronous else None
        if not picked(header, self.config.node):
            self.report.skipped += 1
            self._log.debug("not picked to train on this version", version=header.version)
            return True
        await self._train_and_send(header, model)
        return True

    async def _take_model(self, message: Incoming) -> str | None:
        """One message of the parent's model stream into ``stream``: what it did (None: it was
        refused); the parent's current version again has our last delta sent again."""
        try:
            taken = await self.stream.take(message)
        except DecodeError as exc:
            self.report.reject(reject_reason(exc), message.topic, str(exc))
            return None
        if taken == "again" and self.stream.header is not None:
            await self._resend_untaken(self.stream.header.version)
        return taken

    async def _train_and_send(self, header: Header, model: Model) -> None:
        version = header.version
        log_round = self._log.bind(base_version=version)
        started = time.monotonic()
        instruction = instruction_of(header.metrics)
        try:
            trained, result, reply = await asyncio.to_thread(
                self._train, model, version, instruction
            )
        except TaskError as exc:
            if instruction is None:
                raise
            # A driver's app failed on this version: the round goes on without this worker,
            # which stays for the next.
            log_round.error("the task failed on this version", error=str(exc))
            self.report.error(str(exc))
            return
        await self._take_device_time(time.monotonic() - started)
        evaluating = instruction is not None and instruction.do == "evaluate"
        if not evaluating:
            self.report.trained += 1
        self._note_dp_sgd(result)
        self._version = version
        newer_waiting = self._newer_model_waiting(version)  # sets aside what arrived meanwhile
        if newer_waiting and not header.metrics.get("async"):
            log_round.info("newer model arrived during training: result dropped")
            return
        # An evaluation's delta is zero, sent lossless and compressed to next to nothing.
        delta = subtract(trained, model) if evaluating else self._outgoing(subtract(trained, model))
        metrics: dict[str, float | int | str | bool] = {
            k: float(v) for k, v in result.metrics.items() if np.isfinite(v)
        }
        metrics.update(reply_entries(reply))
        metrics["tree_bytes"] = self.report.bytes_sent
        metrics["tree_messages"] = self.report.messages_sent
        update_id = new_update_id()
        payload = delta_message(
            self.config.federation,
            self.config.node,
            version,
            delta,
            result.num_examples,
            ZERO_DELTA if evaluating else self._compressor,
            metrics,
            update_id=update_id,
        )
        topic = up_topic(self.config.federation, self.parent, self.config.node)
        self._untaken = (version, topic, payload)
        self.report.sent_ids.append(update_id)
        await self._link.publish(topic, payload)
        log_round.debug("delta sent", bytes=len(payload), examples=result.num_examples)

    def _note_dp_sgd(self, result: TrainResult) -> None:
        """A task trained with DP-SGD reports its epsilon: the node's, unless local privacy
        (the stronger, device-level guarantee) is on."""
        dp_sgd = self.config.task.dp_sgd
        if dp_sgd is None or self._privacy is not None or "dp_epsilon" not in result.metrics:
            return
        epsilon = result.metrics["dp_epsilon"]
        self.report.privacy = {
            "kind": "dp_sgd",
            "epsilon": round(epsilon, 4) if np.isfinite(epsilon) else None,
            "delta": dp_sgd.delta,
            "releases": self.report.trained,
            "noise_multiplier": dp_sgd.noise_multiplier,
        }

    def _outgoing(self, delta: Model) -> Model:
        """The delta as it leaves the device: clipped and noised under local privacy, then
        turned against the federation if the simulated device is poisoned."""
        settings = self.config.upstream.local_privacy if self.config.upstream else None
        if settings is not None and self._privacy is not None:
            delta = privatize(delta, settings, self._privacy_rng)
            self._privacy.spend()
            self.report.privacy = self._privacy.to_dict(clip_norm=settings.clip_norm)
        if self.device is not None and self.device.poison is not None:
            factor = self.device.poison_scale * (-1 if self.device.poison == "sign_flip" else 1)
            delta = {k: (factor * v).astype(v.dtype, copy=False) for k, v in delta.items()}
        return delta

    async def _take_device_time(self, seconds: float) -> None:
        """Wait out the rest of a training run on the simulated device, which took ``seconds``
        here. On the event loop: the link stays alive, and models arriving meanwhile count as
        arrived during training."""
        if self.device is None:
            return
        device_seconds = self.device.slowdown * (seconds + self.device.compute_s)
        if device_seconds > seconds:
            await asyncio.sleep(device_seconds - seconds)

    def _drops_out(self) -> bool:
        """After a training run: whether the device drops out now."""
        return self.device is not None and bool(self._rng.random() < self.device.dropout)

    async def _stay_offline(self) -> bool:
        """Drop out for a drawn while, as if the device had vanished; True if told to stop.

        Offline, the worker takes nothing but a stop: it keeps what its parent published
        meanwhile, as a broker keeps it in a session (the newest whole model; every message of
        a delta-coded stream), and on rejoining goes on from the newest version.
        """
        assert self.device is not None
        seconds = float(self._rng.uniform(*self.device.offline_s))
        self.report.dropouts += 1
        self._log.info("dropping out", offline_s=round(seconds, 3))
        status = status_topic(self.config.federation, self.config.node)
        await self._link.publish(status, status_payload("offline"), retain=True)
        self._offline = True
        set_aside = deque(self._pending)  # what arrived during the last run counts too
        self._pending.clear()
        models: list[Incoming] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    message = (
                        set_aside.popleft()
                        if set_aside
                        else await self._receive(watch_parent=False)
                    )
                    kind = self._kind(message)
                    if kind == "stop":
                        self._log.info("stopping on request while offline")
                        return True
                    if kind == "model":
                        if not self.stream.reader.streaming:
                            models.clear()  # whole models: the newest is all it needs
                        models.append(message)
        self._offline = False
        await self._link.publish(status, status_payload("online"), retain=True)
        self._log.info("back online", models_waiting=len(models))
        self._pending.extend(models)
        return False

    async def _receive(self, *, watch_parent: bool = True) -> Incoming:
        """The next message from the link; ``_STOPPED`` once the stop event is set, or
        (``watch_parent``) ``_SILENT`` when the parent has sent no model for its timeout."""
        if self._stop is not None and self._stop.is_set():
            return _STOPPED
        receiving = asyncio.ensure_future(self._link.receive())
        waits: set[asyncio.Future[Any]] = {receiving}
        stopping = asyncio.ensure_future(self._stop.wait()) if self._stop is not None else None
        if stopping is not None:
            waits.add(stopping)
        try:
            await asyncio.wait(
                waits,
                timeout=self.parentage.due_in(time.monotonic()) if watch_parent else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if stopping is not None:
                stopping.cancel()
            if not receiving.done():
                receiving.cancel()
        if receiving.done() and not receiving.cancelled():
            return receiving.result()
        return _STOPPED if stopping is not None and stopping.done() else _SILENT

    async def _resend_untaken(self, version: int) -> None:
        """The parent's model ``version`` came again: if our last delta is against it, send
        the delta again (the parent reconnected; the broker may have lost it)."""
        if self._untaken is not None and self._untaken[0] == version:
            _, topic, payload = self._untaken
            self.report.resent += 1
            self._log.info("the parent's model came again: re-sending our delta", version=version)
            await self._link.publish(topic, payload)

    def _train(
        self, model: Model, version: int, instruction: Instruction | None
    ) -> tuple[Model, TrainResult, dict[str, int | float]]:
        """Train on ``model`` (or do what ``instruction`` says): the model after, what the
        training reports, and the reply to the instruction (nothing without one)."""
        self.task.set_weights(model)
        if isinstance(self.task, RoundAware):
            self.task.begin_round(version)
        if instruction is None:
            result = self.task.train(self.config.task.train)
            return self.task.get_weights(), result, {}
        if isinstance(self.task, Instructed):
            reply = self.task.follow(instruction.do, instruction.config)
            trained = self.task.get_weights() if instruction.do == "train" else model
            return trained, TrainResult(reply.num_examples), reply.metrics
        if instruction.do == "evaluate":
            scores = self.task.evaluate()
            reply_metrics = {"loss": scores.loss, "accuracy": scores.accuracy}
            return model, TrainResult(scores.num_examples), reply_metrics
        result = self.task.train(self.config.task.train)
        return self.task.get_weights(), result, dict(result.metrics)

    async def _next_message(self) -> Incoming | None:
        """The next message already here, passing over models that a later, newer one from our
        parent replaces (models can queue up while a worker trains or sends, and only the
        newest is worth training on; the deltas of a delta-coded stream are taken in on the
        way, untrained). A message that only looks like a newer model (another sender, bad
        bytes) replaces nothing: it is refused and counted when its turn comes."""
        while (waiting := self._link.receive_nowait()) is not None:
            self._pending.append(waiting)
        while self._pending:
            message = self._pending.popleft()
            if not self.stream.carries(message.topic):
                return message
            mine = self._model_version(message)
            if mine is None or not any(
                (v := self._model_version(m)) is not None and v > mine for m in self._pending
            ):
                return message
            if self.stream.reader.streaming:
                await self._take_model(message)
        return None

    def _newer_model_waiting(self, version: int) -> bool:
        """Move what arrived during training aside; True if a model from our parent newer than
        ``version`` is among it (checked as ``_on_model`` checks it: a spoofed or replayed one
        must not make the worker drop its result)."""
        while (message := self._link.receive_nowait()) is not None:
            self._pending.append(message)
        return any((v := self._model_version(m)) is not None and v > version for m in self._pending)

    def _model_version(self, message: Incoming) -> int | None:
        """The version of a model from our parent newer than the one we hold, or None for
        anything else."""
        if not self.stream.carries(message.topic):
            return None
        try:
            envelope = decode_from(
                message.payload,
                kind="model",
                sender=self.parent,
                federation=self.config.federation,
            )
        except DecodeError:
            return None
        held = self.stream.reader.version
        version = envelope.header.version
        return version if held is None or version > held else None
