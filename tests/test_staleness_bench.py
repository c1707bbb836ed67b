"""The staleness benchmark: its rules (time to target, tuned baseline, targets), a tiny run."""

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import staleness_bench
from benchmarks.staleness_bench import best_sync, check_targets, reached_at, summarize
from tests.fakes import needs_mosquitto


@pytest.mark.parametrize(
    ("accuracies", "target", "stays_for", "expected"),
    [
        ([], 0.9, 3, None),
        ([0.5, 0.8, 0.85], 0.9, 3, None),  # never there
        ([0.9, 0.91, 0.92, 0.93], 0.9, 3, 0),  # at the target counts as reached
        ([0.95, 0.8, 0.91, 0.92, 0.93, 0.94], 0.9, 3, 2),  # touched and fell back: later
        ([0.5, 0.91, 0.92, 0.93], 0.9, 3, None),  # not 3 evaluations after it yet
        ([0.5, 0.91, 0.92, 0.93, 0.89, 0.95], 0.9, 3, None),  # fell back on the 3rd
        ([0.5, 0.91, 0.92], 0.9, 1, 1),
        ([0.5, 0.91], 0.9, 0, 1),  # the first evaluation at the target
    ],
)
def test_reached_at_needs_the_target_held(
    accuracies: list[float], target: float, stays_for: int, expected: int | None
) -> None:
    assert reached_at(accuracies, target, stays_for) == expected


def _record(mode: str, seed: int, seconds: float | None, sent: int | None, final: float) -> Any:
    return {
        "mode": mode,
        "seed": seed,
        "seconds_to_target": seconds,
        "bytes_to_target": sent,
        "final_accuracy": final,
        "bytes_total": 10_000_000,
        "accuracy_per_mb": final / 10,
        "startup_seconds": 1.0,
    }


def test_sync_best_is_the_fastest_sync_every_seed_of_which_reached() -> None:
    records = [
        # Fastest in the median, but a seed missed: not reliable.
        *(_record("sync-d0.5-f0.5", s, t, 1000, 0.95) for s, t in enumerate([1.0, None, 1.0])),
        *(_record("sync-d1-f0.5", s, t, 900, 0.95) for s, t in enumerate([6.0, 5.0, 9.0])),
        *(_record("sync-all", s, t, 800, 0.95) for s, t in enumerate([30.0, 20.0, 25.0])),
        # Faster still, not synchronous.
        *(_record("fedbuff", s, t, 800, 0.945) for s, t in enumerate([2.0, 2.0, 3.0])),
    ]
    summary = summarize(records)
    assert summary["sync-d1-f0.5"]["seconds_to_target"] == {"median": 6.0, "min": 5.0, "max": 9.0}
    assert summary["sync-d0.5-f0.5"]["seconds_to_target"]["reached"] == 2
    best = best_sync(summary)
    assert best == "sync-d1-f0.5"
    targets = check_targets(records, summary, best)
    speed = targets["fedbuff >= 2.5x faster to target than sync_best"]
    assert speed["met"]
    assert speed["measured"] == {"ratio": 3.0, "min": 2.5, "max": 3.0}
    sent = targets["fedbuff bytes to target <= sync_best's"]
    assert sent["met"]
    assert sent["measured"]["ratio"] == pytest.approx(800 / 900, abs=1e-3)
    accuracy = targets["fedbuff final accuracy within 1 point of sync_best"]
    assert accuracy == {"met": True, "measured_points": -0.5}
    overall = [v for k, v in targets.items() if k.startswith("issue 12 section 3")]
    assert overall == [{"met": True}]


def test_a_target_is_missed_when_async_misses_a_seed_or_sends_more() -> None:
    records = [
        *(_record("sync-all", s, 10.0, 1000, 0.95) for s in range(3)),
        *(_record("fedbuff", s, t, 2000, 0.93) for s, t in enumerate([1.0, None, 1.0])),
    ]
    summary = summarize(records)
    targets = check_targets(records, summary, best_sync(summary))
    assert not targets["fedbuff >= 2.5x faster to target than sync_best"]["met"]
    assert not targets["fedbuff bytes to target <= sync_best's"]["met"]
    assert targets["fedbuff final accuracy within 1 point of sync_best"] == {
        "met": False,
        "measured_points": -2.0,
    }
    assert not targets[next(k for k in targets if k.startswith("issue 12"))]["met"]


