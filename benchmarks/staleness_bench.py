"""Staleness benchmark: tuned synchronous edges against FedAsync and FedBuff edges, with stragglers.

The same 3-level federation runs once per edge mode and seed: a synchronous cloud, ``--edges``
edges and ``--workers-per-edge`` workers each (digits, Dirichlet(0.5) non-IID, the numpy MLP),
where ``--stragglers`` of the workers (25%) train ``--slowdown`` (10) times slower. Each worker's
device takes ``--compute-s`` per training run on top of the real training (a straggler:
``slowdown`` times that). Asynchronous edges report to the cloud every ``--report-every`` folded
updates. Every run gets the same wall-clock budget (``--budget-s``, the cloud's ``max_seconds``).

**Synchronous edges are tuned as a user would tune them**: besides FedAvg rounds that wait for
every worker (``sync-all``), a grid of round deadlines (``--deadlines``) times minimum
participations (``--min-fractions``), HierFAVG with tau 2 in every case. The best of them
(``sync_best``: every seed reached the target, then the lowest median time to it) is the
baseline every speedup is against.

**Clocks** start at the first dispatch of round 1 with every worker connected: the simulator
starts the aggregators only once every worker is connected (``workers_first``), and the clock
starts at the later of the root's start (it publishes its first model at once, retained) and the
last worker's first "online" status. Start-up is reported apart (``startup_seconds``).

**Time to target** is the first evaluation at or above ``--target`` whose next ``STAYS_FOR``
evaluations are too (``reached_at``): a mode that evaluates more often gains nothing from one
lucky evaluation.

**Bytes** are measured on the wire (``hfl_mqtt.linkmeter`` in front of the broker: every
network link, MQTT framing and the broker's fan-out to subscribers included): ``bytes_to_target``
at the evaluation that reached the target, ``bytes_total`` over the run, and ``accuracy_per_mb``
(final accuracy over ``bytes_total`` in MB). The payload bytes per level the nodes published
(``payload_bytes``: ``up`` to their parents, ``down`` their models) are given too.

**Seeds**: ``--seeds`` (3) seeds, each running every mode; the order of the modes is reversed on
every other seed. The summary gives the median and the range per mode. The targets (issue 12,
section 3) are checked here and written to the JSON's ``targets``.

    python benchmarks/staleness_bench.py --json benchmarks/out/staleness.json
    python benchmarks/staleness_bench.py --render benchmarks/out/staleness.json  # RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

try:  # run as a module (tests) or as a script (python benchmarks/...)
    from benchmarks.targets import print_targets, write_json
    from benchmarks.time_to_target import STAYS_FOR, reached_at
except ImportError:
    from targets import print_targets, write_json  # type: ignore[no-redef,import-not-found]
    from time_to_target import STAYS_FOR, reached_at  # type: ignore[no-redef,import-not-found]
from hfl_mqtt.config import FederationConfig, HeterogeneityConfig, LevelConfig
from hfl_mqtt.sim import configure_logging, read_evaluations, simulate
from hfl_mqtt.tasks.base import TaskConfig
from hfl_mqtt.topics import status_topic

ASYNC_MODES = ("fedasync", "fedbuff")
TARGET_SPEEDUP = 2.5
"""An asynchronous mode's time to target against ``sync_best`` (the FedBuff paper: 3.3x)."""
ACCURACY_POINTS = 1.0
"""An asynchronous mode's final accuracy no more than this many points below ``sync_best``'s."""


def sync_modes(args: argparse.Namespace) -> list[str]:
    """The synchronous edges to try: waiting for everyone, then the deadline grid."""
    grid = [f"sync-d{d:g}-f{f:g}" for d in args.deadlines for f in args.min_fractions]
    return (["sync-all"] if args.wait_all else []) + grid


def modes_of(args: argparse.Namespace) -> list[str]:
    return sync_modes(args) + [m for m in ASYNC_MODES if m in args.async_modes]


