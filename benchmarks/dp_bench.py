"""Differential privacy benchmark: test accuracy against epsilon, central DP at the edges and
local DP on the workers, on real Mosquitto.

**Task**: digits with the project's MLP (64 hidden units, 4,810 parameters), IID, 32 workers
under 4 edges under a cloud (``--edges`` x ``--workers-per-edge``), ``--rounds`` (20) cloud
rounds of one edge round each, 3 local epochs at learning rate 0.3, q8 uplinks.

**Privacy**: for each target epsilon (``--epsilons``, at ``--delta``), the noise multiplier is
the smallest whose releases over the whole run spend at most that epsilon
(``hfl_mqtt.accounting.noise_for_epsilon``), so every run ends on its budget:

- ``central``: every edge clips its workers' deltas (adaptive clipping to the median norm,
  starting from ``--clip``) and noises their sum: one release per edge round, each worker's
  whole contribution protected from the cloud and everything above the edge (user-level DP).
- ``local``: every worker clips its own delta to ``--clip`` and noises it before it leaves the
  device: one release per training run, protected from its own edge too.
- ``none``: no DP, the same federation.

The epsilon each run reports (``summary.json``'s ``privacy``, the worst node of the level) is
recorded beside the target. **Seeds**: ``--seeds`` (3), median and range per point.

    python benchmarks/dp_bench.py --json benchmarks/out/dp.json --plot benchmarks/plots/dp.png
    python benchmarks/dp_bench.py --render benchmarks/out/dp.json   # the RESULTS.md table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import time
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
from hfl_mqtt.accounting import noise_for_epsilon
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.sim import simulate
from hfl_mqtt.telemetry import load_pyplot

EPSILONS = (1.0, 3.0, 8.0, 30.0, 100.0)
"""The usual budgets (1, 3, 8), and two larger ones to show where accuracy comes back."""
KINDS = ("central", "local")


def federation(args: argparse.Namespace, seed: int, kind: str, epsilon: float | None) -> Any:
    """The federation of one run, and the noise multiplier its privacy uses (None: no DP)."""
    releases = args.rounds  # one edge round per cloud round: one release per edge, per worker
    z = None if epsilon is None else noise_for_epsilon(epsilon, args.delta, releases, kind=kind)
    edge: dict[str, Any] = {"name": "edge", "rounds": 1, "deadline_s": 60}
    worker: dict[str, Any] = {"name": "worker", "uplink_codec": "q8"}
    if kind == "central" and z is not None:
        edge["privacy"] = {
            "clip_norm": args.clip,
            "noise_multiplier": z,
            "target_quantile": 0.5,
            "delta": args.delta,
            "seed": seed,
        }
    if kind == "local" and z is not None:
        worker["local_privacy"] = {
            "clip_norm": args.clip,
            "noise_multiplier": z,
            "delta": args.delta,
            "seed": seed,
        }
    config = FederationConfig.model_validate(
        {
            "federation": f"dp-{kind}",
            "levels": [{"name": "cloud", "rounds": args.rounds, "deadline_s": 60}, edge, worker],
            "fanout": [args.edges, args.workers_per_edge],
            "seed": seed,
            "task": {
                "dataset": "digits",
                "model": "mlp",
                "hidden": 64,
                "seed": seed,
                "partition": {"scheme": "iid", "seed": seed},
                "train": {"epochs": args.epochs, "batch_size": 16, "learning_rate": args.lr},
            },
        }
    )
    return config, z


def run(args: argparse.Namespace, seed: int, kind: str, epsilon: float | None) -> dict[str, Any]:
    config, z = federation(args, seed, kind, epsilon)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as out:
        summary = asyncio.run(
            simulate(config, Path(out), processes=args.processes, log_level=logging.ERROR)
        )
    level = {"central": "edge", "local": "worker"}.get(kind)
    spent = (summary.get("privacy") or {}).get(level or "", {})
    record = {
        "kind": kind if epsilon is not None else "none",
        "epsilon_target": epsilon,
        "epsilon_reported": spent.get("epsilon"),
        "releases": spent.get("releases"),
        "noise_multiplier": None if z is None else round(z, 4),
        "seed": seed,
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary.get("best_accuracy"),
        "global_rounds": summary["global_rounds"],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    z_text = _fmt(record["noise_multiplier"], ".3f")
    print(
        f"seed {seed} {record['kind']:>7} eps {_fmt(epsilon, 'g')}: z {z_text}, "
        f"reported eps {_fmt(record['epsilon_reported'], '.3f')}, final accuracy "
        f"{record['final_accuracy']:.4f} ({record['wall_seconds']:.0f} s)",
        flush=True,
    )
    return record


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range of the final accuracy per (kind, target epsilon)."""
    rows = accuracy_spread(records, ("kind", "epsilon_target"), "final_accuracy")
    return [{"kind": r.pop("kind"), "epsilon": r.pop("epsilon_target")} | r for r in rows]


