"""Asynchronous aggregation: staleness weights, FedAsync and FedBuff, and the async aggregator's
version bookkeeping (rebase, reporting up, rejection past the bound, duplicates)."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfl_mqtt.aggregation import FedAsync, FedBuff, StalenessFunction, Update
from tests.fakes import (
    W0,
    WAIT,
    assert_model,
    delta_bytes,
    filled,
    running_aggregator,
    shifted,
    until,
)

pytestmark = pytest.mark.anyio


# --- staleness functions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "a", "b", "staleness", "expected"),
    [
        ("constant", 0.5, 4, 0, 1.0),
        ("constant", 0.5, 4, 100, 1.0),
        ("polynomial", 0.5, 4, 0, 1.0),
        ("polynomial", 0.5, 4, 3, 0.5),  # (3 + 1) ** -0.5
        ("polynomial", 1.0, 4, 9, 0.1),
        ("polynomial", 0.0, 4, 9, 1.0),
        ("hinge", 0.5, 4, 0, 1.0),
        ("hinge", 0.5, 4, 4, 1.0),  # up to b: full weight
        ("hinge", 0.5, 4, 6, 0.5),  # 1 / (0.5 * (6 - 4) + 1)
        ("hinge", 2.0, 1, 3, 0.2),  # 1 / (2 * 2 + 1)
        ("fedbuff", 0.5, 4, 0, 1.0),
        ("fedbuff", 0.5, 4, 3, 0.5),  # 1 / sqrt(1 + 3)
        ("fedbuff", 0.5, 4, 8, 1 / 3),
        ("flare", 0.5, 4, 0, 1.0),
        ("flare", 0.5, 4, 4, 1 / 3),  # 1 / (1 + sqrt(4))
        ("flare", 0.5, 4, 9, 0.25),
    ],
)
def test_staleness_functions(
    function: Any, a: float, b: float, staleness: int, expected: float
) -> None:
    weight = StalenessFunction(function=function, a=a, b=b)(staleness)
    assert math.isclose(weight, expected, rel_tol=1e-12)


@pytest.mark.parametrize("function", ["constant", "polynomial", "hinge", "fedbuff", "flare"])
def test_staleness_weights_start_at_one_and_never_grow(function: Any) -> None:
    weigh = StalenessFunction(function=function, a=0.7, b=2)
    weights = [weigh(t) for t in range(200)]
    assert weights[0] == 1.0
    assert all(0 < w <= 1 for w in weights)
    assert all(later <= earlier for earlier, later in itertools.pairwise(weights))


def test_negative_staleness_is_a_bug() -> None:
    with pytest.raises(ValueError, match="staleness"):
        StalenessFunction()(-1)


# --- FedAsync ---------------------------------------------------------------------------------

ZERO = filled(W0, 0.0)


def update(sender: str, delta: Mapping[str, np.ndarray], n: int = 10, uid: str = "") -> Update:
    return Update(sender, 1, delta, n, uid or f"{sender}-{n}")


def test_fedasync_mixes_the_trained_model_in() -> None:
    strategy = FedAsync(0.5, StalenessFunction(function="polynomial", a=1.0), max_staleness=5)
    strategy.remember(1, W0)
    current = shifted(W0, 1.0)
    strategy.remember(2, current)
    # A fresh update against version 2: x <- 0.5 x + 0.5 (x + 2) = x + 1.
    assert_model(strategy.step(current, 2, filled(W0, 2.0), 0), shifted(W0, 2.0), tol=1e-6)
    # One version stale, against version 1: a_t = 0.5 / 2; x_new = W0 + 2 = x + 1.
    assert_model(strategy.step(current, 1, filled(W0, 2.0), 1), shifted(W0, 1.25), tol=1e-6)


def test_fedasync_forgets_what_is_past_the_bound() -> None:
    strategy = FedAsync(0.5, StalenessFunction(), max_staleness=2)
    for version in range(1, 6):
        strategy.remember(version, W0)
    assert [strategy.knows(v) for v in range(1, 6)] == [False, False, True, True, True]


def test_fedasync_shift_moves_every_remembered_model() -> None:
    strategy = FedAsync(1.0, StalenessFunction(function="constant"), max_staleness=5)
    strategy.remember(1, W0)
    strategy.shift(filled(W0, 3.0))
    # mixing 1: x <- x_new = (W0 + 3) + delta
    assert_model(strategy.step(W0, 1, ZERO, 0), shifted(W0, 3.0), tol=1e-6)


@pytest.mark.parametrize("mixing", [0.0, -0.1, 1.5, math.nan])
def test_fedasync_mixing_must_be_a_share(mixing: float) -> None:
    with pytest.raises(ValueError, match="mixing"):
        FedAsync(mixing, StalenessFunction(), 3)


# --- FedBuff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "by_examples", "items", "expected_step"),
    [
        # (delta value, examples, staleness)
        ("constant", True, [(1.0, 10, 0), (3.0, 30, 5)], (1 * 10 + 3 * 30) / 40),
        ("constant", False, [(1.0, 10, 0), (3.0, 30, 5)], (1 + 3) / 2),
        ("fedbuff", False, [(2.0, 1, 0), (2.0, 1, 3)], (2 * 1 + 2 * 0.5) / 2),
        ("flare", False, [(2.0, 1, 0), (2.0, 1, 4)], (2 * 1 + 2 / 3) / 2),
        ("fedbuff", True, [(1.0, 10, 3), (1.0, 30, 0)], (0.5 * 10 + 1 * 30) / 40),
        ("constant", True, [(4.0, 0, 0), (2.0, 0, 0)], 3.0),  # no examples: equal weights
    ],
)
def test_fedbuff_step(
    function: Any, by_examples: bool, items: list[tuple[float, int, int]], expected_step: float
) -> None:
    strategy = FedBuff(
        len(items), StalenessFunction(function=function), 0.5, weight_by_examples=by_examples
    )
    for index, (value, n, staleness) in enumerate(items):
        assert not strategy.full
        strategy.add(update(f"c{index}", filled(W0, value), n), staleness)
    assert strategy.full
    assert_model(strategy.step(W0), shifted(W0, 0.5 * expected_step), tol=1e-6)
    assert len(strategy) == 0


def test_fedbuff_refuses_a_nonsense_buffer() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        FedBuff(0, StalenessFunction())
    with pytest.raises(ValueError, match="server_lr"):
        FedBuff(2, StalenessFunction(), math.inf)


buffered_items = st.lists(
    st.tuples(
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
        st.integers(0, 10**6),
        st.integers(0, 40),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(items=buffered_items, order=st.randoms(use_true_random=False))
def test_fedbuff_step_does_not_depend_on_arrival_order(
    items: list[tuple[float, int, int]], order: Any
) -> None:
    """One full buffer gives the same model, bit for bit, whatever order it filled in."""
    rng = np.random.default_rng(len(items))
    updates = [
        (
            update(
                f"c{i}",
                shifted(filled(W0, v), 0) | {"w": rng.normal(v, 1, (2, 3)).astype(np.float32)},
                n,
                f"id{i}",
            ),
            s,
        )
        for i, (v, n, s) in enumerate(items)
    ]
    results = []
    for attempt in range(2):
        if attempt:
            order.shuffle(updates)
        strategy = FedBuff(len(updates), StalenessFunction(function="fedbuff"), 0.7)
        for item, staleness in updates:
            strategy.add(item, staleness)
        results.append(strategy.step(W0))
    for name in W0:
        np.testing.assert_array_equal(results[0][name], results[1][name])


# --- the asynchronous aggregator on the in-memory transport -----------------------------------


async def test_rebase_mid_buffer_keeps_the_buffer_and_counts_nothing_twice() -> None:
    """An edge (FedBuff, K=2) under a synchronous parent gets a new parent model while one
    update waits in its buffer."""
    constant = StalenessFunction(function="constant")
    async with running_aggregator(
        "edge",
        ["a", "b"],
        parent="cloud",
        mode="fedbuff",
        buffer_size=2,
        staleness=constant,
        report_every_updates=2,
    ) as run:
        cloud = run.peers["cloud"]
        m0 = W0
        await cloud.publish_model(m0)
        v1 = await run.model("a")
        await run.model("b")
        assert v1.header.version == 1
        assert_model(v1.arrays, m0, tol=1e-6)
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        await run.peers["b"].answer(v1, filled(W0, 3.0))
        # The buffer is full: x = m0 + 2; version 2; the report to the cloud is x - m0.
        v2 = await run.model("a")
        await run.model("b")
        assert_model(v2.arrays, shifted(m0, 2.0), tol=1e-6)
        _, report = await cloud.next_message()
        assert report.header.base_version == 1
        assert report.header.num_examples == 20
        assert_model(report.arrays, filled(W0, 2.0), tol=1e-6)
        # One update against v2 waits in the buffer...
        await run.peers["a"].answer(v2, filled(W0, 4.0))
        await until(lambda: run.report.updates_accepted >= 3)
        # ...when the cloud publishes a model that took the edge's report (and others').
        m1 = shifted(m0, 10.0)
        await cloud.publish_model(m1, participants="edge,other")
        v3 = await run.model("b")
        assert v3.header.version == 3
        assert v3.header.metrics["parent_version"] == 2
        assert_model(v3.arrays, m1, tol=1e-6)  # the reported +2 is in m1: not counted again
        # The second update fills the buffer: both go in (the first one was not lost).
        await run.peers["b"].answer(v3, filled(W0, 6.0))
        v4 = await run.model("b")
        assert_model(v4.arrays, shifted(m1, 5.0), tol=1e-6)
        _, second = await cloud.next_message()
        assert second.header.base_version == 2
        assert_model(second.arrays, filled(W0, 5.0), tol=1e-6)
        arrivals = [(a.sender, a.staleness) for a in run.report.arrivals]
        assert arrivals == [("a", 0), ("b", 0), ("a", 0), ("b", 0)]


async def test_a_report_the_synchronous_parent_missed_is_sent_again() -> None:
    async with running_aggregator(
        "edge",
        ["a"],
        parent="cloud",
        mode="fedbuff",
        buffer_size=1,
        staleness=StalenessFunction(function="constant"),
        report_every_updates=1,
    ) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0)
        v1 = await run.model("a")
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        _, first = await cloud.next_message()
        assert_model(first.arrays, filled(W0, 1.0), tol=1e-6)
        assert (await run.model("a")).header.version == 2
        # The parent closed its round without the edge's report.
        await cloud.publish_model(shifted(W0, 10.0), participants="other")
        v3 = await run.model("a")
        assert v3.header.version == 3
        assert_model(v3.arrays, shifted(W0, 11.0), tol=1e-6)  # our +1 is kept...
        _, again = await cloud.next_message()
        assert again.header.base_version == 2
        assert_model(
            again.arrays, filled(W0, 1.0), tol=1e-6
        )  # ...and reported against the new version


async def test_under_an_asynchronous_parent_every_report_moves_the_anchor() -> None:
    async with running_aggregator(
        "edge",
        ["a"],
        parent="cloud",
        mode="fedasync",
        mixing=1.0,
        staleness=StalenessFunction(function="constant"),
        report_every_updates=1,
    ) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0, **{"async": True})
        v1 = await run.model("a")
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        v2 = await run.model("a")
        await run.peers["a"].answer(v2, filled(W0, 2.0))
        _, first = await cloud.next_message()
        _, second = await cloud.next_message()
        assert [first.header.base_version, second.header.base_version] == [1, 1]
        assert_model(first.arrays, filled(W0, 1.0), tol=1e-6)
        assert_model(second.arrays, filled(W0, 2.0), tol=1e-6)  # only what is new since the first
        assert_model((await run.model("a")).arrays, shifted(W0, 3.0), tol=1e-6)
        # The parent took the first report only so far: the second is on its way.
        await cloud.publish_model(shifted(W0, 1.0), **{"async": True})
        v4 = await run.model("a")
        assert_model(v4.arrays, shifted(W0, 1.0), tol=1e-6)


async def test_a_synchronous_edge_under_an_asynchronous_parent_does_not_wait() -> None:
    async with running_aggregator("edge", ["a"], parent="cloud", rounds=1) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0, **{"async": True})
        v1 = await run.model("a")
        assert v1.header.metrics["async"] is False
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        _, first = await cloud.next_message()
        assert_model(first.arrays, filled(W0, 1.0), tol=1e-6)
        v2 = await run.model("a")  # the next cycle starts without a new parent model
        assert_model(v2.arrays, shifted(W0, 1.0), tol=1e-6)
        # The parent's next model (it took the first report) arrives mid-round: it waits for
        # the round's end.
        await cloud.publish_model(shifted(W0, 1.0), **{"async": True})
        await asyncio.sleep(0.05)
        assert run.peers["a"].pending() == []
        await run.peers["a"].answer(v2, filled(W0, 2.0))
        _, second = await cloud.next_message()
        assert second.header.base_version == 1
        assert_model(second.arrays, filled(W0, 2.0), tol=1e-6)
        v3 = await run.model("a")
        assert v3.header.metrics["parent_version"] == 2
        # Both reports are the parent's now: the +2 is on its way to it, not kept here.
        assert_model(v3.arrays, shifted(W0, 1.0), tol=1e-6)


async def test_reports_go_up_on_the_timer_when_the_count_is_not_reached() -> None:
    async with running_aggregator(
        "edge",
        ["a"],
        parent="cloud",
        mode="fedasync",
        mixing=1.0,
        staleness=StalenessFunction(function="constant"),
        report_every_updates=100,
        report_every_s=0.05,
    ) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0, **{"async": True})
        v1 = await run.model("a")
        await asyncio.sleep(0.12)  # periods with nothing folded send nothing
        assert cloud.pending() == []
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        _, report = await cloud.next_message()
        assert_model(report.arrays, filled(W0, 1.0), tol=1e-6)
        assert report.header.metrics["participants"] == 1


async def test_updates_past_the_staleness_bound_are_refused() -> None:
    async with running_aggregator(
        "root", ["a", "b"], mode="fedasync", max_staleness=2, rounds=100
    ) as run:
        v1 = await run.model("a")
        for _ in range(3):  # b moves the root three versions on
            latest = await run.model("b")
            await run.peers["b"].answer(latest, filled(W0, 0.1))
        await until(lambda: run.report.updates_accepted >= 3)
        await run.peers["a"].answer(v1, filled(W0, 1.0))  # 3 versions behind
        await run.peers["a"].send(delta_bytes("a", 9, filled(W0, 1.0)))  # from the future
        async with asyncio.timeout(WAIT):
            while sum(run.report.updates_rejected.values()) < 2:
                await asyncio.sleep(0.001)
        assert run.report.updates_rejected == {"too_stale": 1, "stale": 1}
        assert run.report.updates_accepted == 3
        assert not run.task.done()


async def test_the_asynchronous_root_stops_after_its_versions() -> None:
    async with running_aggregator(
        "root", ["a"], mode="fedbuff", buffer_size=1, rounds=3, eval_every=2
    ) as run:
        for _ in range(3):
            model = await run.model("a")
            await run.peers["a"].answer(model, filled(W0, 0.5))
        async with asyncio.timeout(WAIT):
            report = await run.task
        assert report.rounds == 3
        assert [e["version"] for e in report.evaluations] == [3, 4]


async def test_a_version_is_published_every_few_steps() -> None:
    """FedBuff (K=1) at an edge, publishing every 2 steps: the step in between changes the
    model, not the version, and an update against the published version is not stale."""
    async with running_aggregator(
        "edge",
        ["a", "b"],
        parent="cloud",
        mode="fedbuff",
        buffer_size=1,
        staleness=StalenessFunction(function="constant"),
        report_every_updates=100,
        publish_every_steps=2,
    ) as run:
        await run.peers["cloud"].publish_model(W0)
        v1 = await run.model("a")
        await run.model("b")
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        await until(lambda: run.report.updates_accepted >= 1)
        await run.settle()
        assert run.peers["a"].pending() == []  # one step: nothing published
        await run.peers["b"].answer(v1, filled(W0, 2.0))
        v2 = await run.model("a")
        assert v2.header.version == 2
        assert v2.header.metrics["updates"] == 2
        assert_model(v2.arrays, shifted(W0, 3.0), tol=1e-6)
        assert [a.staleness for a in run.report.arrivals] == [0, 0]
        assert run.report.rounds == 2


async def test_a_rebase_can_wait_for_the_next_step() -> None:
    """With publish_on_rebase off, the parent's new model goes down with the next step."""
    async with running_aggregator(
        "edge",
        ["a"],
        parent="cloud",
        mode="fedbuff",
        buffer_size=1,
        staleness=StalenessFunction(function="constant"),
        report_every_updates=1,
        publish_on_rebase=False,
    ) as run:
        cloud = run.peers["cloud"]
        await cloud.publish_model(W0)
        v1 = await run.model("a")  # the first model always goes down at once
        await run.peers["a"].answer(v1, filled(W0, 1.0))
        v2 = await run.model("a")
        _, report = await cloud.next_message()
        assert_model(report.arrays, filled(W0, 1.0), tol=1e-6)
        await cloud.publish_model(shifted(W0, 10.0), participants="edge")
        await run.settle()
        assert run.peers["a"].pending() == []  # rebased, not published
        await run.peers["a"].answer(v2, filled(W0, 2.0))
        v3 = await run.model("a")
        assert v3.header.version == 3
        assert v3.header.metrics["parent_version"] == 2
        assert_model(v3.arrays, shifted(W0, 12.0), tol=1e-6)


