"""The asynchronous aggregator: FedAsync or FedBuff with its children, at any level.

There are no rounds. Each update is checked on arrival like a synchronous one, then measured:
its staleness is this aggregator's version minus the version it was computed against. Updates
more than ``max_staleness`` versions behind are refused (``too_stale``). FedAsync folds every
update in at once; FedBuff buffers ``buffer_size`` of them and then steps. Every
``publish_every_steps`` steps (by default every step) make a new version, published retained
(workers under an asynchronous parent send late results instead of dropping them, and then
train on the newest model they hold); the steps in between change the model, not the version.

A non-root aggregator reports ``x - anchor`` to its parent on a schedule: every
``report_every_updates`` folded updates, every ``report_every_s`` seconds, or whichever comes
first; under a synchronous parent at most once per parent version (the parent would refuse a
second report in its round). A new parent model is rebased onto at once (``aggregator_base``);
updates waiting in a FedBuff buffer stay there and go into the next step. The rebased model is
published at once, or with ``publish_on_rebase`` off, with the next step's version. The root
evaluates every ``eval_every`` steps and stops after ``rounds`` steps (or ``max_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hfl_mqtt.aggregation.base import AsyncStrategy, Model, Update
from hfl_mqtt.aggregation.fedasync import FedAsync
from hfl_mqtt.aggregation.fedbuff import FedBuff
from hfl_mqtt.checkpoint import NodeState
from hfl_mqtt.codec import Envelope, Header
from hfl_mqtt.config import NodeConfig, RoundConfig
from hfl_mqtt.roles.aggregator_base import AggregatorBase, EventCallback, mean_metric
from hfl_mqtt.roles.report import Arrival
from hfl_mqtt.roles.uplinks import OpenLink
from hfl_mqtt.tasks.base import Task
from hfl_mqtt.transport.base import LinkBase

__all__ = ["AsyncAggregator", "async_strategy"]


class AsyncAggregator(AggregatorBase):
    """FedAsync or FedBuff with the children; reports up on a schedule."""

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
        super().__init__(
            config,
            down,
            up,
            evaluator=evaluator,
            on_event=on_event,
            state=state,
            open_link=open_link,
        )
        rc = self.rounds_config
        if not rc.is_async:
            raise ValueError(f"{config.node}: mode {rc.mode!r} is not asynchronous")
        self.strategy = async_strategy(rc)
        self.report_every = rc.report_every_updates
        if self.report_every is None and rc.report_every_s is None:
            self.report_every = len(self.children)
        self._folded_updates: list[Update] = []
        """Their metrics (tensors dropped), for the report's mean loss."""
        self._last_report = time.monotonic()
        self._buffered: list[Update] = []
        """What the strategy holds and has not stepped with yet (tensors dropped), to count
        once it is folded."""
        self._unpublished = _Unpublished()

    # --- versions -------------------------------------------------------------------------------

    async def _begin(self) -> None:
        await self._new_version({})

    async def _new_version(self, metrics: dict[str, float | int | str | bool]) -> None:
        self._unpublished = _Unpublished()
        await self._publish_model(metrics)
        assert self.model is not None
        self.strategy.versioned(self.version, self.model)

    async def _parent_model(self, model: Model, header: Header) -> None:
        if self.model is None or self.ledger.anchor is None:
            self._adopt_parent(model, header)
        else:
            self.strategy.shift(self._rebase(model, header))
            self._log.info(
                "rebased on the parent's model",
                parent_version=header.version,
                buffered=self.strategy.pending,
            )
            if not self.rounds_config.publish_on_rebase:
                self._unpublished.rebased = True  # out with the next step's version
                await self._maybe_report()
                return
        await self._new_version({})
        await self._maybe_report()

    # --- checkpoints ----------------------------------------------------------------------------

    def _mode_state(self) -> tuple[dict[str, Any], dict[str, Model], set[str]]:
        values, models = self.strategy.state()
        held = [[u.sender, u.base_version, u.num_examples, u.update_id] for u in self._buffered]
        return {"strategy": values, "buffered": held}, models, set()

    async def _resumed(
        self, values: Mapping[str, Any], models: Mapping[str, Model], republish: bool
    ) -> None:
        self.strategy.load(values["strategy"], models)
        self._buffered = [
            Update(sender, int(base), {}, int(examples), update_id)
            for sender, base, examples, update_id in values["buffered"]
        ]
        rounds, evaluations = self.report.rounds, self.report.evaluations
        due = self.is_root and rounds > 0 and rounds % self.rounds_config.eval_every == 0
        if due and (not evaluations or evaluations[-1]["global_round"] != rounds):
            await self._evaluate(0, 0)  # the checkpoint went out before the evaluation
        if self.is_root and self.report.rounds >= self.rounds_config.rounds:
            # Its children were stopped when the run ended: a stop sent now would wait in
            # their sessions and end the next run at its start.
            self._log.warning(
                "the checkpoint is of a finished run: stopping (raise rounds to train further)",
                rounds=self.report.rounds,
            )
            self._finished = True
        elif republish:
            await self._republish()
        elif self.model is not None:
            await self._new_version({})

    # --- updates --------------------------------------------------------------------------------

    async def _accept(self, child: str, envelope: Envelope, topic: str) -> None:
        if self.model is None:
            self.report.reject("stale", topic, "no model yet")
            return
        base = envelope.header.base_version
        if base is None or base < 1 or base > self.version:
            self.report.reject("stale", topic, f"base {base}, current {self.version}")
            return
        staleness = self.version - base
        if staleness > self.rounds_config.max_staleness or not self.strategy.can_take(base):
            self.report.reject(
                "too_stale",
                topic,
                f"{staleness} versions behind (max {self.rounds_config.max_staleness})",
            )
            return
        delta = self._delta_of(envelope, topic, self.strategy.step_scale)
        if delta is None:
            return
        update = self._update(envelope, delta)
        seconds = time.monotonic() - self._started
        weight = self.strategy.weight(staleness)
        stepped = self.strategy.take(self.model, update, staleness)
        self.report.accept(Arrival(seconds, child, staleness, weight), update.update_id)
        self._buffered.append(_without_tensors(update))
        if stepped is not None:
            self.model = stepped
            folded, self._buffered = self._buffered, []
            self._folded_now(folded)
            await self._stepped(len(folded))

    def _folded_now(self, updates: list[Update]) -> None:
        self.ledger.fold(len(updates), sum(u.num_examples for u in updates))
        self._folded_updates.extend(_without_tensors(u) for u in updates)

    async def _stepped(self, updates: int) -> None:
        """A new model: publish it; the root evaluates or stops, others may report."""
        self.report.rounds += 1
        pending = self._unpublished
        pending.steps += 1
        pending.updates += updates
        if pending.rebased or pending.steps >= self.rounds_config.publish_every_steps:
            await self._new_version({"updates": pending.updates})
        if self.is_root:
            if self.report.rounds % self.rounds_config.eval_every == 0:
                recent = self._folded_updates
                await self._evaluate(len(recent), sum(u.num_examples for u in recent))
                self._folded_updates = []
            if self.report.rounds >= self.rounds_config.rounds:
                if self.report.rounds % self.rounds_config.eval_every:
                    await self._evaluate(0, 0)
                await self._finish()
            return
        await self._maybe_report()

    # --- reporting up ---------------------------------------------------------------------------

    def _report_due(self) -> bool:
        if self.is_root or self.ledger.updates == 0 or not self.ledger.based:
            return False
        if self.ledger.awaiting_verdict:
            return False  # a synchronous parent takes one report per version
        by_count = self.report_every is not None and self.ledger.updates >= self.report_every
        every_s = self.rounds_config.report_every_s
        by_time = every_s is not None and time.monotonic() - self._last_report >= every_s
        return by_count or by_time

    async def _maybe_report(self) -> None:
        if not self._report_due():
            return
        updates = self._folded_updates
        await self._report_up(len(updates), mean_metric(updates, "loss"))
        self._folded_updates = []
        self._last_report = time.monotonic()

    def _wakeup_in(self) -> float | None:
        every_s = self.rounds_config.report_every_s
        if self.is_root or every_s is None:
            return None
        return max(0.0, self._last_report + every_s - time.monotonic())

    async def _on_timer(self) -> None:
        if self.ledger.updates == 0 or self.ledger.awaiting_verdict:
            self._last_report = time.monotonic()  # nothing to send: the next period starts
            return
        await self._maybe_report()


def async_strategy(config: RoundConfig) -> AsyncStrategy:
    """The asynchronous strategy a level's config asks for."""
    if config.mode == "fedasync":
        return FedAsync(config.mixing, config.staleness_function(), config.max_staleness)
    if config.mode == "fedbuff":
        return FedBuff(
            config.buffer_size,
            config.staleness_function(),
            config.server_lr,
            weight_by_examples=config.weight_by_examples,
        )
    raise ValueError(f"mode {config.mode!r} is not asynchronous")


@dataclass(slots=True)
class _Unpublished:
    """What changed the model since the last published version."""

    steps: int = 0
    updates: int = 0
    rebased: bool = False
    """Onto a new parent model (with ``publish_on_rebase`` off)."""


def _without_tensors(update: Update) -> Update:
    return Update(
        update.sender,
        update.base_version,
        {},
        update.num_examples,
        update.update_id,
        update.metrics,
    )
