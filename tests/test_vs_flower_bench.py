"""benchmarks/vs_flower.py: the time-to-target rule, and every system end to end on a tiny task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.vs_flower import reached_at
from tests.fakes import needs_mosquitto


@pytest.mark.parametrize(
    ("accuracies", "target", "expected"),
    [
        ([], 0.9, None),
        ([0.95, 0.95, 0.95], 0.9, None),  # reached, but the run ends before it has stayed
        ([0.95, 0.95, 0.95, 0.95], 0.9, 0),  # reached and stayed for the next 3
        ([0.90, 0.90, 0.90, 0.90], 0.9, 0),  # at the target counts
        ([0.5, 0.91, 0.8, 0.92, 0.93, 0.94, 0.95], 0.9, 3),  # the first touch fell back
        ([0.91, 0.92, 0.93, 0.89, 0.95, 0.95, 0.95, 0.95], 0.9, 4),  # fell back at the 4th
        ([0.5, 0.6, 0.7, 0.8], 0.9, None),  # never reached
        ([0.5, 0.95, 0.95, 0.95, 0.95, 0.5], 0.9, 1),  # what comes after the 3 is not asked
    ],
)
def test_time_to_target_is_the_first_evaluation_that_stays(
    accuracies: list[float], target: float, expected: int | None
) -> None:
    assert reached_at(accuracies, target) == expected


def test_time_to_target_waits_as_many_evaluations_as_asked() -> None:
    assert reached_at([0.95, 0.95], 0.9, stays_for=1) == 0
    assert reached_at([0.95, 0.95], 0.9, stays_for=2) is None


@needs_mosquitto
def test_vs_flower_writes_one_record_per_system(tmp_path: Path) -> None:
    """Flat and hierarchical Flower, flat and hierarchical hfl-mqtt (two codec sets) on a tiny
    softmax task: the schema, every link metered, the clocks, the summary and the targets."""
    pytest.importorskip("flwr")
    from benchmarks import vs_flower

    out = tmp_path / "vs_flower.json"
    argv = ["--model", "softmax", "--workers", "4", "--edges", "2", "--rounds", "8"]
    argv += ["--target", "0.3", "0.5", "--seeds", "1", "--processes", "1"]
    argv += ["--tree-codecs", "float32", "q8", "--json", str(out)]
    assert vs_flower.main(argv) == 0
    result = json.loads(out.read_text())
    records = result["records"]
    systems = ["flower", "flower-tree", "hfl-flat", "hfl-tree:float32", "hfl-tree:q8"]
    assert [r["system"] for r in records] == systems
    for r in records:
        assert {
            "system",
            "seed",
            "all_links_bytes_to_target",
            "cloud_link_bytes",
            "seconds_to_target",
            "final_accuracy",
            "bytes_per_device_per_round",
            "all_links_bytes_run",
            "startup_seconds",
            "meter_cpu_seconds",
        } <= set(r)
        assert set(r["by_target"]) == {"0.3", "0.5"}
        assert r["headline_target"] == 0.5
        assert 0.3 <= r["final_accuracy"] <= 1
        reached = r["by_target"]["0.3"]
        assert reached["seconds"] is not None
        assert reached["seconds"] >= 0  # the clock starts before the first evaluation
        assert 0 < reached["cloud_link_bytes"] <= reached["all_links_bytes"]
        assert reached["all_links_bytes"] <= r["all_links_bytes_run"]
        assert r["cloud_link_bytes_run"] <= r["all_links_bytes_run"]
        assert r["startup_seconds"] > 0
        assert r["bytes_per_device_per_round"] > 0
        assert r["local_runs_per_client"] == 8
        if r["meter_cpu_seconds"] is not None:  # Linux
            assert 0 < r["meter_cpu_seconds"] < r["cpu_seconds"]
    by_system = {r["system"]: r for r in records}
    # The flat systems' cloud link is every link; the trees' worker links are apart from it.
    for flat in ("flower", "hfl-flat"):
        assert by_system[flat]["cloud_link_bytes_run"] == by_system[flat]["all_links_bytes_run"]
    for tree in ("flower-tree", "hfl-tree:float32", "hfl-tree:q8"):
        r = by_system[tree]
        assert r["cloud_link_bytes_run"] < r["all_links_bytes_run"]
        assert r["evaluations"] == 4  # tau 2
    assert set(result["summary"]) == set(systems)
    assert set(result["summary"]["flower"]["final_accuracy"]) == {"median", "min", "max"}
    assert any(c["to"] == "hfl-tree:q8" for c in result["contributions"])
    targets = result["targets"]
    assert all(isinstance(v["met"], bool) for v in targets.values())
    assert any(name.startswith("final accuracy of hfl-tree:q8") for name in targets)