# --- duplicated deliveries ------------------------------------------------------------------

deliveries = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(-2, 2, allow_nan=False, width=32)),
    min_size=1,
    max_size=8,
)


async def final_model(
    mode: str, payloads: list[tuple[str, bytes]], duplicates: int
) -> dict[str, np.ndarray]:
    """The root's model once it has handled every payload, sent in order on one link."""
    async with running_aggregator(
        "root", ["a", "b", "c"], mode=mode, buffer_size=2, max_staleness=20, rounds=100
    ) as run:
        await run.model("a")
        sender = run.peers["a"]
        for child, payload in payloads:
            await sender.send(payload, as_child=child)
        async with asyncio.timeout(WAIT):
            while run.report.updates_accepted + sum(run.report.updates_rejected.values()) < len(
                payloads
            ):
                await asyncio.sleep(0.001)
        assert run.report.updates_accepted == len(payloads) - duplicates
        assert run.report.updates_rejected.get("duplicate", 0) == duplicates
        assert run.agg.model is not None
        return run.agg.model


@pytest.mark.parametrize("mode", ["fedasync", "fedbuff"])
@settings(max_examples=25, deadline=None)
@given(items=deliveries, copies=st.lists(st.integers(0, 3), min_size=8, max_size=8), data=st.data())
async def test_duplicated_deliveries_change_nothing(
    mode: str, items: list[tuple[str, float]], copies: list[int], data: st.DataObject
) -> None:
    """QoS 1 may deliver a message again, right away or later: any duplication gives the
    model that no duplication gives."""
    payloads = [
        (child, delta_bytes(child, 1, filled(W0, value), 10 + i))
        for i, (child, value) in enumerate(items)
    ]
    duplicated = list(payloads)
    for payload, extra in zip(payloads, copies, strict=False):
        for _ in range(extra):
            at = data.draw(st.integers(duplicated.index(payload) + 1, len(duplicated)))
            duplicated.insert(at, payload)
    once = await final_model(mode, payloads, 0)
    again = await final_model(mode, duplicated, len(duplicated) - len(payloads))
    for name in W0:
        np.testing.assert_array_equal(once[name], again[name])
