"""Adaptive participation benchmark: which workers train each round, on the staleness
benchmark's straggler setting, against every worker taking part.

**Setting** (``staleness_bench``'s own, by its code and options): digits, the MLP, a Dirichlet(0.5)
split, 4 edges of 8 workers, a quarter of them 10 times slower (0.2 s a run for the others),
synchronous edges of 2 rounds a cloud round at the deadline and minimum participation that
staleness_bench found best (``--deadline`` 0.25 s, ``--min-fraction`` 0.5), a 30 s budget, bytes
on the wire, time to target that holds (``reached_at``), clocks from the first dispatch with every
worker connected.

**Policies** at the edges (``participation``): ``all`` (the baseline), ``random`` (half the
workers), ``loss`` (the half with the highest recent loss), ``contribution`` (the half whose
deltas moved the model most) and ``deadline`` (skip the workers predicted to miss the deadline),
each but ``all`` with every worker picked at least every ``--every-rounds`` (4) rounds.

**Seeds**: ``--seeds`` (3), the order of the policies reversed on every other seed; median and
range, and per policy the ratios against ``all``: time to target (above 1: faster) and bytes to
target (above 1: fewer). What the script checks of itself (``targets``): no worker was starved
(each trained in every run: the fairness bound is the picker's, tested on its own), and the
``deadline`` policy sent fewer bytes to the target than ``all`` (what it is for: stragglers
no longer train on rounds they cannot answer in time).

    python benchmarks/participation_bench.py --json benchmarks/out/participation.json
    python benchmarks/participation_bench.py --render benchmarks/out/participation.json
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

try:  # run as a module (tests) or as a script (python benchmarks/...)
    from benchmarks import staleness_bench
    from benchmarks.targets import print_targets, write_json
except ImportError:
    import staleness_bench  # type: ignore[no-redef,import-not-found]
    from targets import print_targets, write_json  # type: ignore[no-redef,import-not-found]
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.sim import configure_logging, read_evaluations, simulate

POLICIES = ("all", "random", "loss", "contribution", "deadline")


def federation(policy: str, seed: int, args: argparse.Namespace) -> FederationConfig:
    """staleness_bench's federation with tuned synchronous edges, picking by ``policy``."""
    mode = f"sync-d{args.deadline:g}-f{args.min_fraction:g}"
    data = staleness_bench.federation(mode, seed, args).model_dump()
    data["federation"] = f"participation-{policy}"
    participation: dict[str, Any] = {"policy": policy, "seed": seed}
    if policy != "all":
        participation |= {"fraction": args.fraction, "every_rounds": args.every_rounds}
    data["levels"][1]["participation"] = participation
    return FederationConfig.model_validate(data)


def least_runs(summary: dict[str, Any]) -> int:
    """The fewest training runs any worker made (0: a worker was starved)."""
    return min(int(n["trained"]) for n in summary["nodes"] if n["role"] == "worker")