def check_targets(records: list[dict[str, Any]], summary: list[dict[str, Any]]) -> dict[str, Any]:
    """What the benchmark can check of itself: every run spent no more than its budget, by the
    epsilon its own nodes reported; the largest budget costs central DP little accuracy; and at
    the budgets where accuracy is above chance, central DP (noise once, on the sum) beats local
    DP (noise on every worker's delta) as the theory says it must."""
    private = [r for r in records if r["kind"] != "none"]
    worst = max(
        (r["epsilon_reported"] / r["epsilon_target"] for r in private if r["epsilon_reported"]),
        default=None,
    )
    within = all(r["epsilon_reported"] is not None for r in private) and (
        worst is None or worst <= 1.001
    )
    targets: dict[str, Any] = {
        "every run's reported epsilon within its target": {
            "met": within,
            "measured_worst_ratio": None if worst is None else round(worst, 5),
        }
    }
    median = {(p["kind"], p["epsilon"]): p["accuracy_median"] for p in summary}
    budgets = sorted({e for k, e in median if k == "central" and e is not None})
    baseline = median.get(("none", None))
    if budgets and baseline is not None:
        top = median[("central", budgets[-1])]
        targets[f"central DP at epsilon {budgets[-1]:g} within 3 points of no DP"] = {
            "met": top >= baseline - 0.03,
            "measured_points": round(100 * (top - baseline), 2),
        }
    above_chance = [e for e in budgets if ("local", e) in median and median[("central", e)] > 0.4]
    if above_chance:
        targets["central beats local DP at the same epsilon, where above chance"] = {
            "met": all(median[("central", e)] > median[("local", e)] for e in above_chance),
            "measured": [[e, median[("central", e)], median[("local", e)]] for e in above_chance],
        }
    return targets


def plot(result: dict[str, Any], path: Path) -> None:
    plt = load_pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    baseline = [p for p in result["summary"] if p["kind"] == "none"]
    for kind, marker in zip(KINDS, "os", strict=True):
        points = sorted(
            (p for p in result["summary"] if p["kind"] == kind), key=lambda p: p["epsilon"]
        )
        if not points:
            continue
        xs = [p["epsilon"] for p in points]
        ax.plot(xs, [p["accuracy_median"] for p in points], marker=marker, label=f"{kind} DP")
        ax.fill_between(
            xs,
            [p["accuracy_min"] for p in points],
            [p["accuracy_max"] for p in points],
            alpha=0.2,
        )
    if baseline:
        ax.axhline(baseline[0]["accuracy_median"], color="gray", linestyle="--", label="no DP")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon (delta {result['delta']:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"digits MLP, {result['workers']} workers under {result['edges']} edges, "
        f"{result['rounds']} rounds"
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def render(result: dict[str, Any]) -> str:
    """The RESULTS.md table: accuracy per kind and epsilon, median [range]."""
    lines = [
        "| privacy | epsilon (delta "
        + f"{result['delta']:g}) | noise multiplier | final accuracy, median [range] |",
        "|---|---|---|---|",
    ]
    noise = {(r["kind"], r["epsilon_target"]): r["noise_multiplier"] for r in result["records"]}
    for p in sorted(result["summary"], key=lambda p: (p["kind"], p["epsilon"] or 1e9)):
        z = noise[(p["kind"], p["epsilon"])]
        lines.append(
            f"| {p['kind']} | {_fmt(p['epsilon'], 'g')} | {_fmt(z, '.3f')} | "
            f"{p['accuracy_median']:.3f} [{p['accuracy_min']:.3f}, {p['accuracy_max']:.3f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="accuracy against epsilon")
    parser.add_argument("--render", metavar="JSON", type=Path, help="print RESULTS.md's table")
    parser.add_argument("--epsilons", type=float, nargs="*", default=list(EPSILONS))
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=0.5, help="clip norm (central: the first)")
    parser.add_argument("--rounds", type=int, default=20, help="cloud rounds")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.3, help="local learning rate")
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
        records.append(run(args, seed, "none", None))
        for kind in args.kinds:
            for epsilon in args.epsilons:
                records.append(run(args, seed, kind, epsilon))
    summary = summarize(records)
    result = {
        "benchmark": "dp",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "workers": args.edges * args.workers_per_edge,
        "edges": args.edges,
        "rounds": args.rounds,
        "delta": args.delta,
        "clip": args.clip,
        "records": records,
        "summary": summary,
    }
    result["targets"] = check_targets(records, summary)
    print(render(result), end="")
    print_targets(result["targets"])
    write_json(args.json, result)
    if args.plot is not None:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
