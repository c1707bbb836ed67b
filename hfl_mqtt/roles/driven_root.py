"""A root driven from outside, version by version (a Flower ServerApp, through the ``flower``
plug-in's Grid).

``ask(model, instruction, children)`` publishes ``model`` as the root's next version, carrying
``instruction`` (``roles/instructions.py``) to ``children`` (the others skip the version), and
runs one round with them as the root's rounds run: it closes when every child asked has
answered, or every one still online has and the minimum has, or at the deadline with the
minimum. It returns what each child that answered sent: after ``train`` its model (the version
plus its delta, as decoded), and its reply with its examples. The root aggregates nothing and
evaluates nothing itself: its driver does both. ``end()`` stops the children and the run.

Aggregators below do what they always do for a cycle, passing the instruction on: a train
cycle is their ``rounds`` rounds, an evaluate cycle one round that leaves the model as it is;
each answers with its aggregate and the examples-weighted mean of its children's replies.

An evaluate answer whose reply holds an accuracy and a loss (``accuracy`` or ``eval_acc``,
``loss`` or ``eval_loss``, as Flower's templates name them) is recorded as an evaluation of
the node report, weighted over the children as Flower's default aggregation weights it, so the
simulator's summary and the monitor show a driven run's accuracy like any other.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.codec import ModelSpec
from hfl_mqtt.config import NodeConfig
from hfl_mqtt.roles.aggregator import Aggregator, EventCallback
from hfl_mqtt.roles.instructions import Instruction, reply_of
from hfl_mqtt.transport.base import LinkBase

__all__ = ["Answer", "DrivenRoot", "DrivenRootError"]

ACCURACY_KEYS = ("accuracy", "eval_acc")
LOSS_KEYS = ("loss", "eval_loss")


class DrivenRootError(RuntimeError):
    """The driver asked what the root cannot do (an ask while one is open, after the end, or a
    model of other tensors than the run's)."""


@dataclass(frozen=True)
class Answer:
    """One child's answer to an ask: its model after training (None after ``evaluate``), its
    examples, and its reply."""

    model: Model | None
    num_examples: int
    reply: dict[str, int | float] = field(default_factory=dict)


class _KeepModel:
    """The root's ``RoundStrategy`` here: its driver aggregates, so a round changes nothing."""

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[Update]) -> Model:
        return dict(model)