def edge_level(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The edge level's config of ``mode`` (``sync-all``, ``sync-dD-fF``, an async mode)."""
    edge: dict[str, Any] = {"name": "edge", "uplink_codec": "q8"} | downlink(args)
    if mode == "sync-all":
        return edge | {"rounds": 2, "deadline_s": 120, "min_fraction": 1.0}
    if mode.startswith("sync-d"):
        deadline, fraction = mode.removeprefix("sync-d").split("-f")
        return edge | {"rounds": 2, "deadline_s": float(deadline), "min_fraction": float(fraction)}
    edge |= {
        "mode": mode,
        "report_every_updates": args.report_every,
        "publish_every_steps": args.publish_every_steps,
        "publish_on_rebase": args.publish_on_rebase,
    }
    if args.staleness is not None:
        edge["staleness"] = {"function": args.staleness}
    # A straggler's update is ~20 FedBuff steps behind, ~100 FedAsync ones (every update is
    # a version): bounds that take stragglers in (weighted down) rather than drop them.
    if mode == "fedbuff":
        return edge | {
            "buffer_size": args.buffer_size,
            "server_lr": args.server_lr,
            "max_staleness": args.max_staleness or 40,
        }
    return edge | {"mixing": args.mixing, "max_staleness": args.max_staleness or 150}


def downlink(args: argparse.Namespace) -> dict[str, Any]:
    """How the cloud and the edges send their models down, the same in every mode."""
    if args.downlink_delta_codec is None:
        return {"downlink_codec": "fp16"}
    return {
        "downlink_codec": "fp16",
        "downlink_delta_codec": args.downlink_delta_codec,
        "keyframe_every": args.keyframe_every,
    }


def federation(mode: str, seed: int, args: argparse.Namespace) -> FederationConfig:
    """The benchmark's federation with ``mode`` edges."""
    return FederationConfig(
        federation=f"staleness-{mode.split('-', maxsplit=1)[0]}",
        levels=[
            LevelConfig.model_validate(
                {
                    "name": "cloud",
                    "rounds": 100_000,
                    "max_seconds": args.budget_s,
                    "deadline_s": 120,
                    "min_fraction": 1.0,
                }
                | downlink(args)
            ),
            LevelConfig.model_validate(edge_level(mode, args)),
            LevelConfig(name="worker", uplink_codec="q8"),
        ],
        fanout=[args.edges, args.workers_per_edge],
        task=TaskConfig.model_validate(
            {
                "dataset": "digits",
                "model": "mlp",
                "seed": seed,
                "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": seed},
                "train": {
                    "epochs": 2,
                    "batch_size": 16,
                    "learning_rate": 0.5,
                    "proximal_mu": args.proximal_mu,
                },
            }
        ),
        heterogeneity=HeterogeneityConfig(
            seed=seed,
            compute_s=args.compute_s,
            stragglers=args.stragglers,
            slowdown=args.slowdown,
        ),
    )


def clock_start(metrics: Path, config: FederationConfig, events: list[dict[str, Any]]) -> float:
    """Wall time of the first dispatch with every worker connected: the later of the root's
    start and the last worker's first "online" status (``metrics.jsonl``)."""
    workers = {
        status_topic(config.federation, n.node): n.node
        for n in config.node_configs({})
        if n.role == "worker"
    }
    online: dict[str, float] = {}
    for raw in metrics.read_text().splitlines():
        line = json.loads(raw)
        node = workers.get(line.get("topic", ""))
        payload = line.get("payload")
        fresh = node is not None and node not in online and isinstance(payload, dict)
        if fresh and payload.get("state") == "online":
            online[str(node)] = line["t"]
    missing = set(workers.values()) - set(online)
    if missing:
        raise RuntimeError(f"no online status heard from {sorted(missing)}")
    root_started = float(events[0]["wall"] - events[0]["seconds"]) if events else 0.0
    return max(root_started, *online.values())


def record(
    mode: str,
    seed: int,
    order: int,
    summary: dict[str, Any],
    events: list[dict[str, Any]],
    start: float,
    launched: float,
    target: float,
) -> dict[str, Any]:
    accuracies = [e["accuracy"] for e in events]
    at = reached_at(accuracies, target)
    # Without meters (--no-meter): the payload the nodes published, as the root last heard it.
    links = summary.get("links")
    wire = [sum(e["link_bytes"].values()) if links else e["tree_bytes"] for e in events]
    if links:
        bytes_total = sum(link["up"] + link["down"] for link in links.values())
    else:
        bytes_total = summary["total_bytes"]
    final = summary["final_accuracy"]
    staleness = {
        level: {key: stats[key] for key in ("count", "mean", "p95", "max", "weight_mean")}
        for level, stats in summary["staleness"].items()
    }
    meter_cpu = [link["cpu_seconds"] for link in (links or {}).values()] or [0.0]
    return {
        "mode": mode,
        "family": mode.split("-", maxsplit=1)[0],
        "seed": seed,
        "order": order,
        "seconds_to_target": round(events[at]["wall"] - start, 3) if at is not None else None,
        "evaluations_to_target": at + 1 if at is not None else None,
        "bytes_to_target": wire[at] if at is not None else None,
        "final_accuracy": final,
        "best_accuracy": max(accuracies, default=None),
        "bytes_total": bytes_total,
        "bytes_measured": "wire" if links else "payload",
        "accuracy_per_mb": round(final / (bytes_total / 1e6), 5) if final and bytes_total else None,
        "payload_bytes": summary["bytes"] | {"total": summary["total_bytes"]},
        "cloud_rounds": summary["global_rounds"],
        "staleness": staleness,
        "updates_accepted": summary["updates_accepted"],
        "updates_rejected": summary["updates_rejected"],
        "startup_seconds": round(start - launched, 3),
        "wall_seconds": summary["wall_seconds"],
        "meter_cpu_seconds": None if None in meter_cpu else round(sum(meter_cpu), 3),
        "curve": {
            "seconds": [round(e["wall"] - start, 2) for e in events],
            "accuracy": [round(a, 4) for a in accuracies],
            "bytes": wire,
        },
    }


