"""Metrics cost benchmark: the bytes of the nodes' metrics records against all the bytes of
``hfl-mqtt demo`` (cloud, 2 edges, 8 workers on digits, one Mosquitto broker).

It runs the demo's federation three times through the simulator: with metrics records as
shipped (an aggregator's at most every 1 s, a worker's every 5 s), with every node's at most
every ``--interval`` seconds (1 s: the most the records may cost), and off. From each run's
``summary.json`` per-node link stats it adds up the payload bytes every node published per topic
kind (an aggregator whose two sides share one connection counted once). Target: the "metrics"
kind is at most 2 % of all the bytes published, in both runs with metrics on. The run with
metrics off shows what the rest costs without them (training runs vary a little: the same
rounds, not the same bytes to the byte).

    python benchmarks/metrics_cost_bench.py --json benchmarks/out/metrics_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from hfl_mqtt.cli import DEMO
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.logs import configure_logging
from hfl_mqtt.sim import simulate

TARGET_SHARE_PERCENT = 2.0
"""The issue's bound: metrics bytes at most 2 % of the demo's bytes."""


def kind_totals(summary: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Messages and bytes every node published, per topic kind, from ``summary.json``."""
    totals: dict[str, dict[str, int]] = {}
    for report in summary["nodes"]:
        links = [link for link in (report["up"], report["down"]) if link is not None]
        if len(links) == 2 and links[0] == links[1]:
            links = links[:1]  # one connection for both sides: its stats appear twice
        for link in links:
            for kind, stats in link["by_kind"].items():
                entry = totals.setdefault(kind, {"messages": 0, "bytes": 0})
                entry["messages"] += stats["messages_sent"]
                entry["bytes"] += stats["bytes_sent"]
    return dict(sorted(totals.items()))


async def measure(config: FederationConfig, out: Path, processes: int | None) -> dict[str, Any]:
    summary = await simulate(config, out, processes=processes)
    accuracy = summary["final_accuracy"]
    kinds = kind_totals(summary)
    total = sum(k["bytes"] for k in kinds.values())
    metrics = kinds.get("metrics", {"messages": 0, "bytes": 0})
    return {
        "metrics_interval_s": config.metrics_interval_s,
        "worker_metrics_interval_s": config.worker_metrics_interval_s,
        "wall_seconds": summary["wall_seconds"],
        "global_rounds": summary["global_rounds"],
        "final_accuracy": round(accuracy, 4) if accuracy is not None else None,
        "bytes_sent": total,
        "bytes_sent_without_metrics": total - metrics["bytes"],
        "metrics_bytes": metrics["bytes"],
        "metrics_records": metrics["messages"],
        "metrics_record_mean_bytes": (
            round(metrics["bytes"] / metrics["messages"]) if metrics["messages"] else None
        ),
        "metrics_share_percent": round(100 * metrics["bytes"] / total, 3) if total else None,
        "by_kind": kinds,
    }


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    every = {"metrics_interval_s": args.interval, "worker_metrics_interval_s": args.interval}
    off = DEMO.model_copy(update={"metrics_interval_s": 0.0, "worker_metrics_interval_s": 0.0})
    return {
        "metrics_default": await measure(DEMO, tmp / "default", args.processes),
        "metrics_on": await measure(DEMO.model_copy(update=every), tmp / "on", args.processes),
        "metrics_off": await measure(off, tmp / "off", args.processes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="every node's interval in the second run"
    )
    parser.add_argument("--processes", type=int, default=None, help="worker processes of the sim")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be > 0 (the run with metrics off is always made)")
    saved_logging = structlog.get_config()
    configure_logging(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="hfl-metrics-cost-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    finally:
        structlog.configure(**saved_logging)
    default, on, off = result["metrics_default"], result["metrics_on"], result["metrics_off"]
    targets = {
        f"{name}: metrics bytes <= {TARGET_SHARE_PERCENT:g} % of the demo's bytes": (
            "met"
            if run["metrics_share_percent"] is not None
            and run["metrics_share_percent"] <= TARGET_SHARE_PERCENT
            else "missed"
        )
        for name, run in (("as shipped", default), (f"every {args.interval:g} s", on))
    } | {
        "no metrics bytes with metrics off": "met" if off["metrics_bytes"] == 0 else "missed",
    }
    runs = (default, on, off)
    rows: list[tuple[str, ...]] = [
        ("", "as shipped", f"every {args.interval:g} s", "off"),
        *(
            (label, *(str(run[key]) for run in runs))
            for label, key in (
                ("metrics_interval_s", "metrics_interval_s"),
                ("worker_metrics_interval_s", "worker_metrics_interval_s"),
                ("global rounds", "global_rounds"),
                ("final accuracy", "final_accuracy"),
                ("wall seconds", "wall_seconds"),
                ("bytes sent, all kinds", "bytes_sent"),
                ("bytes sent, all but metrics", "bytes_sent_without_metrics"),
                ("metrics records", "metrics_records"),
                ("metrics bytes", "metrics_bytes"),
                ("mean record, bytes", "metrics_record_mean_bytes"),
                ("metrics share, %", "metrics_share_percent"),
            )
        ),
    ]
    for label, *values in rows:
        print(f"{label:<30}" + "".join(f"{value:>14}" for value in values))
    for target, state in targets.items():
        print(f"target {target}: {state}")
    record = {
        "benchmark": "metrics_cost",
        "command": " ".join(
            [
                "python",
                "benchmarks/metrics_cost_bench.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        **result,
        "targets": targets,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0 if all(state == "met" for state in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