@pytest.mark.parametrize("metered", [True, False])
def test_a_record_counts_wire_bytes_or_else_payload(metered: bool) -> None:
    events = [
        {"accuracy": a, "wall": 100.0 + i, "tree_bytes": 10 * (i + 1)}
        | ({"link_bytes": {"cloud": 1000 * (i + 1)}} if metered else {})
        for i, a in enumerate([0.5, 0.91, 0.92, 0.93, 0.94])
    ]
    stats = {"count": 1, "mean": 0.0, "p95": 0.0, "max": 0, "weight_mean": 1.0}
    summary: dict[str, Any] = {
        "final_accuracy": 0.94,
        "total_bytes": 50,
        "bytes": {"edge": {"up": 20, "down": 30}},
        "global_rounds": 5,
        "staleness": {"edge": stats},
        "updates_accepted": 9,
        "updates_rejected": {},
        "wall_seconds": 6.0,
    }
    if metered:
        summary["links"] = {"cloud": {"up": 2000, "down": 3000, "cpu_seconds": 0.5}}
    r = staleness_bench.record("fedbuff", 0, 0, summary, events, 99.5, 98.0, 0.9)
    assert r["seconds_to_target"] == 1.5  # the second evaluation, held for 3 more
    assert r["evaluations_to_target"] == 2
    assert r["bytes_to_target"] == (2000 if metered else 20)
    assert r["bytes_total"] == (5000 if metered else 50)
    assert r["bytes_measured"] == ("wire" if metered else "payload")
    assert r["accuracy_per_mb"] == round(0.94 / (r["bytes_total"] / 1e6), 5)
    assert r["startup_seconds"] == 1.5


@needs_mosquitto
def test_staleness_bench_writes_records_sync_best_and_targets(tmp_path: Path) -> None:
    """One seed of three tiny 3-level federations (a 1-point sync grid, FedAsync, FedBuff)."""
    out = tmp_path / "staleness.json"
    argv = ["--edges", "2", "--workers-per-edge", "2", "--budget-s", "4", "--compute-s", "0.02"]
    argv += ["--target", "0.5", "--buffer-size", "2", "--report-every", "4", "--seeds", "1"]
    argv += ["--no-wait-all", "--deadlines", "0.5", "--min-fractions", "0.75"]
    assert staleness_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "staleness"
    assert result["budget_s"] == 4
    assert result["target_accuracy"] == 0.5
    records = result["records"]
    assert [r["mode"] for r in records] == ["sync-d0.5-f0.75", "fedasync", "fedbuff"]
    for r in records:
        assert r["seed"] == 0
        assert r["seconds_to_target"] is None or 0 < r["seconds_to_target"] <= 4 + 1
        assert 0 <= r["final_accuracy"] <= 1
        assert list(r["staleness"]) == ["cloud", "edge"]
        for level in r["staleness"].values():
            assert level["count"] > 0
            assert 0 <= level["mean"] <= level["max"]
            assert level["p95"] <= level["max"]
        assert set(r["payload_bytes"]) == {"cloud", "edge", "worker", "total"}
        assert r["payload_bytes"]["worker"]["up"] > 0
        # On the wire: at least what was published (the broker fans models out to many).
        assert r["bytes_total"] >= r["payload_bytes"]["total"] > 0
        assert r["accuracy_per_mb"] == pytest.approx(
            r["final_accuracy"] / (r["bytes_total"] / 1e6), rel=1e-3
        )
        if r["seconds_to_target"] is not None:
            assert 0 < r["bytes_to_target"] <= r["bytes_total"]
        assert len(r["curve"]["accuracy"]) == r["cloud_rounds"]
        assert r["startup_seconds"] >= 0
    # Synchronous rounds are never stale; the asynchronous edges take late updates.
    assert records[0]["staleness"]["edge"]["max"] == 0
    assert records[1]["staleness"]["edge"]["max"] > 0
    assert set(result["summary"]) == {"sync-d0.5-f0.75", "fedasync", "fedbuff"}
    best = result["sync_best"]
    if best is not None:  # the one sync run reached the target and held it
        assert best["mode"] == "sync-d0.5-f0.75"
        assert (best["deadline_s"], best["min_fraction"]) == (0.5, 0.75)
        assert best["seconds_to_target"] == records[0]["seconds_to_target"]
        assert best["bytes_total"] == records[0]["bytes_total"]
        assert best["final_accuracy"] == records[0]["final_accuracy"]
        assert all(isinstance(v["met"], bool) for v in result["targets"].values())
        assert "fedbuff >= 2.5x faster to target than sync_best" in result["targets"]
    else:
        assert result["targets"] == {}
    assert "| fedbuff |" in staleness_bench.render(result)