def run_mode(
    mode: str, seed: int, order: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    config = federation(mode, seed, args)
    launched = time.time()
    running = simulate(
        config,
        out,
        log_level=logging.ERROR,
        meter_links=args.meter,
        processes=args.processes,
        workers_first=True,
    )
    summary = asyncio.run(running)
    events = read_evaluations(out / "metrics.jsonl")
    start = clock_start(out / "metrics.jsonl", config, events)
    result = record(mode, seed, order, summary, events, start, launched, args.target)
    edge = result["staleness"]["edge"]
    print(
        f"seed {seed} {mode:>14}: to {args.target:g} in {_fmt(result['seconds_to_target'])} s, "
        f"{_fmt(_mb(result['bytes_to_target']), '.2f')} MB; final "
        f"{_fmt(result['final_accuracy'], '.4f')}, {_mb(result['bytes_total']):.1f} MB after "
        f"{result['cloud_rounds']} cloud rounds; edge staleness mean {_fmt(edge['mean'])} "
        f"max {_fmt(edge['max'], 'd')}; start-up {result['startup_seconds']:.1f} s, "
        f"wall {time.time() - launched:.0f} s",
        flush=True,
    )
    return result


def _fmt(value: float | None, spec: str = ".1f") -> str:
    # None: the target was never reached, no round closed in the budget, or no update arrived.
    return "never" if value is None else format(value, spec)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 1e6


# --- summary, sync_best, targets ------------------------------------------------------------------

_SUMMARIZED = (
    "seconds_to_target",
    "bytes_to_target",
    "final_accuracy",
    "bytes_total",
    "accuracy_per_mb",
    "startup_seconds",
)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median and range; all None if a value is missing (a seed missed the target)."""
    reached = sum(v is not None for v in values)
    present = [v for v in values if v is not None]
    if not values or reached < len(values):
        return {"median": None, "min": None, "max": None, "reached": reached}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r["mode"] for r in records):
        mine = [r for r in records if r["mode"] == mode]
        summary[mode] = {key: spread([r[key] for r in mine]) for key in _SUMMARIZED}
        summary[mode]["seeds"] = [r["seed"] for r in mine]
    return summary


def best_sync(summary: dict[str, dict[str, Any]]) -> str | None:
    """The synchronous mode every seed of which reached the target, fastest in the median
    (fewer bytes to target breaks a tie); None if none did."""
    reliable = [
        (s["seconds_to_target"]["median"], s["bytes_to_target"]["median"], mode)
        for mode, s in summary.items()
        if mode.startswith("sync") and s["seconds_to_target"]["median"] is not None
    ]
    return min(reliable)[2] if reliable else None


def ratio(records: list[dict[str, Any]], a: str, b: str, key: str) -> dict[str, float | None]:
    """``a``'s ``key`` over ``b``'s: the ratio of the medians, and the range of the per-seed
    ratios; None if a seed of either missed."""
    mine = {m: {r["seed"]: r[key] for r in records if r["mode"] == m} for m in (a, b)}
    found = [(mine[a][seed], mine[b].get(seed)) for seed in mine[a]]
    pairs = [(float(x), float(y)) for x, y in found if x is not None and y is not None]
    if not pairs or len(pairs) < len(found):
        return {"ratio": None, "min": None, "max": None}
    per_seed = [x / y for x, y in pairs]
    medians = statistics.median(x for x, _ in pairs) / statistics.median(y for _, y in pairs)
    return {
        "ratio": round(medians, 3),
        "min": round(min(per_seed), 3),
        "max": round(max(per_seed), 3),
    }


def check_targets(
    records: list[dict[str, Any]], summary: dict[str, dict[str, Any]], best: str | None
) -> dict[str, Any]:
    """Issue 12, section 3, per asynchronous mode: >= 2.5x faster to the target than
    ``sync_best``, no more bytes to target, final accuracy within 1 point; and whether any
    asynchronous mode meets all three."""
    checked: dict[str, Any] = {}
    if best is None:
        return checked
    all_met = []
    for mode in (m for m in summary if m in ASYNC_MODES):
        speedup = ratio(records, best, mode, "seconds_to_target")
        bytes_ratio = ratio(records, mode, best, "bytes_to_target")
        gap = summary[mode]["final_accuracy"]["median"] - summary[best]["final_accuracy"]["median"]
        verdicts = {
            f"{mode} >= {TARGET_SPEEDUP:g}x faster to target than sync_best": {
                "met": speedup["ratio"] is not None and speedup["ratio"] >= TARGET_SPEEDUP,
                "measured": speedup,
            },
            f"{mode} bytes to target <= sync_best's": {
                "met": bytes_ratio["ratio"] is not None and bytes_ratio["ratio"] <= 1.0,
                "measured": bytes_ratio,
            },
            f"{mode} final accuracy within {ACCURACY_POINTS:g} point of sync_best": {
                "met": gap >= -ACCURACY_POINTS / 100,
                "measured_points": round(100 * gap, 2),
            },
        }
        checked |= verdicts
        all_met.append(all(v["met"] for v in verdicts.values()))
    if all_met:
        checked[
            f"issue 12 section 3: FedBuff or FedAsync >= {TARGET_SPEEDUP:g}x faster than "
            "sync_best, no more bytes to target, accuracy within 1 point"
        ] = {"met": any(all_met)}
    return checked


def sync_best_block(
    summary: dict[str, dict[str, Any]], best: str | None, args: argparse.Namespace
) -> dict[str, Any] | None:
    if best is None:
        return None
    s = summary[best]
    edge = edge_level(best, args)
    return {
        "mode": best,
        "deadline_s": edge["deadline_s"],
        "min_fraction": edge["min_fraction"],
        "seconds_to_target": s["seconds_to_target"]["median"],
        "bytes_to_target": s["bytes_to_target"]["median"],
        "final_accuracy": s["final_accuracy"]["median"],
        "bytes_total": s["bytes_total"]["median"],
        "accuracy_per_mb": s["accuracy_per_mb"]["median"],
        "spread": {key: s[key] for key in _SUMMARIZED},
    }


# --- RESULTS.md ---------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    """RESULTS.md's tables from a result this script wrote."""
    target = f"{result['target_accuracy']:g}"
    best = (result["sync_best"] or {}).get("mode")
    lines = [
        f"| edges | to {target} | bytes to {target} | final accuracy | bytes, whole run "
        "| accuracy per MB | edge staleness mean / max | start-up |",
        "|---" * 8 + "|",
    ]
    for mode, s in result["summary"].items():
        mine = [r for r in result["records"] if r["mode"] == mode]
        mean = statistics.median(r["staleness"]["edge"]["mean"] or 0 for r in mine)
        worst = max(r["staleness"]["edge"]["max"] or 0 for r in mine)
        name = f"**{mode}** (sync_best)" if mode == best else mode
        lines.append(
            f"| {name} | {_cell(s['seconds_to_target'], 's')} "
            f"| {_cell(s['bytes_to_target'], 'MB')} | {_cell(s['final_accuracy'], '')} "
            f"| {_cell(s['bytes_total'], 'MB')} | {_cell(s['accuracy_per_mb'], '/MB')} "
            f"| {mean:.1f} / {worst} | {_cell(s['startup_seconds'], 's')} |"
        )
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    for name, verdict in result["targets"].items():
        measured = verdict.get("measured")
        if isinstance(measured, dict):
            text = (
                "n/a"
                if measured["ratio"] is None
                else (f"{measured['ratio']:g}x ({measured['min']:g} to {measured['max']:g})")
            )
        elif "measured_points" in verdict:
            text = f"{verdict['measured_points']:+.2f} points"
        else:
            text = ""
        lines.append(f"| {name} | {'met' if verdict['met'] else '**missed**'} | {text} |")
    return "\n".join(lines) + "\n"


def _cell(s: dict[str, Any], unit: str) -> str:
    """median (min to max) in ``unit``."""
    if s["median"] is None:
        return f"missed ({s['reached']} seeds reached it)"
    scale, digits = {"MB": (1e-6, 2), "s": (1, 1), "/MB": (1, 4)}.get(unit, (1, 4))
    low, mid, high = (f"{s[k] * scale:.{digits}f}" for k in ("min", "median", "max"))
    suffix = f" {unit}" if unit in ("MB", "s") else ""
    return f"{mid}{suffix} ({low} to {high})"


# --- main -----------------------------------------------------------------------------------------


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The straggler setting's options (the tree, the devices, the budget, the target, how
    bytes are counted), for this benchmark and those run on the same setting."""
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument("--render", type=Path, metavar="JSON", help="print RESULTS.md's tables")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--workers-per-edge", type=int, default=8)
    parser.add_argument("--stragglers", type=float, default=0.25)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--compute-s", type=float, default=0.2, help="a fast device's run time")
    parser.add_argument("--budget-s", type=float, default=30.0, help="wall clock per run")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    parser.add_argument(
        "--downlink-delta-codec", help="every mode: models down as deltas in this codec"
    )
    parser.add_argument("--keyframe-every", type=int, default=20, help="with delta coding")
    parser.add_argument("--proximal-mu", type=float, default=0.0)
    parser.add_argument("--processes", type=int, default=None, help="worker processes")
    parser.add_argument(
        "--meter",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bytes on the wire (else: payload bytes, as the root heard of them)",
    )
    parser.add_argument("--out", type=Path, help="keep each run's files here")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--async-modes", nargs="*", choices=ASYNC_MODES, default=list(ASYNC_MODES))
    parser.add_argument(
        "--wait-all",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run synchronous edges that wait for every worker (sync-all)",
    )
    parser.add_argument("--deadlines", type=float, nargs="*", default=[0.25, 0.5, 1.0])
    parser.add_argument("--min-fractions", type=float, nargs="*", default=[0.5, 0.75])
    parser.add_argument("--buffer-size", type=int, default=4, help="FedBuff's K")
    parser.add_argument("--mixing", type=float, default=0.5, help="FedAsync's a")
    parser.add_argument("--report-every", type=int, default=8, help="async edges report after")
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedBuff's server step")
    parser.add_argument("--max-staleness", type=int, help="default: 40 FedBuff, 150 FedAsync")
    parser.add_argument("--staleness", help="staleness function (default: the mode's)")
    parser.add_argument(
        "--publish-every-steps", type=int, default=1, help="async edges: a version every N steps"
    )
    parser.add_argument(
        "--publish-on-rebase",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="async edges: publish a rebased model at once (else with the next step)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    workdir = args.out or Path(tempfile.mkdtemp(prefix="hfl-staleness-"))
    modes = modes_of(args)
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    # The aggregators run in this process and log every round at info, every refused update
    # at warning (FedAsync's stragglers: thousands).
    saved_logging = structlog.get_config()
    configure_logging(logging.ERROR)
    try:
        for seed in range(args.seeds):
            order = modes if seed % 2 == 0 else modes[::-1]
            for position, mode in enumerate(order):
                out = workdir / f"{mode}-{seed}"
                records.append(run_mode(mode, seed, position, args, out))
    finally:
        structlog.configure(**saved_logging)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(records)
    best = best_sync(summary)
    targets = check_targets(records, summary, best)
    speedup = {
        mode: ratio(records, best, mode, "seconds_to_target")
        for mode in summary
        if best is not None and mode != best
    }
    result = {
        "benchmark": "staleness",
        "command": " ".join(
            ["python", "benchmarks/staleness_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "wall_seconds": round(time.monotonic() - started, 1),
        "target_accuracy": args.target,
        "budget_s": args.budget_s,
        "time_to_target_rule": f"first evaluation at or above the target whose next {STAYS_FOR} "
        "evaluations are too; seconds from the first dispatch with every worker connected",
        "bytes_rule": "on the wire (link meter in front of the broker), every network link",
        "modes": modes,
        "sync_best": sync_best_block(summary, best, args),
        "speedup_over_sync_best": speedup,
        "summary": summary,
        "targets": targets,
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "records": records,
    }
    print(f"sync_best: {best}")
    for mode, s in speedup.items():
        print(f"  {mode} against sync_best: {s}")
    print_targets(targets)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
