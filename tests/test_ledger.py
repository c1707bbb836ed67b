"""The upstream ledger: reports, rebases and verdicts, as tables of small models."""

from __future__ import annotations

import numpy as np
import pytest

from hfl_mqtt.aggregation.base import Model, Update
from hfl_mqtt.aggregation.fedasync import FedAsync
from hfl_mqtt.aggregation.fedbuff import FedBuff
from hfl_mqtt.aggregation.ledger import UpstreamLedger
from hfl_mqtt.aggregation.staleness import StalenessFunction


def m(value: float) -> Model:
    return {"w": np.full(3, value, np.float32)}


def value(model: Model) -> float:
    (only,) = set(model["w"].tolist())
    return float(only)


def test_adopt_gives_a_copy_and_sets_the_base() -> None:
    ledger = UpstreamLedger("edge-1")
    assert not ledger.based
    parent = m(1.0)
    x = ledger.adopt(parent, 4, parent_async=False)
    x["w"] += 1
    assert value(parent) == 1.0
    assert ledger.based
    assert (ledger.parent_version, value(ledger.anchor or {})) == (4, 1.0)


@pytest.mark.parametrize(
    ("parent_async", "anchor_after", "awaiting", "examples_after"),
    [
        (True, 3.0, False, 0),  # a late-taking parent: the anchor moves at once
        (False, 1.0, True, 10),  # a synchronous parent: the verdict comes with its next model
    ],
)
def test_report_sends_x_minus_anchor(
    parent_async: bool, anchor_after: float, awaiting: bool, examples_after: int
) -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(1.0), 2, parent_async=parent_async)
    ledger.fold(updates=4, examples=10)
    report = ledger.report(m(3.0), max_examples=2**53)
    assert (report.base_version, value(report.delta), report.examples, report.updates) == (
        2,
        2.0,
        10,
        4,
    )
    assert value(ledger.anchor or {}) == anchor_after
    assert ledger.awaiting_verdict is awaiting
    assert ledger.examples == examples_after


def test_report_caps_the_examples_it_claims() -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(0.0), 1, parent_async=True)
    ledger.weigh(10**20)
    assert ledger.report(m(1.0), max_examples=2**53).examples == 2**53


# x = 5 at version 1 (anchor 1); a report of x was sent (sync parent) and then x grew to 6.
# The parent's next model M' = 10, with a participants list that takes us, drops us, or is
# left out (too long to carry: counts as taken).
@pytest.mark.parametrize(
    ("participants", "taken", "x_after", "examples_left"),
    [
        ("edge-0,edge-1", True, 11.0, 5),  # 10 + (6 - 5): only what came after the report
        ("edge-0", False, 15.0, 15),  # 10 + (6 - 1): the report stays to be reported
        (None, True, 11.0, 5),
    ],
)
def test_rebase_counts_a_taken_report_once(
    participants: str | None, taken: bool, x_after: float, examples_left: int
) -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(1.0), 1, parent_async=False)
    ledger.weigh(10)
    ledger.report(m(5.0), max_examples=2**53)
    ledger.fold(updates=1, examples=5)
    moved = ledger.rebase(m(6.0), m(10.0), 2, participants=participants, parent_async=False)
    assert moved.taken is taken
    assert value(moved.model) == x_after
    assert value(moved.shift) == x_after - 6.0
    assert ledger.examples == examples_left
    assert not ledger.awaiting_verdict
    assert (ledger.parent_version, value(ledger.anchor or {})) == (2, 10.0)


def test_rebase_without_a_pending_report_keeps_everything_unreported() -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(1.0), 1, parent_async=True)
    moved = ledger.rebase(m(4.0), m(2.0), 3, participants="x", parent_async=True)
    assert moved.taken is None
    assert value(moved.model) == 5.0  # 2 + (4 - 1)


def test_a_participant_name_that_merely_contains_ours_is_not_us() -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(0.0), 1, parent_async=False)
    ledger.report(m(1.0), max_examples=10)
    moved = ledger.rebase(m(1.0), m(0.0), 2, participants="edge-10,edge-11", parent_async=False)
    assert moved.taken is False


def test_state_round_trips_mid_verdict() -> None:
    ledger = UpstreamLedger("edge-1")
    ledger.adopt(m(1.0), 7, parent_async=False)
    ledger.fold(updates=3, examples=30)
    ledger.report(m(2.0), max_examples=100)
    values, models = ledger.state()
    restored = UpstreamLedger("edge-1")
    restored.load(values, models)
    for twin in (ledger, restored):
        moved = twin.rebase(m(2.5), m(4.0), 8, participants="edge-1", parent_async=False)
        assert (value(moved.model), twin.examples, twin.updates) == (4.5, 0, 0)


def test_state_of_a_fresh_ledger_round_trips() -> None:
    restored = UpstreamLedger("edge-1")
    restored.load(*UpstreamLedger("edge-1").state())
    assert not restored.based
    assert not restored.awaiting_verdict


# --- the asynchronous strategies' shared interface -------------------------------------------


def update(sender: str, base: int, delta: float, examples: int = 1) -> Update:
    return Update(sender, base, m(delta), examples, f"{sender}-{base}")


def test_fedasync_steps_on_every_update_it_can_take() -> None:
    strategy = FedAsync(0.5, StalenessFunction(function="constant"), max_staleness=1)
    strategy.versioned(1, m(0.0))
    strategy.versioned(2, m(1.0))
    strategy.versioned(3, m(2.0))
    assert not strategy.can_take(1)  # forgotten: more than max_staleness behind
    stepped = strategy.take(m(2.0), update("w", 2, 3.0), staleness=1)
    assert stepped is not None
    assert value(stepped) == 3.0  # (1 - 0.5) * 2 + 0.5 * (1 + 3)
    assert strategy.pending == 0


def test_fedbuff_steps_when_its_buffer_is_full() -> None:
    strategy = FedBuff(2, StalenessFunction(function="constant"))
    assert strategy.can_take(1)
    assert strategy.take(m(0.0), update("a", 1, 2.0), 0) is None
    assert strategy.pending == 1
    stepped = strategy.take(m(0.0), update("b", 1, 4.0), 0)
    assert stepped is not None
    assert value(stepped) == 3.0
    assert strategy.pending == 0


@pytest.mark.parametrize("mode", ["fedasync", "fedbuff"])
def test_async_strategy_state_round_trips(mode: str) -> None:
    def fresh() -> FedAsync | FedBuff:
        if mode == "fedasync":
            return FedAsync(0.5, StalenessFunction(), max_staleness=4)
        return FedBuff(3, StalenessFunction(function="fedbuff"), 0.8)

    strategy = fresh()
    for version in (1, 2, 3):
        strategy.versioned(version, m(float(version)))
    strategy.take(m(3.0), update("a", 2, 1.0, 5), 1)
    strategy.take(m(3.0), update("b", 3, -1.0, 7), 0)
    restored = fresh()
    restored.load(*strategy.state())
    assert restored.pending == strategy.pending
    ours = strategy.take(m(3.0), update("c", 1, 2.0, 2), 2)
    theirs = restored.take(m(3.0), update("c", 1, 2.0, 2), 2)
    assert ours is not None
    assert theirs is not None
    np.testing.assert_array_equal(ours["w"], theirs["w"])