def run_policy(
    policy: str, seed: int, order: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    config = federation(policy, seed, args)
    launched = time.time()
    summary = asyncio.run(
        simulate(
            config,
            out,
            log_level=logging.ERROR,
            meter_links=args.meter,
            processes=args.processes,
            workers_first=True,
        )
    )
    events = read_evaluations(out / "metrics.jsonl")
    start = staleness_bench.clock_start(out / "metrics.jsonl", config, events)
    result = staleness_bench.record(
        policy, seed, order, summary, events, start, launched, args.target
    )
    workers = [n for n in summary["nodes"] if n["role"] == "worker"]
    result["trained"] = sum(w["trained"] for w in workers)
    result["skipped"] = sum(w["skipped"] for w in workers)
    result["least_runs"] = least_runs(summary)
    print(
        f"seed {seed} {policy:>12}: to {args.target:g} in "
        f"{staleness_bench._fmt(result['seconds_to_target'])} s, "
        f"{staleness_bench._fmt(staleness_bench._mb(result['bytes_to_target']), '.2f')} MB; "
        f"final {staleness_bench._fmt(result['final_accuracy'], '.4f')}, "
        f"{result['trained']} runs, {result['skipped']} skipped",
        flush=True,
    )
    return result


def check_targets(records: list[dict[str, Any]], versus: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {
        "no worker starved: every one trained in every run": {
            "met": all(r["least_runs"] > 0 for r in records),
            "measured": {r["mode"]: r["least_runs"] for r in records},
        }
    }
    fewer = versus.get("deadline", {}).get("bytes_to_target", {}).get("ratio")
    targets["deadline sends fewer bytes to the target than all"] = {
        "met": fewer is not None and fewer > 1,
        "measured": fewer,
    }
    return targets


def render(result: dict[str, Any]) -> str:
    """The RESULTS.md table."""
    lines = [
        "| policy | to target | bytes to target | final accuracy | runs trained / skipped "
        "| faster than all | fewer bytes than all |",
        "|---|---|---|---|---|---|---|",
    ]
    runs: dict[str, list[int]] = {}
    for r in result["records"]:
        runs.setdefault(r["mode"], [0, 0])
        runs[r["mode"]][0] += r["trained"]
        runs[r["mode"]][1] += r["skipped"]

    def cell(s: dict[str, Any], scale: float = 1.0, spec: str = ".1f", unit: str = "") -> str:
        if s["median"] is None:
            return f"missed ({s.get('reached', 0)} of {len(result['seeds'])} seeds)"
        return (
            f"{s['median'] * scale:{spec}}{unit} ({s['min'] * scale:{spec}} to "
            f"{s['max'] * scale:{spec}})"
        )

    def ratio(r: dict[str, Any] | None) -> str:
        if not r or r["ratio"] is None:
            return "-"
        return f"{r['ratio']:.2f}x ({r['min']:.2f} to {r['max']:.2f})"

    for policy, s in result["summary"].items():
        versus = result["versus_all"].get(policy, {})
        lines.append(
            f"| {policy} | {cell(s['seconds_to_target'], unit=' s')} "
            f"| {cell(s['bytes_to_target'], 1e-6, '.2f', ' MB')} "
            f"| {cell(s['final_accuracy'], spec='.4f')} "
            f"| {runs[policy][0]} / {runs[policy][1]} "
            f"| {ratio(versus.get('seconds_to_target'))} "
            f"| {ratio(versus.get('bytes_to_target'))} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    staleness_bench.add_setting_arguments(parser)  # the straggler setting, as it measures it
    parser.add_argument("--policies", nargs="*", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--deadline", type=float, default=0.25, help="the edges' round deadline")
    parser.add_argument("--min-fraction", type=float, default=0.5, help="of the picked workers")
    parser.add_argument("--fraction", type=float, default=0.5, help="random, loss, contribution")
    parser.add_argument("--every-rounds", type=int, default=4, help="fairness bound")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    workdir = args.out or Path(tempfile.mkdtemp(prefix="hfl-participation-"))
    records: list[dict[str, Any]] = []
    saved_logging = structlog.get_config()
    configure_logging(logging.ERROR)
    try:
        for seed in range(args.seeds):
            order = args.policies if seed % 2 == 0 else args.policies[::-1]
            for position, policy in enumerate(order):
                out = workdir / f"{policy}-{seed}"
                records.append(run_policy(policy, seed, position, args, out))
    finally:
        structlog.configure(**saved_logging)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = staleness_bench.summarize(records)
    versus = {
        policy: {
            "seconds_to_target": staleness_bench.ratio(records, "all", policy, "seconds_to_target"),
            "bytes_to_target": staleness_bench.ratio(records, "all", policy, "bytes_to_target"),
        }
        for policy in summary
        if policy != "all" and "all" in summary
    }
    result = {
        "benchmark": "participation",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "seeds": list(range(args.seeds)),
        "target_accuracy": args.target,
        "budget_s": args.budget_s,
        "deadline_s": args.deadline,
        "min_fraction": args.min_fraction,
        "fraction": args.fraction,
        "every_rounds": args.every_rounds,
        "records": records,
        "summary": summary,
        "versus_all": versus,
        "targets": check_targets(records, versus),
    }
    print(render(result), end="")
    print_targets(result["targets"])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
