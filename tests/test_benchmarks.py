"""The benchmark scripts run end to end on tiny models (their numbers are not checked here)."""

import json
from pathlib import Path

from benchmarks import aggregator_bench, codec_bench
from tests.fakes import needs_mosquitto


def test_codec_bench_writes_one_record_per_model_and_spec(tmp_path: Path) -> None:
    out = tmp_path / "codec.json"
    assert (
        codec_bench.main(
            [
                "--params",
                "20000",
                "--specs",
                "npy",
                "q4",
                "--repeats",
                "1",
                "--all-cores",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    records = json.loads(out.read_text())["records"]
    ours = [r for r in records if not r["spec"].startswith("flwr")]
    assert [r["spec"] for r in ours] == ["npy", "npy+zstd", "q4", "q4+zstd"]
    for r in ours:
        assert {
            "spec",
            "params",
            "bytes",
            "ratio_vs_npy",
            "encode_mb_s",
            "decode_mb_s",
            "rel_error",
        } <= set(r)
        assert min(r["bytes"], r["encode_mb_s"], r["decode_mb_s"]) > 0
    assert ours[0]["rel_error"] == 0.0
    assert ours[2]["ratio_vs_npy"] > 6


@needs_mosquitto
def test_aggregator_bench_runs_a_real_edge_and_both_transports(tmp_path: Path) -> None:
    out = tmp_path / "aggregator.json"
    argv = ["--params", "3000", "--children", "3", "--rounds", "2", "--agg-repeats", "1"]
    argv += ["--transport-size", "65536", "--transport-count", "4", "--repeats", "1"]
    assert aggregator_bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    agg = result["aggregator"]
    assert agg["accepted"] == agg["expected"] == 6
    assert agg["rejected"] == {}
    assert agg["rounds_closed"] == 2
    for key in ("updates_per_s", "transport_mb_s", "bare_aiomqtt_mb_s", "transport_ratio"):
        assert result[key] > 0
    assert set(agg["ms_per_update"]) >= {"decode_and_check", "aggregate_fedavg"}
    assert result["machine"]["cpu_count"] >= 1


@needs_mosquitto
def test_recovery_bench_crashes_the_broker_once_per_setting(tmp_path: Path) -> None:
    """One tiny run with persistence and one without: the schema, and nothing lost."""
    from benchmarks import recovery_bench

    out = tmp_path / "recovery.json"
    # The crash comes after round 1 of 4: with one round left after it (round 2 of 3), a loaded
    # machine could finish the run before the kill landed, and nothing would be left to recover.
    argv = ["--repeats", "1", "--edges", "1", "--workers-per-edge", "2", "--rounds", "4"]
    argv += ["--crash-after", "1", "--epochs", "10", "--outage-s", "0.5", "--json", str(out)]
    recovery_bench.main(argv)  # its exit code says whether the targets were met: not checked
    result = json.loads(out.read_text())
    assert result["benchmark"] == "recovery"
    assert [r["persistence"] for r in result["records"]] == [True, False]
    for record in result["records"]:
        assert record["lost"] == 0
        assert record["recovery_s"] is not None
        assert record["recovery_s"] > 0
        assert record["global_rounds"] == 4
    assert set(result["targets"]) >= {"no update lost", "no round waits for its deadline"}


@needs_mosquitto
def test_metrics_cost_bench_measures_the_records_three_ways(tmp_path: Path) -> None:
    from benchmarks import metrics_cost_bench

    out = tmp_path / "metrics_cost.json"
    # The demo lasts about 2 s: at 1 s against the workers' 5 s the two runs publish about as
    # many records (23 to 26 each, measured), so "on" publishes every 0.1 s to differ for sure.
    metrics_cost_bench.main(["--interval", "0.1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["benchmark"] == "metrics_cost"
    assert result["metrics_default"]["metrics_bytes"] > 0
    assert result["metrics_on"]["metrics_records"] > result["metrics_default"]["metrics_records"]
    assert result["metrics_off"]["metrics_bytes"] == 0
    assert all(state in ("met", "missed") for state in result["targets"].values())


@needs_mosquitto
def test_monitor_bench_reads_both_dashboards(tmp_path: Path) -> None:
    from benchmarks import monitor_bench

    out = tmp_path / "monitor.json"
    argv = ["--edges", "2", "--workers-per-edge", "5", "--rounds", "3", "--no-compare-off"]
    monitor_bench.main([*argv, "--json", str(out)])  # exit code: the targets, not checked here
    result = json.loads(out.read_text())
    assert result["benchmark"] == "monitor_keep_up"
    for name in ("sim", "monitor"):
        stream = result["results"][name]["dashboard"]
        assert stream["nodes_seen"] == 13
        assert stream["events"] > 0
    assert len(result["targets"]) == 8


@needs_mosquitto
def test_scale_bench_reports_each_size(tmp_path: Path) -> None:
    from benchmarks import scale_bench

    out = tmp_path / "scale.json"
    argv = ["--sizes", "20,40", "--workers-per-edge", "20", "--rounds", "3", "--json", str(out)]
    scale_bench.main(argv)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "scale"
    assert [r["workers"] for r in result["records"]] == [20, 40]
    for record in result["records"]:
        assert record["rounds"] == 3
        assert record["tracebacks"] == 0
        assert record["rss_mb_per_worker"] > 0
        assert len(record["losses"]) == 3
    assert len(result["targets"]) == 6


@needs_mosquitto
def test_dp_bench_calibrates_noise_to_each_budget(tmp_path: Path) -> None:
    from benchmarks import dp_bench

    out, png = tmp_path / "dp.json", tmp_path / "dp.png"
    argv = ["--edges", "2", "--workers-per-edge", "2", "--rounds", "3", "--seeds", "1"]
    argv += ["--epsilons", "8", "--json", str(out), "--plot", str(png)]
    assert dp_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "dp"
    assert [(r["kind"], r["epsilon_target"]) for r in result["records"]] == [
        ("none", None),
        ("central", 8.0),
        ("local", 8.0),
    ]
    for record in result["records"][1:]:
        assert record["epsilon_reported"] <= 8.0 * 1.001
        assert record["releases"] == 3
        assert record["noise_multiplier"] > 0
    assert result["targets"]["every run's reported epsilon within its target"]["met"]
    assert png.stat().st_size > 0
    assert dp_bench.render(result).count("\n") == 5


@needs_mosquitto
def test_robust_bench_runs_each_rule_under_each_attack(tmp_path: Path) -> None:
    from benchmarks import robust_bench

    out = tmp_path / "robust.json"
    argv = ["--edges", "2", "--workers-per-edge", "5", "--rounds", "2", "--seeds", "1"]
    argv += ["--attacks", "flip4", "--rules", "fedavg", "median", "--json", str(out)]
    assert robust_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["attack"], r["rule"]) for r in result["records"]] == [
        ("clean", "fedavg"),
        ("flip4", "fedavg"),
        ("flip4", "median"),
    ]
    assert set(result["targets"]) == {
        "flip4: fedavg dragged more than 2 points below clean",
        "flip4: median within 2 points of clean",
    }
    assert "| flip4 |" in robust_bench.render(result)


@needs_mosquitto
def test_participation_bench_runs_each_policy_on_the_straggler_setting(tmp_path: Path) -> None:
    from benchmarks import participation_bench

    out = tmp_path / "participation.json"
    argv = ["--edges", "2", "--workers-per-edge", "4", "--budget-s", "4", "--seeds", "1"]
    argv += ["--target", "0.5", "--policies", "all", "deadline", "random", "--json", str(out)]
    assert participation_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "participation"
    assert [r["mode"] for r in result["records"]] == ["all", "deadline", "random"]
    by_policy = {r["mode"]: r for r in result["records"]}
    assert by_policy["all"]["skipped"] == 0
    assert by_policy["random"]["skipped"] > 0  # half the workers left out a round
    assert set(result["versus_all"]) == {"deadline", "random"}
    assert "no worker starved: every one trained in every run" in result["targets"]
    assert "| deadline |" in participation_bench.render(result)


@needs_mosquitto
def test_tau_bench_compares_auto_with_fixed_rounds_on_both_trees(tmp_path: Path) -> None:
    from benchmarks import tau_bench

    out = tmp_path / "tau.json"
    argv = ["--seeds", "1", "--deadline-s", "3", "--taus", "1", "auto", "--edges", "2"]
    argv += ["--workers-per-edge", "2", "--json", str(out)]
    assert tau_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "tau"
    assert [(r["tree"], r["tau"]) for r in result["records"]] == [
        ("3-level", "1"),
        ("3-level", "auto"),
        ("4-level", "1"),
        ("4-level", "auto"),
    ]
    for record in result["records"]:
        assert record["cloud_rounds"] >= 1
        assert bool(record["rounds_chosen"]) == (record["tau"] == "auto")
    assert len(result["targets"]) == 4
    assert "| 4-level |" in tau_bench.render(result)


@needs_mosquitto
def test_message_api_bench_runs_the_flower_app_on_both_trees(tmp_path: Path) -> None:
    """The MQTT sides only (Flower's deployment engine is run by test_flower_message_api)."""
    from benchmarks import message_api_bench

    out = tmp_path / "message_api.json"
    argv = ["--systems", "hfl-flat", "hfl-tree", "--rounds", "1", "--workers", "4"]
    argv += ["--edges", "2", "--seeds", "1", "--processes", "1", "--json", str(out)]
    assert message_api_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert [r["system"] for r in result["records"]] == ["hfl-flat", "hfl-tree"]
    for record in result["records"]:
        assert record["strategy_seconds"] > 0
        assert record["bytes"] > 0
        assert 0.5 < record["accuracy"] <= 1.0
    assert result["targets"] == {}
    table = message_api_bench.render(result)
    assert table.count("\n| hfl-") == 2
