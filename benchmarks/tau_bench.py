"""Intra-level rounds benchmark: ``rounds: auto`` against fixed rounds (tau 1, 2, 4, 8) under
the same deadline, on a 3-level and a 4-level tree, on real Mosquitto.

**Trees**: ``3-level``: a cloud, 4 edges of 4 workers; ``4-level``: a cloud, 2 regions of 2
edges of 4 workers. Digits, the MLP, a Dirichlet(0.5) split, q8 uplinks, every worker 0.05 s
of simulated compute a run. The links above the workers are slow, as they are in a real fleet
(``link_latency_ms``: ``--edge-latency-ms`` 200 from an edge to its parent,
``--region-latency-ms`` 400 from a region to the cloud, each way), so a report up costs
something and rounds before it buy time.

**Deadline**: the root stops after ``--deadline-s`` (20) seconds (``max_seconds``); each run is
scored by the test accuracy of the root's last evaluation, which is the model at the deadline.
Every aggregator level below the root runs the same fixed tau, or ``auto`` (which chooses per
level and per cycle from what it measures, docs/auto-rounds.md).

**Seeds**: ``--seeds`` (3), the order reversed on every other seed; median and range. The check
(``targets``): on each tree, ``auto`` ends within 1 point of the best fixed tau's median (the
best being known only after the fact), and above the worst.

    python benchmarks/tau_bench.py --json benchmarks/out/tau.json
    python benchmarks/tau_bench.py --render benchmarks/out/tau.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

try:  # run as a module (tests) or as a script (python benchmarks/...)
    from benchmarks.targets import accuracy_spread, print_targets, write_json
except ImportError:
    from targets import (  # type: ignore[no-redef,import-not-found]
        accuracy_spread,
        print_targets,
        write_json,
    )
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.sim import configure_logging, simulate

TAUS = ("1", "2", "4", "8", "auto")
TREES = ("3-level", "4-level")
WITHIN = 0.01


def federation(tree: str, tau: str, seed: int, args: argparse.Namespace) -> FederationConfig:
    rounds: int | str = tau if tau == "auto" else int(tau)
    cloud = {"name": "cloud", "rounds": 100_000, "max_seconds": args.deadline_s}
    edge = {"name": "edge", "rounds": rounds, "link_latency_ms": args.edge_latency_ms}
    if tree == "3-level":
        levels, fanout = [cloud, edge], [args.edges, args.workers_per_edge]
    else:
        region = {"name": "region", "rounds": rounds, "link_latency_ms": args.region_latency_ms}
        levels, fanout = [cloud, region, edge], [2, args.edges // 2, args.workers_per_edge]
    for level in levels[1:]:
        level |= {"deadline_s": 30, "min_fraction": 1.0, "uplink_codec": "q8"}
    return FederationConfig.model_validate(
        {
            "federation": f"tau-{tree}",
            "levels": [*levels, {"name": "worker", "uplink_codec": "q8"}],
            "fanout": fanout,
            "seed": seed,
            "heterogeneity": {"seed": seed, "compute_s": args.compute_s},
            "task": {
                "dataset": "digits",
                "model": "mlp",
                "seed": seed,
                "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": seed},
                "train": {"epochs": 1, "batch_size": 16, "learning_rate": 0.3},
            },
        }
    )


def run(tree: str, tau: str, seed: int, order: int, args: argparse.Namespace) -> dict[str, Any]:
    config = federation(tree, tau, seed, args)
    with tempfile.TemporaryDirectory(prefix="tau-bench-") as out:
        summary = asyncio.run(
            simulate(
                config,
                Path(out),
                processes=args.processes,
                log_level=logging.ERROR,
                workers_first=True,
            )
        )
    chosen = {
        n["node"]: n["rounds_chosen"]
        for n in summary["nodes"]
        if n["role"] == "aggregator" and n["rounds_chosen"]
    }
    record = {
        "tree": tree,
        "tau": tau,
        "seed": seed,
        "order": order,
        "accuracy_at_deadline": summary["final_accuracy"],
        "cloud_rounds": summary["global_rounds"],
        "rounds_chosen": chosen,
    }
    picks = sorted({t for ts in chosen.values() for t in ts})
    print(
        f"seed {seed} {tree} tau {tau:>4}: accuracy {record['accuracy_at_deadline']:.4f} after "
        f"{record['cloud_rounds']} cloud rounds" + (f"; chose {picks}" if picks else ""),
        flush=True,
    )
    return record


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range of the accuracy at the deadline per (tree, tau)."""
    return accuracy_spread(records, ("tree", "tau"), "accuracy_at_deadline")


def check_targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for tree in dict.fromkeys(p["tree"] for p in summary):
        fixed = {p["tau"]: p["accuracy_median"] for p in summary if p["tree"] == tree}
        auto = fixed.pop("auto", None)
        if auto is None or not fixed:
            continue
        best_tau = max(fixed, key=lambda t: fixed[t])
        targets[f"{tree}: auto within 1 point of the best fixed tau"] = {
            "met": auto >= fixed[best_tau] - WITHIN,
            "measured": {"auto": auto, "best": [best_tau, fixed[best_tau]]},
        }
        targets[f"{tree}: auto above the worst fixed tau"] = {
            "met": auto > min(fixed.values()),
            "measured": {"auto": auto, "worst": min(fixed.values())},
        }
    return targets


def render(result: dict[str, Any]) -> str:
    lines = ["| tree | " + " | ".join(f"tau {t}" for t in TAUS) + " |", "|---|" + "---|" * 5]
    cells = {(p["tree"], p["tau"]): p for p in result["summary"]}
    for tree in TREES:
        row = []
        for tau in TAUS:
            p = cells.get((tree, tau))
            if p is None:
                row.append("")
                continue
            spread = f"[{p['accuracy_min']:.3f}, {p['accuracy_max']:.3f}]"
            row.append(f"{p['accuracy_median']:.3f} {spread}")
        if any(row):
            lines.append(f"| {tree} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE")
    parser.add_argument("--render", metavar="JSON", type=Path, help="print RESULTS.md's table")
    parser.add_argument("--trees", nargs="*", choices=TREES, default=list(TREES))
    parser.add_argument("--taus", nargs="*", choices=TAUS, default=list(TAUS))
    parser.add_argument("--deadline-s", type=float, default=20.0, help="the run's deadline")
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--workers-per-edge", type=int, default=4)
    parser.add_argument("--compute-s", type=float, default=0.05, help="a worker's run, simulated")
    parser.add_argument("--edge-latency-ms", type=float, default=200.0)
    parser.add_argument("--region-latency-ms", type=float, default=400.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    saved_logging = structlog.get_config()
    configure_logging(logging.ERROR)
    records = []
    try:
        for seed in range(args.seeds):
            runs = [(tree, tau) for tree in args.trees for tau in args.taus]
            for order, (tree, tau) in enumerate(runs if seed % 2 == 0 else runs[::-1]):
                records.append(run(tree, tau, seed, order, args))
    finally:
        structlog.configure(**saved_logging)
    summary = summarize(records)
    result = {
        "benchmark": "tau",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "deadline_s": args.deadline_s,
        "edge_latency_ms": args.edge_latency_ms,
        "region_latency_ms": args.region_latency_ms,
        "compute_s": args.compute_s,
        "records": records,
        "summary": summary,
        "targets": check_targets(summary),
    }
    print(render(result), end="")
    print_targets(result["targets"])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
