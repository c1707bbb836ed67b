"""FederationView: status and metrics messages folded into the dashboard's state."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from hfl_mqtt.monitor.view import MAX_REJECTIONS, FederationView


def record(node: str, t: float, **fields: Any) -> bytes:
    base: dict[str, Any] = {"node": node, "role": "worker", "level": 2, "parent": "edge-0"}
    base.update(fields)
    base["t"] = t
    return json.dumps(base).encode()


def metrics(node: str, fed: str = "demo") -> str:
    return f"hfl/{fed}/{node}/metrics"


def status(node: str, fed: str = "demo") -> str:
    return f"hfl/{fed}/{node}/status"


def node_of(snapshot: dict[str, Any], node: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [n for n in snapshot["nodes"] if n["id"] == node]
    assert len(found) == 1
    return found[0]


def tree() -> FederationView:
    """cloud <- edge-0 <- w0, w1, each with one record at t=100."""
    view = FederationView()
    view.observe(metrics("cloud"), record("cloud", 100, role="root", level=0, parent=None), 100)
    view.observe(metrics("edge-0"), record("edge-0", 100, role="aggregator", level=1), 100)
    for worker in ("w1", "w0"):
        view.observe(metrics(worker), record(worker, 100, version=3), 100)
    return view


def test_nodes_sorted_by_level_then_id_with_their_fields() -> None:
    snap = tree().snapshot(101.5)
    assert [n["id"] for n in snap["nodes"]] == ["cloud", "edge-0", "w0", "w1"]
    w0 = node_of(snap, "w0")
    assert (w0["role"], w0["level"], w0["parent"], w0["version"]) == ("worker", 2, "edge-0", 3)
    assert w0["age_s"] == pytest.approx(1.5)
    assert snap["federation"] == "demo"
    assert snap["t"] == 101.5
    assert snap["totals"]["nodes"] == 4
    assert snap["totals"]["lag_s"] == pytest.approx(1.5)  # the newest record is from t=100
    json.dumps(snap, allow_nan=False)  # JSON as it is


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "unknown"),
        ([("metrics", {"status": "online"})], "online"),
        ([("metrics", {"status": "idle"})], "idle"),
        ([("status", {"state": "online"})], "online"),
        ([("status", {"state": "offline"})], "offline"),
        # a retained last record (it said online) after the Last Will: still offline
        ([("status", {"state": "offline"}), ("metrics", {"status": "online"})], "offline"),
        ([("metrics", {"status": "online"}), ("status", {"state": "offline"})], "offline"),
        # back: it announces itself online again
        ([("status", {"state": "offline"}), ("status", {"state": "online"})], "online"),
        ([("status", {"state": "online"}), ("metrics", {"status": "idle"})], "idle"),
    ],
)
def test_status(messages: list[tuple[str, dict[str, Any]]], expected: str) -> None:
    view = FederationView("demo")
    view.observe(metrics("w0"), record("w0", 10), 10)
    for i, (kind, fields) in enumerate(messages):
        if kind == "metrics":
            view.observe(metrics("w0"), record("w0", 11 + i, **fields), 11 + i)
        else:
            view.observe(status("w0"), json.dumps(fields).encode(), 11 + i)
    snap = view.snapshot(20)
    assert node_of(snap, "w0")["status"] == expected
    assert snap["totals"]["online"] == (1 if expected in ("online", "idle") else 0)


def test_status_only_node_is_listed_with_its_parent() -> None:
    view = FederationView()
    assert view.observe(status("w9"), b'{"state": "online", "parent": "edge-1"}', 5)
    node = node_of(view.snapshot(6), "w9")
    assert (node["status"], node["parent"], node["level"], node["age_s"]) == (
        "online",
        "edge-1",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("first", "second", "now", "rate_out", "rate_in"),
    [
        # 1000 bytes more out, 200 more in, over 2 s
        ((100, [1, 1000, 1, 500]), (102, [2, 3000, 2, 900]), 102.5, 1000.0, 200.0),
        # the next record is late: the same bytes spread up to now (2 s spacing + 1 s grace)
        ((100, [1, 1000, 1, 500]), (102, [2, 3000, 2, 900]), 110.0, 2000 / 7, 400 / 7),
        # counters went down: the node restarted, no rate until its next record
        ((100, [1, 5000, 1, 500]), (102, [1, 100, 1, 10]), 102.5, 0.0, 0.0),
        # same instant
        ((100, [1, 1000, 1, 500]), (100, [2, 3000, 2, 900]), 100.5, 0.0, 0.0),
    ],
)
def test_rates_from_consecutive_records(
    first: tuple[float, list[int]],
    second: tuple[float, list[int]],
    now: float,
    rate_out: float,
    rate_in: float,
) -> None:
    view = FederationView()
    for t, row in (first, second):
        view.observe(metrics("w0"), record("w0", t, traffic={"up": row}), t)
    node = node_of(view.snapshot(now), "w0")
    assert node["rate_out"] == pytest.approx(rate_out, abs=0.1)
    assert node["rate_in"] == pytest.approx(rate_in, abs=0.1)
    assert node["bytes_out"] == second[1][1]


def test_totals_over_kinds_and_nodes_and_offline_has_no_rate() -> None:
    view = FederationView()
    traffic1 = {"model": [1, 100, 0, 0], "up": [1, 10, 2, 20]}
    traffic2 = {"model": [2, 300, 0, 0], "up": [2, 30, 4, 40]}
    view.observe(metrics("edge-0"), record("edge-0", 1, traffic=traffic1), 1)
    view.observe(metrics("edge-0"), record("edge-0", 2, traffic=traffic2), 2)
    view.observe(metrics("w0"), record("w0", 2, traffic={"up": [1, 7, 0, 0]}), 2)
    snap = view.snapshot(2.5)
    edge = node_of(snap, "edge-0")
    assert (edge["bytes_out"], edge["bytes_in"], edge["rate_out"]) == (330, 40, 220.0)
    assert snap["totals"]["bytes_out"] == 337
    assert snap["totals"]["rate_out"] == 220.0
    view.observe(status("edge-0"), b'{"state": "offline"}', 3)
    assert node_of(view.snapshot(3), "edge-0")["rate_out"] == 0.0


def test_staleness_merged_per_receiving_level() -> None:
    view = FederationView()
    a = {"n": 4, "mean": 0.5, "p50": 0, "p95": 2, "max": 2, "hist": [3, 0, 1]}
    b = {"n": 6, "mean": 1.0, "p50": 1, "p95": 3, "max": 3, "hist": [1, 3, 1, 1]}
    top = {"n": 2, "mean": 0.0, "p50": 0, "p95": 0, "max": 0, "hist": [2]}
    view.observe(metrics("e0"), record("e0", 1, level=1, role="aggregator", staleness=a), 1)
    view.observe(metrics("e1"), record("e1", 1, level=1, role="aggregator", staleness=b), 1)
    root = record("cloud", 1, level=0, role="root", parent=None, staleness=top)
    view.observe(metrics("cloud"), root, 1)
    view.observe(metrics("w0"), record("w0", 1), 1)  # workers have none
    staleness = view.snapshot(2)["staleness"]
    assert staleness["0"] == top
    assert staleness["1"] == {
        "n": 10,
        "mean": pytest.approx(0.8),
        "p50": 1,  # 4 of 10 at 0, 7 of 10 at <= 1
        "p95": 3,
        "max": 3,
        "hist": [4, 3, 2, 1],
    }
    assert set(staleness) == {"0", "1"}


def test_rejections_from_counter_increments_newest_first() -> None:
    view = FederationView()
    view.observe(metrics("e0"), record("e0", 1, rejected={"stale": 2}, last_error="stale: v3"), 1)
    view.observe(metrics("e0"), record("e0", 2, rejected={"stale": 2}), 2)  # no increment
    view.observe(
        metrics("e0"),
        record("e0", 3, rejected={"stale": 5, "wrong_shape": 1}, last_error="wrong_shape: w3"),
        3,
    )
    rejections = view.snapshot(4)["rejections"]
    assert [(r["t"], r["node"], r["reason"], r["count"], r["detail"]) for r in rejections] == [
        (3, "e0", "wrong_shape", 1, "wrong_shape: w3"),
        (3, "e0", "stale", 3, "wrong_shape: w3"),
        (1, "e0", "stale", 2, "stale: v3"),
    ]
    assert node_of(view.snapshot(4), "e0")["rejected"] == {"stale": 5, "wrong_shape": 1}


def test_rejections_are_bounded() -> None:
    view = FederationView()
    for i in range(1, 200):
        view.observe(metrics("e0"), record("e0", i, rejected={"stale": i}), i)
    rejections = view.snapshot(200)["rejections"]
    assert len(rejections) == MAX_REJECTIONS
    assert rejections[0]["t"] == 199


def test_accuracy_points_carry_the_bytes_of_their_time() -> None:
    view = FederationView()
    # the root started at wall 1000; bytes grow by 1000 a second
    for second in range(11):
        t = 1000.0 + second
        view.observe(metrics("w0"), record("w0", t, traffic={"up": [1, 1000 * second, 0, 0]}), t)
    evaluations = [[2.0, 1, 0.5, 1.2], [6.0, 2, 0.8, 0.6]]
    root = record(
        "cloud", 1010.0, role="root", level=0, parent=None, uptime_s=10.0, accuracy=evaluations
    )
    view.observe(metrics("cloud"), root, 1010.0)
    points = view.snapshot(1011)["accuracy"]
    assert [(p["t"], p["version"], p["accuracy"], p["loss"]) for p in points] == [
        (2.0, 1, 0.5, 1.2),
        (6.0, 2, 0.8, 0.6),
    ]
    assert [p["bytes"] for p in points] == [2000, 6000]
    # the next record adds one evaluation; the earlier points stay
    evaluations.append([10.0, 3, 0.9, 0.4])
    root = record(
        "cloud", 1010.5, role="root", level=0, parent=None, uptime_s=10.5, accuracy=evaluations
    )
    view.observe(metrics("cloud"), root, 1010.5)
    points = view.snapshot(1011)["accuracy"]
    assert [p["version"] for p in points] == [1, 2, 3]
    assert points[2]["bytes"] == 10000


def test_accuracy_without_bytes_long_before_the_monitor_started() -> None:
    view = FederationView()
    root = record(
        "cloud", 5000.0, role="root", level=0, parent=None, uptime_s=4000.0,
        accuracy=[[10.0, 1, 0.3, 2.0]],
    )  # fmt: skip
    view.observe(metrics("cloud"), root, 5000.0)
    assert view.snapshot(5001)["accuracy"][0]["bytes"] is None


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("hfl/demo/w0/model", b"\x00binary"),
        ("hfl/demo/w0/up/x", b"{}"),
        ("hfl/demo/w0/status/extra", b"{}"),
        ("other/demo/w0/status", b'{"state": "online"}'),
        ("hfl/other/w0/status", b'{"state": "online"}'),  # another federation
        ("hfl/demo/w0/metrics", b""),  # a cleared retained topic
    ],
)
def test_ignores_what_is_not_ours(topic: str, payload: bytes) -> None:
    view = FederationView("demo")
    assert not view.observe(topic, payload, 1)
    assert view.snapshot(1)["nodes"] == []


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_malformed_is_logged_and_skipped(payload: bytes) -> None:
    view = FederationView("demo")
    with capture_logs() as logs:
        assert not view.observe(metrics("w0"), payload, 1)
    assert logs[0]["event"] == "malformed message ignored"
    assert view.snapshot(1)["nodes"] == []


def test_fields_of_the_wrong_type_are_not_trusted() -> None:
    view = FederationView()
    hostile = record(
        "w0", 1, version="12", accepted=None, rejected={"stale": "x", "ok": 1},
        traffic={"up": [1, "2", 3, 4], "model": [1, 2, 3, 4], "x": "y"}, rss=float("nan"),
    )  # fmt: skip
    assert view.observe(metrics("w0"), hostile, 1)
    node = node_of(view.snapshot(2), "w0")
    assert node["version"] is None
    assert node["accepted"] == 0
    assert node["rejected"] == {"ok": 1}
    assert node["traffic"] == {"model": [1, 2, 3, 4]}
    assert node["rss"] is None


def test_first_federation_seen_is_taken() -> None:
    view = FederationView()
    assert view.observe(metrics("w0", "a"), record("w0", 1), 1)
    assert not view.observe(metrics("w0", "b"), record("w0", 1), 1)
    assert view.federation == "a"


def test_older_record_does_not_replace_a_newer_one() -> None:
    view = FederationView()
    view.observe(metrics("w0"), record("w0", 10, version=5), 10)
    assert not view.observe(metrics("w0"), record("w0", 9, version=4), 11)
    assert node_of(view.snapshot(11), "w0")["version"] == 5


def test_keeps_up_with_a_thousand_workers() -> None:
    """1,000 workers, a record each per second: observe well under 1 ms, snapshot fast enough
    for two a second (generous bounds: the machine is shared)."""
    view = FederationView()
    staleness = {"n": 40, "mean": 0.4, "p50": 0, "p95": 2, "max": 3, "hist": [30, 8, 2]}
    for edge in range(10):
        view.observe(
            metrics(f"edge-{edge}"),
            record(f"edge-{edge}", 0, role="aggregator", level=1, staleness=staleness),
            0,
        )
    payloads = []
    for second in range(1, 4):
        for worker in range(1000):
            traffic = {"model": [second, 0, second, 80_000 * second], "up": [second, 20_000, 0, 0]}
            payload = record(
                f"w{worker}", second, parent=f"edge-{worker % 10}", version=second,
                round=second, accepted=0, traffic=traffic, rss=120_000_000, cpu_s=1.5,
                uptime_s=float(second), trained=second, rejected={"stale": second},
            )  # fmt: skip
            payloads.append((metrics(f"w{worker}"), payload, float(second)))
    start = time.perf_counter()
    for topic, payload, now in payloads:
        view.observe(topic, payload, now)
    per_observe = (time.perf_counter() - start) / len(payloads)
    start = time.perf_counter()
    snap = view.snapshot(3.5)
    per_snapshot = time.perf_counter() - start
    assert len(snap["nodes"]) == 1010
    assert per_observe < 0.5e-3, per_observe
    assert per_snapshot < 0.1, per_snapshot


def test_a_worker_its_parent_says_is_down_shows_offline_unless_its_own_status_speaks() -> None:
    """Behind a site broker a worker's status never reaches the root's broker; its parent's
    record says when it is down."""
    view = tree()
    down = record("edge-0", 101, role="aggregator", level=1, parent="cloud", children_down=["w0"])
    assert view.observe(metrics("edge-0"), down, 101)
    snap = view.snapshot(101.5)
    assert node_of(snap, "w0")["status"] == "offline"
    assert node_of(snap, "w1")["status"] != "offline"
    view.observe(status("w0"), b'{"state": "online"}', 102)  # the node's own word wins
    assert node_of(view.snapshot(102), "w0")["status"] == "online"
    up = record("edge-0", 103, role="aggregator", level=1, parent="cloud")
    view.observe(metrics("edge-0"), up, 103)
    assert node_of(view.snapshot(103), "w1")["status"] != "offline"


def test_accuracy_points_take_the_trees_bytes_from_the_root_and_keep_what_scrolled_off() -> None:
    """The root's record carries its latest evaluations with the bytes its tree had carried (a
    late monitor plots them right); one watching from the start keeps every point."""
    view = FederationView()

    def root(t: float, evaluations: list[list[Any]]) -> None:
        payload = record("cloud", t, role="root", level=0, parent=None, uptime_s=t - 1000)
        view.observe(
            metrics("cloud"),
            payload[:-1] + b', "accuracy": %s}' % json.dumps(evaluations).encode(),
            t,
        )

    root(1002, [[1.0, 1, 0.5, 1.0, 100], [2.0, 2, 0.6, 0.9, 200]])
    root(1003, [[2.0, 2, 0.6, 0.9, 200], [3.0, 3, 0.7, 0.8, 300]])  # the first scrolled off
    points = view.snapshot(1004)["accuracy"]
    assert [(p["version"], p["bytes"]) for p in points] == [(1, 100), (2, 200), (3, 300)]
    root(1004, [[0.5, 1, 0.4, 1.2, 50]])  # the root started over: its history again
    assert [p["version"] for p in view.snapshot(1005)["accuracy"]] == [1]


def test_nodes_sort_as_people_read_them() -> None:
    view = FederationView()
    for worker in ("worker-10", "worker-9", "worker-1", "worker-2b", "worker-2a"):
        view.observe(metrics(worker), record(worker, 100), 100)
    ids = [n["id"] for n in view.snapshot(100)["nodes"]]
    assert ids == ["worker-1", "worker-2a", "worker-2b", "worker-9", "worker-10"]
