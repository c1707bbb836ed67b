"""The synchronous aggregator: rounds with its children; the root is one with no parent.

One cycle of a non-root aggregator: take the parent's model, run ``rounds`` (tau) rounds with
the children (publish the model once, retained, and let the broker fan it out; collect deltas
against that version; aggregate), then send ``model - parent's model`` up and wait for the
parent's next model. A newer parent model that arrives mid-cycle wins: the cycle restarts
from it. Under an asynchronous parent (one that takes late reports) there is no waiting: the
aggregator reports and goes on with its next cycle, and a new parent model is taken in at the
next round boundary by a rebase (``aggregator_base``). The root runs ``rounds`` global rounds,
evaluates after each, then tells its subtree to stop.

A round closes when every child has answered; or when every child still online (Last Will
watched on the status topics) has answered and at least the minimum has; or at the deadline
with at least the minimum. Updates are checked on arrival: unknown sender, wrong federation
or kind, a base that is not the current version (stale), a second update in the round, bad
bytes, wrong shapes, NaN - each is refused, counted by reason and logged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from hfl_mqtt.accounting import PrivacyAccountant, require_accounting
from hfl_mqtt.aggregation.auto_rounds import RoundsChooser
from hfl_mqtt.aggregation.base import (
    Model,
    RoundStrategy,
    StreamingStrategy,
    Update,
    load_strategy_state,
    strategy_state,
)
from hfl_mqtt.aggregation.fedavg import FedAvg
from hfl_mqtt.aggregation.participation import Participation
from hfl_mqtt.aggregation.privacy import PrivateMean
from hfl_mqtt.aggregation.robust import RobustAggregation, l2_norm
from hfl_mqtt.checkpoint import NodeState
from hfl_mqtt.codec import Envelope, Header
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.roles.aggregator_base import (
    MAX_PARTICIPANTS_TEXT,
    AggregatorBase,
    EventCallback,
    MetricDict,
    mean_metric,
)
from hfl_mqtt.roles.instructions import ZERO_DELTA, Instruction, combine_replies, instruction_of
from hfl_mqtt.roles.report import Arrival
from hfl_mqtt.roles.uplinks import OpenLink
from hfl_mqtt.tasks.base import Task
from hfl_mqtt.topics import up_topic
from hfl_mqtt.transport.base import LinkBase

__all__ = ["Aggregator", "EventCallback", "native_strategy"]


def native_strategy(config: NodeConfig) -> RoundStrategy:
    """The project's own aggregation ``config`` asks for: a robust rule, central privacy, or
    (the default) streaming FedAvg; ``ConfigError`` if it cannot be built."""
    downstream = config.downstream
    if downstream is None:
        raise ValueError(f"node {config.node} has no children to aggregate")
    if downstream.robust is not None:
        return RobustAggregation(downstream.robust, downstream.server_lr)
    if downstream.privacy is not None:
        require_accounting()
        try:
            return PrivateMean(downstream.privacy, len(downstream.children), downstream.server_lr)
        except ValueError as exc:
            raise ConfigError(f"node {config.node}: {exc}") from exc
    return FedAvg(downstream.server_lr)


class Aggregator(AggregatorBase):
    """Synchronous rounds with the children (FedAvg, or any ``RoundStrategy``)."""

    def __init__(
        self,
        config: NodeConfig,
        down: LinkBase,
        up: LinkBase | None = None,
        *,
        evaluator: Task | None = None,
        strategy: RoundStrategy | None = None,
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
        self.strategy: RoundStrategy = strategy or native_strategy(config)
        self._privacy: PrivacyAccountant | None = None
        if isinstance(self.strategy, PrivateMean):
            settings = self.strategy.settings
            self._privacy = PrivacyAccountant("central", settings.noise_multiplier, settings.delta)
        self._streaming = self.strategy if isinstance(self.strategy, StreamingStrategy) else None
        self._collecting: dict[str, Update] | None = None
        self._cycle_round = 0
        self._deadline = 0.0
        self._deadline_logged = False
        self._last_participants: list[str] = []
        self._participation = Participation(self.rounds_config.participation, self.children)
        self._picked: list[str] | None = None
        """The children asked to train in the open round; None: every child."""
        self._opened = 0.0
        self._selection_warned = False
        auto = self.rounds_config.auto_rounds
        self._chooser = RoundsChooser(auto) if auto is not None and not self.is_root else None
        self._cycle_rounds = self.rounds_config.rounds
        """The rounds of the current cycle (chosen at its start with ``rounds: auto``)."""
        self._reported_at: float | None = None
        self._children_codec = ""
        self._next_parent: tuple[Model, Header] | None = None
        """A parent model that came mid-round under an asynchronous parent: rebased onto at the
        round's end."""
        self.instruction: Instruction | None = None
        """What the current cycle's versions ask of the workers (``roles/instructions.py``):
        the parent's, passed on; None: train, as the aggregator's own loop decides."""

    @property
    def evaluating(self) -> bool:
        """The cycle evaluates the model instead of training it (one round, model unchanged)."""
        return self.instruction is not None and self.instruction.do == "evaluate"

    async def _begin(self) -> None:
        await self._start_round()

    def _wakeup_in(self) -> float | None:
        if self._collecting is None or self._deadline_logged:
            return None
        return max(0.0, self._deadline - time.monotonic())

    async def _on_timer(self) -> None:
        await self._maybe_close_round()

    async def _children_changed(self) -> None:
        await self._maybe_close_round()

    # --- the parent's model ---------------------------------------------------------------------

    async def _parent_model(self, model: Model, header: Header) -> None:
        self.instruction = instruction_of(header.metrics)
        if self._chooser is not None and self._reported_at is not None:
            self._chooser.up_took(time.monotonic() - self._reported_at)
            self._reported_at = None
        if self.ledger.parent_async and self.model is not None and self.ledger.anchor is not None:
            if self._collecting is not None:
                self._next_parent = (model, header)  # taken in when this round closes
                return
            self._rebase(model, header)
        else:
            if self._collecting is not None:
                self._log.info("new parent model mid-cycle: restarting from it")
            self._adopt_parent(model, header)
            self._cycle_round = 0
        await self._start_round()

    # --- rounds ---------------------------------------------------------------------------------

    async def _start_round(self, republish: bool = False) -> None:
        """Open a round on a new version (or on the current one, published again)."""
        assert self.model is not None
        self._collecting = {}  # open first: a checkpoint made as the version goes out says so
        if self._streaming is not None:
            self._streaming.start(self.model)
        if republish:
            await self._republish()  # the version's own picks go out with it again
        else:
            if self._cycle_round == 0:
                if self.evaluating:
                    self._cycle_rounds = 1
                else:
                    self._cycle_rounds = self.rounds_config.rounds
                    self._choose_cycle_rounds()
            selection = self._pick(self.report.rounds + 1)
            await self._publish_model(
                {
                    "round": self.report.rounds + 1,
                    **self.participants_metric(self._last_participants),
                    **selection,
                    **(self.instruction.header_entries() if self.instruction else {}),
                }
            )
        self._opened = time.monotonic()
        self._deadline = self._opened + self.rounds_config.deadline_s
        self._deadline_logged = False

    def _choose_cycle_rounds(self) -> None:
        """``rounds: auto``: the rounds of the cycle starting now, from what was measured."""
        chooser, auto = self._chooser, self.rounds_config.auto_rounds
        if chooser is None or auto is None or auto.deadline_s is None:
            return
        remaining = auto.deadline_s - (time.monotonic() - self._started)
        self._cycle_rounds = chooser.rounds(remaining)
        self.report.rounds_chosen.append(self._cycle_rounds)
        self._log.info(
            "rounds chosen",
            rounds=self._cycle_rounds,
            round_s=chooser.round_s,
            up_s=chooser.up_s,
            q=round(chooser.q, 4),
            remaining_s=round(remaining, 2),
        )

    def _pick(self, round_no: int) -> MetricDict:
        """Choose the children to train in round ``round_no``: the header metric that says so
        (``train``, or ``skip`` when shorter), nothing when every child trains."""
        self._participation.children = list(self.children)
        if self.rounds_config.participation.policy == "all":
            self._picked = None
            return {}
        picked = self._participation.pick(round_no, self.rounds_config.deadline_s, self._offline)
        selection = self._selection(picked)
        if selection:
            self._log.info(
                "children picked", round=round_no, picked=len(picked), of=len(self.children)
            )
        return selection

    def _selection(self, picked: list[str]) -> MetricDict:
        """Ask ``picked`` (not the other children) to train: the header metric that says so
        (``train``, or ``skip`` when shorter), nothing when every child is picked."""
        left_out = [c for c in self.children if c not in picked]
        self._picked = picked
        if not left_out:
            return {}
        key, names = ("train", picked) if len(picked) <= len(left_out) else ("skip", left_out)
        text = ",".join(names)
        if len(text) > MAX_PARTICIPANTS_TEXT:
            if not self._selection_warned:
                self._selection_warned = True
                self._log.warning(
                    "too many children to name in a model header: every child trains",
                    children=len(self.children),
                )
            self._picked = None
            return {}
        return {key: text}

    def _expected(self) -> list[str]:
        """The children asked to train in the open round (every child without a policy)."""
        if self._picked is None:
            return list(self.children)
        return [c for c in self._picked if c in self.children] or list(self.children)

    def _account_privacy(self) -> None:
        """Bring the privacy accountant up to the strategy's noised releases; report epsilon."""
        strategy = self.strategy
        if self._privacy is None or not isinstance(strategy, PrivateMean):
            return
        if strategy.rounds > self._privacy.releases:
            self._privacy.spend(strategy.rounds - self._privacy.releases)
        self.report.privacy = self._privacy.to_dict(clip_norm=round(strategy.clip_norm, 6))

    # --- checkpoints ----------------------------------------------------------------------------

    def _mode_state(self) -> tuple[dict[str, Any], dict[str, Model], set[str]]:
        values: dict[str, Any] = {
            "collecting": self._collecting is not None,
            "cycle_round": self._cycle_round,
            "last_participants": self._last_participants,
            "next_parent": None,
            "picked": self._picked,
            "participation": self._participation.state(),
            "cycle_rounds": self._cycle_rounds,
            "auto_rounds": None if self._chooser is None else self._chooser.state(),
        }
        models: dict[str, Model] = {}
        if self._next_parent is not None:
            model, header = self._next_parent
            values["next_parent"] = [header.version, header.metrics.get("participants")]
            models["next_parent"] = model
        values["strategy"], strategy_models = strategy_state(self.strategy)
        models |= {f"strategy.{k}": v for k, v in strategy_models.items()}
        # A round's updates are not checkpointed: their senders may send them again.
        collected = {u.update_id for u in (self._collecting or {}).values()}
        return values, models, collected

    async def _resumed(
        self, values: Mapping[str, Any], models: Mapping[str, Model], republish: bool
    ) -> None:
        self._cycle_round = int(values["cycle_round"])
        self._last_participants = list(values["last_participants"])
        picked = values.get("picked")
        self._picked = None if picked is None else list(picked)
        if "participation" in values:
            self._participation.load(values["participation"])
        self._cycle_rounds = int(values.get("cycle_rounds", self.rounds_config.rounds))
        if self._chooser is not None and values.get("auto_rounds") is not None:
            self._chooser.load(values["auto_rounds"])
            self.report.rounds_chosen = list(self._chooser.chosen)
        if values["next_parent"] is not None:
            version, participants = values["next_parent"]
            metrics = {} if participants is None else {"participants": participants}
            header = Header(
                federation=self.config.federation,
                sender=self.parent,
                kind="model",
                version=version,
                metrics=metrics,
            )
            self._next_parent = (models["next_parent"], header)
        prefix = "strategy."
        load_strategy_state(
            self.strategy,
            values["strategy"],
            {k[len(prefix) :]: v for k, v in models.items() if k.startswith(prefix)},
        )
        self._account_privacy()
        if self.is_root and self.report.rounds >= self.rounds_config.rounds:
            # Its children were stopped when the run ended: a stop sent now would wait in
            # their sessions and end the next run at its start.
            self._log.warning(
                "the checkpoint is of a finished run: stopping (raise rounds to train further)",
                rounds=self.report.rounds,
            )
            self._finished = True
        elif values["collecting"]:
            await self._start_round(republish)  # x is the model of the version published
        elif self.is_root:
            await self._start_round()  # x is a closed round's result: a new version
        elif republish:
            # Waiting for the parent with a closed cycle's result: the children get their
            # version again (what they send again is refused as a duplicate).
            await self._republish()

    async def _accept(self, child: str, envelope: Envelope, topic: str) -> None:
        header = envelope.header
        if self._collecting is None or header.base_version != self.version:
            self.report.reject(
                "stale",
                topic,
                f"base {header.base_version}, current {self.version}"
                + (
                    ""
                    if self._collecting is not None
                    else " (no round open: waiting for the parent)"
                ),
            )
            return
        if child in self._collecting:
            self.report.reject("duplicate", topic, "second update in one round")
            return
        delta = self._delta_of(envelope, topic, self.rounds_config.server_lr)
        if delta is None:
            return
        update = self._update(envelope, delta)
        if self._chooser is not None and header.codec != self._children_codec:
            self._children_codec = header.codec
            self._chooser.children_codec(header.codec)
        loss = header.metrics.get("loss")
        self._participation.answered(
            child,
            time.monotonic() - self._opened,
            float(loss) if isinstance(loss, int | float) else None,
            l2_norm(delta) if self.rounds_config.participation.policy == "contribution" else None,
        )
        if self._streaming is not None and not self.evaluating:
            self._streaming.add(update)
        if self._streaming is not None or self.evaluating:
            update = Update(
                child, self.version, {}, header.num_examples, header.update_id, header.metrics
            )
        self._collecting[child] = update
        self.report.accept(
            Arrival(time.monotonic() - self._started, child, 0, 1.0), header.update_id
        )
        await self._maybe_close_round()

    async def _maybe_close_round(self) -> None:
        collecting = self._collecting
        if collecting is None:
            return
        expected = self._expected()
        answered = len(collecting)
        heard = len(collecting.keys() & set(expected))
        needed = self.rounds_config.min_count(len(expected))
        everyone = heard == len(expected)
        # Every child asked and not known to be offline has answered.
        all_online = answered >= needed and heard + len(
            (self._offline & set(expected)) - collecting.keys()
        ) >= len(expected)
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
        if self._chooser is not None:
            self._chooser.round_took(time.monotonic() - self._opened)
        if time.monotonic() >= self._deadline:
            answered = {u.sender for u in updates}
            for child in self._expected():
                if child not in answered:
                    self._participation.missed(child, self.rounds_config.deadline_s)
        self._collecting = None
        if self.evaluating:
            pass  # the deltas are zero: the model stays as it is
        elif self._streaming is not None:
            self.model = self._streaming.finish()
        else:
            self.model = self.strategy.aggregate(self.model, updates)
        self.report.rounds += 1
        self._cycle_round += 1
        left_out = (
            self.strategy.outliers
            if isinstance(self.strategy, RobustAggregation) and not self.evaluating
            else {}
        )
        self._last_participants = [u.sender for u in updates if u.sender not in left_out]
        examples = sum(u.num_examples for u in updates if u.sender not in left_out)
        self._account_privacy()
        self._log.info(
            "round closed",
            round=self.report.rounds,
            participants=len(self._last_participants),
            examples=examples,
            **({"epsilon": self.report.privacy["epsilon"]} if self.report.privacy else {}),
        )
        for sender, ratio in left_out.items():
            self.report.reject(
                "outlier",
                up_topic(self.config.federation, self.config.node, sender),
                f"delta {ratio:.3g}x as far from the round's median as the typical child's: "
                "left out of the robust aggregate",
            )
        if self.is_root:
            await self._evaluate(len(self._last_participants), examples)
            if self.report.rounds >= self.rounds_config.rounds:
                await self._finish()
            else:
                await self._start_round()
            return
        if self._cycle_round >= self._cycle_rounds:
            self.ledger.weigh(examples)
            self._reported_at = time.monotonic()  # the round trip up counts from here
            replies = combine_replies((u.num_examples, u.metrics) for u in updates)
            await self._report_up(
                len(updates),
                mean_metric(updates, "loss"),
                replies,
                codec=ZERO_DELTA if self.evaluating else None,
            )
            if not self.ledger.parent_async:
                return  # wait for the parent's next model
            self._cycle_round = 0
        if self._next_parent is not None:
            self._rebase(*self._next_parent)
            self._next_parent = None
        await self._start_round()
