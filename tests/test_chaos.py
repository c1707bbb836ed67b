"""The chaos benchmark's scenarios (a)-(e), small and fast, on real Mosquitto and real processes.

Each test runs one scenario of ``benchmarks/chaos_bench.py`` without its clean run, for one seed:
a cloud, two edges of two workers, the workers two to a process, eight short global rounds, the
failure after the second, every aggregator waiting for all its children. What is checked is what
must hold however loaded the machine is: the run finishes, no update is lost, no process crashes
but the killed, and the failure was really injected. Timings are recorded, not asserted. The
whole benchmark (``make bench-chaos``) is not run here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import chaos_bench
from tests.fakes import needs_mosquitto

pytestmark = needs_mosquitto

FAST = [
    *("--edges", "2", "--workers-per-edge", "2", "--workers-per-process", "2"),
    # 12 rounds, the fault after round 2: it lands well before the end, whatever the machine's
    # speed (at 8, a fast run once ended while the broker was down, before it came back).
    *("--rounds", "12", "--epochs", "5", "--learning-rate", "0.05", "--fault-after", "2"),
    *("--outage-s", "1", "--edge-deadline-s", "20", "--cloud-deadline-s", "40"),
    # Every aggregator waits for all its children, so a run cannot end before the killed part
    # is back and taken in again (and a slow machine cannot make a round close without it).
    *("--edge-min-fraction", "1", "--cloud-min-fraction", "1"),
    *("--run-timeout-s", "120", "--no-clean", "--seeds", "0"),
]


def run_scenario(tmp_path: Path, scenario: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "chaos.json"
    argv = [*FAST, *extra, "--scenarios", scenario, "--workdir", str(tmp_path / "runs")]
    chaos_bench.main([*argv, "--json", str(out)])  # its exit code is the timing targets too
    rounds = int(chaos_bench.parse_args(argv).rounds)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "chaos"
    assert (tmp_path / f"chaos-{scenario}.png").stat().st_size > 0
    (record,) = result["records"]
    assert record["scenario"] == scenario
    assert record["finished"], record
    assert record["global_rounds"] == rounds
    assert record["nodes_crashed"] == []
    assert record["updates_lost"] == 0, record["lost_ids"]
    assert record["updates_accepted"] <= record["updates_sent"]
    assert record["updates_sent"] >= rounds * 2  # at least the edges' reports
    assert record["final_accuracy"] is not None
    assert record["clean_final_accuracy"] is None
    assert set(record["targets"]) == {
        "0 updates lost",
        chaos_bench.STALL_TARGET,
        "no node crashes but the killed",
    }
    return record


def whats(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["what"], e["target"]) for e in record["events"]]


@pytest.mark.parametrize("scenario", ["broker_persistence", "broker_no_persistence"])
def test_broker_killed_and_restarted(tmp_path: Path, scenario: str) -> None:
    record = run_scenario(tmp_path, scenario)
    assert whats(record) == [("kill", "broker"), ("back", "broker")]
    assert record["stall_after_return_s"] is not None


def test_worker_processes_killed_and_restarted(tmp_path: Path) -> None:
    # Workers killed in a round of 0.1 s may be killed up to 7 rounds later (the fault's delays
    # count in rounds of at least 0.2 s): enough rounds that the run is still on.
    record = run_scenario(tmp_path, "workers", "--rounds", "16")
    kills = [target for what, target in whats(record) if what == "kill"]
    assert len(kills) == 1  # 30 % of 4 workers, rounded up: 2, one process
    assert ("back", kills[0]) in whats(record)


def test_edge_killed_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    record = run_scenario(tmp_path, "edge")
    assert whats(record)[0] == ("kill", "edge-0")
    assert ("back", "edge-0") in whats(record)
    # Its workers moved to their fallback (edge-1) on its Last Will, and came back.
    moves = {(m["what"], m["target"]) for m in record["moves"]}
    assert moves >= {("rehome", "worker-0 -> edge-1"), ("rehome", "worker-1 -> edge-1")}
    assert record["rehomed_t"] is not None
    logs = (tmp_path / "runs" / "seed0" / "edge" / "logs" / "edge-0.2.log").read_text()
    assert "resuming from the checkpoint" in logs


def test_cloud_killed_resumes_at_the_same_version(tmp_path: Path) -> None:
    record = run_scenario(tmp_path, "cloud")
    assert ("back", "cloud") in whats(record)
    logs = (tmp_path / "runs" / "seed0" / "cloud" / "logs" / "cloud.2.log").read_text()
    resumed = [json.loads(line) for line in logs.splitlines() if "resuming from" in line]
    assert resumed
    assert resumed[0]["same_version"] is True
    # Global rounds go on from where the killed cloud was: none is skipped.
    rounds = int(chaos_bench.parse_args(FAST).rounds)
    assert sorted({r for _, r, _ in record["curve"]}) == list(range(1, rounds + 1))


def test_hostile_payloads_on_every_topic_kind_are_refused(tmp_path: Path) -> None:
    # Every round waits for every child: an injected message that made a node drop or refuse
    # a real update would stall the run into the test's timeout. Longer rounds: the run
    # outlasts the three bursts (a round apart, of 32 mosquitto_pub processes each).
    record = run_scenario(tmp_path, "injection", "--epochs", "20")
    kinds = {key.split(":")[0] for key in record["injected"]}
    payloads = {key.split(":")[1] for key in record["injected"]}
    assert kinds == {"model", "up", "status", "ctl"}
    assert payloads == {"garbage", "oversized", "replayed", "spoofed"}
    assert sum(record["rejected"].values()) > 0
