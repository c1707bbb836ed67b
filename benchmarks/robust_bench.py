"""Robust aggregation benchmark: final accuracy with a fifth of the workers poisoned, FedAvg
edges beside each robust rule, on real Mosquitto.

**Task**: digits, softmax, IID, 32 workers under 4 edges (``--edges`` x ``--workers-per-edge``),
``--rounds`` (20) cloud rounds of one edge round each, 3 local epochs at learning rate 0.3
(enough for the clean run to level off, so that a slower rule is not mistaken for a poisoned
one), q8 uplinks.

**Attacks** (``heterogeneity.poisoned``: the share of workers, spread evenly over the edges):
``flip4`` sends ``-4`` times the honest delta, ``flip50`` ``-50`` times. **Rules** at the edges:
``fedavg`` (the default), ``median``, ``trimmed_mean`` (trim 0.25: up to 2 of 8 children per
edge), ``clipped_mean`` (each delta clipped to the round's median norm). The ``clean`` run has no
poisoned worker and FedAvg edges. **Seeds**: ``--seeds`` (3), median and range.

The check (``targets``): every robust rule ends within 2 points of the clean run under every
attack, and FedAvg does not (it is the attack working, not a target of ours).

    python benchmarks/robust_bench.py --json benchmarks/out/robust.json
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
from hfl_mqtt.sim import simulate

ATTACKS: dict[str, dict[str, Any]] = {
    "flip4": {"poison": "sign_flip", "poison_scale": 4.0},
    "flip50": {"poison": "sign_flip", "poison_scale": 50.0},
}
RULES: dict[str, dict[str, Any] | None] = {
    "fedavg": None,
    "median": {"rule": "median"},
    "trimmed_mean": {"rule": "trimmed_mean", "trim": 0.25},
    "clipped_mean": {"rule": "clipped_mean"},
}
WITHIN = 0.02


def federation(
    args: argparse.Namespace, seed: int, rule: dict[str, Any] | None, attack: dict[str, Any] | None
) -> FederationConfig:
    poison = None if attack is None else {"poisoned": args.poisoned, **attack}
    return FederationConfig.model_validate(
        {
            "federation": "robust",
            "levels": [
                {"name": "cloud", "rounds": args.rounds, "deadline_s": 60},
                {"name": "edge", "rounds": 1, "deadline_s": 60, "robust": rule},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [args.edges, args.workers_per_edge],
            "seed": seed,
            "heterogeneity": poison,
            "task": {
                "dataset": "digits",
                "model": "softmax",
                "seed": seed,
                "partition": {"scheme": "iid", "seed": seed},
                "train": {"epochs": 3, "batch_size": 16, "learning_rate": 0.3},
            },
        }
    )


def run(args: argparse.Namespace, seed: int, rule: str, attack: str | None) -> dict[str, Any]:
    config = federation(args, seed, RULES[rule], None if attack is None else ATTACKS[attack])
    with tempfile.TemporaryDirectory(prefix="robust-bench-") as out:
        summary = asyncio.run(
            simulate(config, Path(out), processes=args.processes, log_level=logging.ERROR)
        )
    record = {
        "attack": attack or "clean",
        "rule": rule,
        "seed": seed,
        "final_accuracy": summary["final_accuracy"],
        "updates_rejected": summary["updates_rejected"],
    }
    print(f"seed {seed} {record['attack']:>6} {rule:>12}: {record['final_accuracy']:.4f}")
    return record


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range of the final accuracy per (attack, rule)."""
    return accuracy_spread(records, ("attack", "rule"), "final_accuracy")


def check_targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    median = {(p["attack"], p["rule"]): p["accuracy_median"] for p in summary}
    clean = median[("clean", "fedavg")]
    targets: dict[str, Any] = {}
    for attack in ATTACKS:
        for rule in RULES:
            if (attack, rule) not in median:
                continue
            points = round(100 * (median[(attack, rule)] - clean), 2)
            held = median[(attack, rule)] >= clean - WITHIN
            if rule == "fedavg":
                targets[f"{attack}: fedavg dragged more than 2 points below clean"] = {
                    "met": not held,
                    "measured_points": points,
                }
            else:
                targets[f"{attack}: {rule} within 2 points of clean"] = {
                    "met": held,
                    "measured_points": points,
                }
    return targets


def render(result: dict[str, Any]) -> str:
    rules = list(RULES)
    lines = [
        "| attack | " + " | ".join(rules) + " |",
        "|---|" + "---|" * len(rules),
    ]
    cells = {(p["attack"], p["rule"]): p for p in result["summary"]}
    for attack in ["clean", *ATTACKS]:
        row = []
        for rule in rules:
            p = cells.get((attack, rule))
            row.append(
                ""
                if p is None
                else f"{p['accuracy_median']:.3f} "
                f"[{p['accuracy_min']:.3f}, {p['accuracy_max']:.3f}]"
            )
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE")
    parser.add_argument("--render", metavar="JSON", type=Path, help="print RESULTS.md's table")
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--poisoned", type=float, default=0.2, help="share of the workers")
    parser.add_argument("--rounds", type=int, default=20, help="cloud rounds")
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--workers-per-edge", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    records = []
    for seed in range(args.seeds):
        records.append(run(args, seed, "fedavg", None))
        for attack in args.attacks:
            for rule in args.rules:
                records.append(run(args, seed, rule, attack))
    summary = summarize(records)
    result = {
        "benchmark": "robust",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "workers": args.edges * args.workers_per_edge,
        "edges": args.edges,
        "poisoned": args.poisoned,
        "rounds": args.rounds,
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