class DrivenRoot(Aggregator):
    """The root, one round per ``ask`` (see the module docstring)."""

    driven: ClassVar[bool] = True

    def __init__(
        self, config: NodeConfig, down: LinkBase, *, on_event: EventCallback | None = None
    ) -> None:
        if config.role != "root":
            raise ValueError(f"{config.node} is not a root: only the root is driven")
        super().__init__(config, down, None, strategy=_KeepModel(), on_event=on_event)
        self._pending: asyncio.Future[dict[str, Answer]] | None = None
        self._asked: list[str] = []
        self._ended = False

    # --- what the driver calls (on the node's loop) ---------------------------------------------

    @property
    def ended(self) -> bool:
        """The run has ended: no more asks."""
        return self._ended

    def online_children(self) -> list[str]:
        """The children not known to be offline, in the configuration's order."""
        return [c for c in self.children if c not in self._offline]

    async def ask(
        self, model: Model, instruction: Instruction, children: Sequence[str]
    ) -> dict[str, Answer]:
        """One round of ``children`` on ``model``; the answers of those who answered."""
        if self._ended:
            raise DrivenRootError(f"{self.config.node} has ended: it asks no more rounds")
        if self._pending is not None:
            raise DrivenRootError("an ask came while the last one is still open")
        unknown = sorted(set(children) - set(self.children))
        if unknown:
            raise DrivenRootError(f"{', '.join(unknown)}: not children of {self.config.node}")
        self._check(model)
        answers: asyncio.Future[dict[str, Answer]] = asyncio.get_running_loop().create_future()
        self._pending = answers
        try:
            await self.post(functools.partial(self._open, model, instruction, list(children)))
            return await answers
        finally:
            self._pending = None

    async def end(self) -> None:
        """Stop the children and end the run, after what the node is doing now."""

        async def step() -> None:
            self._log.info("the driver is done: stopping")
            await self._finish()

        await self.post(step)

    async def run(self, stop: asyncio.Event | None = None) -> Any:
        try:
            return await super().run(stop)
        finally:
            self._ended = True
            if self._pending is not None and not self._pending.done():
                self._pending.set_exception(
                    DrivenRootError(f"{self.config.node} ended in the middle of a round")
                )

    # --- the round ------------------------------------------------------------------------------

    async def _begin(self) -> None:
        """Nothing until asked."""

    def _check(self, model: Model) -> None:
        if self.spec is None:
            return
        given = ModelSpec.from_arrays(model)
        if given != self.spec:
            raise DrivenRootError(
                f"the driver's model is not the run's: tensors {_describe(given)}, "
                f"expected {_describe(self.spec)}"
            )

    async def _open(self, model: Model, instruction: Instruction, children: list[str]) -> None:
        self.model = {name: np.array(array, copy=True) for name, array in model.items()}
        if self.spec is None:
            self.spec = ModelSpec.from_arrays(self.model)
        self.instruction = instruction
        self._asked = children
        self._cycle_round = 0
        self._log.info("asked", do=instruction.do, children=len(children))
        await self._start_round()

    def _pick(self, round_no: int) -> dict[str, Any]:
        return self._selection(self._asked)

    async def _close_round(self, updates: list[Update]) -> None:
        assert self.model is not None
        self._collecting = None
        self.report.rounds += 1
        self._last_participants = [u.sender for u in updates]
        training = not self.evaluating
        answers = {
            u.sender: Answer(
                {k: self.model[k] + u.delta[k] for k in self.model} if training else None,
                u.num_examples,
                reply_of(u.metrics),
            )
            for u in updates
            if u.sender in self._asked  # a header too long to name them asks every child
        }
        self._log.info("round closed", answered=len(answers), asked=len(self._asked))
        if not training:
            self._record_evaluation(answers)
        if self._pending is not None and not self._pending.done():
            self._pending.set_result(answers)

    def _record_evaluation(self, answers: Mapping[str, Answer]) -> None:
        """An evaluate round whose replies hold accuracy and loss, as an evaluation event."""
        total = sum(a.num_examples for a in answers.values())
        if total <= 0:
            return

        def mean(keys: tuple[str, ...]) -> float | None:
            for key in keys:
                if answers and all(key in a.reply for a in answers.values()):
                    return sum(a.num_examples * a.reply[key] for a in answers.values()) / total
            return None

        accuracy, loss = mean(ACCURACY_KEYS), mean(LOSS_KEYS)
        if accuracy is None or loss is None:
            return
        tree_bytes, tree_messages = self.tree_traffic()
        asked_round = self.instruction.config.get("server-round") if self.instruction else None
        server_round = (
            asked_round
            if isinstance(asked_round, int) and not isinstance(asked_round, bool)
            else len(self.report.evaluations) + 1
        )
        event: dict[str, Any] = {
            "global_round": server_round,
            "version": self.version,
            "accuracy": accuracy,
            "loss": loss,
            "seconds": time.monotonic() - self._started,
            "participants": len(answers),
            "examples": total,
            "tree_bytes": tree_bytes,
            "tree_messages": tree_messages,
        }
        self.report.evaluations.append(event)
        self._log.info("federated evaluation", accuracy=round(accuracy, 4), loss=round(loss, 4))
        if self.on_event is not None:
            self.on_event(event)


def _describe(spec: ModelSpec) -> str:
    return ", ".join(f"{name} {t.dtype}{list(t.shape)}" for name, t in spec.tensors.items())
