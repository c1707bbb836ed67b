"""Staleness benchmark: synchronous, FedAsync and FedBuff edges side by side, with stragglers.

The same 3-level federation runs once per edge mode, on the same seeds: a synchronous cloud,
``--edges`` edges and ``--workers-per-edge`` workers each (digits, Dirichlet(0.5) non-IID, the
numpy MLP), where ``--stragglers`` of the workers (25%) train ``--slowdown`` (10) times slower.
Each worker's device takes ``--compute-s`` per training run on top of the real training (a
straggler: ``slowdown`` times that). Edges are (a) synchronous FedAvg rounds (HierFAVG, tau 2),
(b) FedAsync, (c) FedBuff; asynchronous edges report to the cloud every ``--report-every``
folded updates. Every run gets the same wall-clock budget (``--budget-s``, the cloud's
``max_seconds``).

Per mode: seconds from the cloud's start to the first evaluation at or above ``--target``
(``seconds_to_target``, null if never), the accuracy at the end of the budget
(``final_accuracy``), staleness of accepted updates per level (mean, p95, max) and payload bytes
per level (``up``: what the level's nodes sent to their parents; ``down``: what its aggregators
published). ``speedup`` is sync's time to target over each mode's.

    python benchmarks/staleness_bench.py --json staleness.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from hfl_mqtt.config import FederationConfig, HeterogeneityConfig, LevelConfig
from hfl_mqtt.sim import configure_logging, read_evaluations, simulate
from hfl_mqtt.tasks.base import TaskConfig

MODES = ("sync", "fedasync", "fedbuff")
TARGET_SPEEDUP = 2.5
"""FedBuff's time to target against synchronous edges (the FedBuff paper reports 3.3x)."""


def federation(mode: str, args: argparse.Namespace) -> FederationConfig:
    """The benchmark's federation with ``mode`` edges."""
    edge: dict[str, Any] = {"name": "edge", "uplink_codec": "q8", "downlink_codec": "fp16"}
    if mode == "sync":
        edge |= {"rounds": 2, "deadline_s": 120, "min_fraction": 1.0}
    else:
        edge |= {"mode": mode, "report_every_updates": args.report_every}
        # A straggler's update is ~20 FedBuff steps behind, ~100 FedAsync ones (every update is
        # a version): bounds that take stragglers in (weighted down) rather than drop them.
        if mode == "fedbuff":
            edge |= {"buffer_size": args.buffer_size, "max_staleness": 40}
        else:
            edge |= {"mixing": args.mixing, "max_staleness": 150}
    return FederationConfig(
        federation=f"staleness-{mode}",
        levels=[
            LevelConfig(
                name="cloud",
                rounds=100_000,
                max_seconds=args.budget_s,
                deadline_s=120,
                min_fraction=1.0,
                downlink_codec="fp16",
            ),
            LevelConfig(**edge),
            LevelConfig(name="worker", uplink_codec="q8"),
        ],
        fanout=[args.edges, args.workers_per_edge],
        task=TaskConfig.model_validate(
            {
                "dataset": "digits",
                "model": "mlp",
                "seed": args.seed,
                "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": args.seed},
                "train": {
                    "epochs": 2,
                    "batch_size": 16,
                    "learning_rate": 0.5,
                    "proximal_mu": args.proximal_mu,
                },
            }
        ),
        heterogeneity=HeterogeneityConfig(
            seed=args.seed,
            compute_s=args.compute_s,
            stragglers=args.stragglers,
            slowdown=args.slowdown,
        ),
    )


def record(
    mode: str, summary: dict[str, Any], events: list[dict[str, Any]], target: float
) -> dict[str, Any]:
    reached = next((e for e in events if e["accuracy"] >= target), None)
    staleness = {
        level: {key: stats[key] for key in ("count", "mean", "p95", "max", "weight_mean")}
        for level, stats in summary["staleness"].items()
    }
    return {
        "mode": mode,
        "seconds_to_target": round(reached["seconds"], 3) if reached else None,
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": max((e["accuracy"] for e in events), default=None),
        "cloud_rounds": summary["global_rounds"],
        "staleness": staleness,
        "bytes": summary["bytes"] | {"total": summary["total_bytes"]},
        "updates_accepted": summary["updates_accepted"],
        "updates_rejected": summary["updates_rejected"],
        "wall_seconds": summary["wall_seconds"],
    }


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    config = federation(mode, args)
    started = time.monotonic()
    summary = asyncio.run(simulate(config, out, log_level=logging.ERROR))
    events = read_evaluations(out / "metrics.jsonl")
    result = record(mode, summary, events, args.target)
    edge = result["staleness"]["edge"]
    print(
        f"{mode:>9}: target {args.target} in {_fmt(result['seconds_to_target'])} s, "
        f"final accuracy {_fmt(result['final_accuracy'], '.4f')} after "
        f"{result['cloud_rounds']} cloud rounds, edge staleness mean {_fmt(edge['mean'])} "
        f"p95 {_fmt(edge['p95'])} max {_fmt(edge['max'], 'd')} "
        f"({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    # None: the target was never reached, no round closed in the budget, or no update arrived.
    return "never" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--workers-per-edge", type=int, default=8)
    parser.add_argument("--stragglers", type=float, default=0.25)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--compute-s", type=float, default=0.2, help="a fast device's run time")
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall clock per mode")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    parser.add_argument("--buffer-size", type=int, default=4, help="FedBuff's K")
    parser.add_argument("--mixing", type=float, default=0.5, help="FedAsync's a")
    parser.add_argument("--report-every", type=int, default=8, help="async edges report after")
    parser.add_argument("--proximal-mu", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep each run's files here")
    args = parser.parse_args(argv)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="hfl-staleness-"))
    records = []
    # The aggregators run in this process and log every round and rebase at info.
    saved_logging = structlog.get_config()
    configure_logging(logging.WARNING)
    try:
        for mode in args.modes:
            records.append(run_mode(mode, args, workdir / mode))
    finally:
        structlog.configure(**saved_logging)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    by_mode = {r["mode"]: r for r in records}
    sync_s = by_mode.get("sync", {}).get("seconds_to_target")
    speedup = {
        mode: round(sync_s / r["seconds_to_target"], 2)
        for mode, r in by_mode.items()
        if sync_s and r["seconds_to_target"]
    }
    result = {
        "benchmark": "staleness",
        "command": " ".join(
            ["python", "benchmarks/staleness_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "target_accuracy": args.target,
        "budget_s": args.budget_s,
        "speedup": speedup,
        "target_speedup_fedbuff": TARGET_SPEEDUP,
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "records": records,
    }
    if speedup:
        print(
            "speedup to target over sync edges: "
            + ", ".join(f"{m} {s}x" for m, s in speedup.items())
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
