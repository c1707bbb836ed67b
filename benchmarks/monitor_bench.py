"""Keep-up benchmark: the live dashboard of a 1,000-worker simulation, refreshed every second.

``hfl-mqtt sim FED.yaml --web`` runs a 3-level federation (a cloud, ``--edges`` edges of
``--workers-per-edge`` workers, digits, softmax, every node a real MQTT client on a private
Mosquitto, every node publishing its metrics record as shipped: an aggregator's at most every
1 s, a worker's every 5 s) and serves its dashboard. A second run of the same federation is
watched by a standalone ``hfl-mqtt monitor --web`` process instead. In each, the dashboard's
server-sent event stream is read here, as a browser reads it:

- ``refresh_gap_s``: the time between two pushed snapshots while the federation trains (from the
  first snapshot holding every node to the end of training); target: at most 1 s, every gap.
- ``lag_s``: how far behind the records the view runs (a snapshot's time minus the newest
  record's own time: ``totals.lag_s``); target: p95 at most 1 s.
- backlog growth: the median lag of the last third of the window minus that of the first
  third; target: at most 0.5 s (a monitor that falls behind lags more and more).
- ``nodes``: every node of the tree appears.

With ``--compare-off`` (the default) the same federation runs a third time with metrics records
off and no dashboard: the wall times and bytes say what the records and a dashboard cost a
1,000-worker simulation on 2 cores.

    python benchmarks/monitor_bench.py --json monitor.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from hfl_mqtt.brokers import free_port

TARGET_GAP_S = 1.0
TARGET_LAG_P95_S = 1.0
TARGET_GROWTH_S = 0.5
_BROKER_PORT = re.compile(r"broker\(s\) on ports (\d+)")


def federation(args: argparse.Namespace, *, metrics: bool) -> dict[str, Any]:
    return {
        "federation": "keepup",
        "levels": [
            {"name": "cloud", "rounds": args.rounds, "deadline_s": 60, "min_fraction": 0.9},
            {"name": "edge", "rounds": 1, "deadline_s": 30, "min_fraction": 0.9},
            {"name": "worker", "uplink_codec": "q8"},
        ],
        "fanout": [args.edges, args.workers_per_edge],
        # On: the defaults (an aggregator's record at most every 1 s, a worker's every 5 s).
        **({} if metrics else {"metrics_interval_s": 0, "worker_metrics_interval_s": 0}),
        "task": {
            "dataset": "digits",
            "model": "softmax",
            "partition": {"scheme": "iid", "seed": 0},
            "train": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
        },
    }


async def read_stream(url: str, events: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Collect every snapshot pushed on ``url`` (SSE) until ``stop``, retrying until it is up."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        while not stop.is_set():
            try:
                async with session.get(url) as response:
                    data: list[bytes] = []
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            data.append(line[5:].strip())
                        elif line in (b"\n", b"\r\n") and data:
                            received = time.time()
                            raw = b"".join(data)
                            data.clear()
                            events.append(summarise(json.loads(raw), len(raw), received))
                    return
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.2)


def summarise(snapshot: dict[str, Any], size: int, received: float) -> dict[str, Any]:
    totals = snapshot.get("totals", {})
    root = next((n for n in snapshot.get("nodes", []) if n.get("role") == "root"), None)
    return {
        "received": received,
        "t": snapshot.get("t"),
        "nodes": totals.get("nodes", 0),
        "online": totals.get("online", 0),
        "lag_s": totals.get("lag_s"),
        "root_round": None if root is None else root.get("round"),
        "size": size,
    }


def analyse(
    events: list[dict[str, Any]], expected_nodes: int, rounds: int, end: float
) -> dict[str, Any]:
    """The stream's numbers over the window from the first complete snapshot to the end of
    training: the first snapshot whose root has closed every round, else ``end``."""
    complete = [e for e in events if e["nodes"] >= expected_nodes]
    if not complete:
        return {"events": len(events), "complete": False, "nodes_seen": _most(events)}
    start = complete[0]["received"]
    done = [e for e in events if (e["root_round"] or 0) >= rounds]
    end = min(end, done[0]["received"]) if done else end
    window = [e for e in events if start <= e["received"] <= end]
    gaps = [b["received"] - a["received"] for a, b in itertools.pairwise(window)]
    lags = [e["lag_s"] for e in window if e["lag_s"] is not None]
    third = max(1, len(lags) // 3)
    return {
        "events": len(events),
        "complete": True,
        "nodes_seen": _most(events),
        "window_s": round(end - start, 2),
        "snapshots_in_window": len(window),
        "refresh_gap_s": _stats(gaps),
        # Gaps over the target, by when they came (seconds into the window).
        "long_gaps": [
            [round(b["received"] - start, 2), round(b["received"] - a["received"], 3)]
            for a, b in itertools.pairwise(window)
            if b["received"] - a["received"] > TARGET_GAP_S
        ],
        "lag_s": _stats(lags),
        "backlog_growth_s": round(
            statistics.median(lags[-third:]) - statistics.median(lags[:third]), 3
        )
        if lags
        else None,
        "snapshot_kb": round(statistics.median(e["size"] for e in window) / 1024, 1)
        if window
        else None,
    }


def _most(events: list[dict[str, Any]]) -> int:
    return max((e["nodes"] for e in events), default=0)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
    }


async def start_monitor(broker_port: int) -> tuple[asyncio.subprocess.Process, str]:
    """``hfl-mqtt monitor --web`` on the simulation's broker; its event stream's URL."""
    web_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "hfl_mqtt.cli", "monitor"],
        *["--broker", f"127.0.0.1:{broker_port}", "--federation", "keepup"],
        *["--no-terminal", "--web", f"127.0.0.1:{web_port}"],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{web_port}/api/events"


async def run_once(
    args: argparse.Namespace, workdir: Path, *, metrics: bool, watch: str | None
) -> dict[str, Any]:
    """One simulation; ``watch``: whose dashboard's stream is read throughout ("sim": the
    simulation's own ``--web``, "monitor": a standalone monitor's; one at a time, so that
    neither pays for the other)."""
    name = watch or "off"
    config = workdir / f"keepup-{name}.yaml"
    config.write_text(yaml.safe_dump(federation(args, metrics=metrics), sort_keys=False))
    out = workdir / f"out-{name}"
    sim_web = free_port()
    command = [sys.executable, "-m", "hfl_mqtt.cli", "sim", str(config), "--out", str(out)]
    if watch == "sim":
        command += ["--web", f"127.0.0.1:{sim_web}", "--web-linger", "3"]
    started = time.time()
    sim = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert sim.stdout is not None
    stop = asyncio.Event()
    events: list[dict[str, Any]] = []
    readers: list[asyncio.Task[None]] = []
    monitor: asyncio.subprocess.Process | None = None
    training_end = None
    output: list[str] = []
    try:
        if watch == "sim":
            url = f"http://127.0.0.1:{sim_web}/api/events"
            readers.append(asyncio.create_task(read_stream(url, events, stop)))
        async for raw in sim.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            print(f"  [sim] {line}", flush=True)
            found = _BROKER_PORT.search(line)
            if found and watch == "monitor" and monitor is None:
                monitor, url = await start_monitor(int(found.group(1)))
                readers.append(asyncio.create_task(read_stream(url, events, stop)))
            if line.startswith("results:"):
                training_end = training_end or time.time()
        code = await sim.wait()
    finally:
        stop.set()
        for reader in readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if monitor is not None and monitor.returncode is None:
            monitor.terminate()
            await monitor.wait()
        if sim.returncode is None:
            sim.kill()
            await sim.wait()
    if code != 0:
        raise SystemExit(f"the simulation failed ({code}):\n" + "\n".join(output[-30:]))
    return outcome(
        args,
        out,
        metrics=metrics,
        elapsed=time.time() - started,
        events=events if watch else None,
        end=training_end or time.time(),
    )


def outcome(
    args: argparse.Namespace,
    out: Path,
    *,
    metrics: bool,
    elapsed: float,
    events: list[dict[str, Any]] | None,
    end: float,
) -> dict[str, Any]:
    """A run's numbers: its summary.json's, and its dashboard stream's."""
    summary = json.loads((out / "summary.json").read_text())
    expected = 1 + args.edges + args.edges * args.workers_per_edge
    result: dict[str, Any] = {
        "metrics": metrics,
        "wall_seconds": summary["wall_seconds"],
        "elapsed_s": round(elapsed, 1),
        "final_accuracy": summary["final_accuracy"],
        "total_bytes": summary["total_bytes"],
        "metrics_bytes": _metrics_bytes(summary),
        "metrics_share": round(
            _metrics_bytes(summary) / (summary["total_bytes"] + _metrics_bytes(summary)), 4
        ),
        "nodes": expected,
    }
    if events is not None:
        result["dashboard"] = analyse(events, expected, args.rounds, end)
    return result


def _metrics_bytes(summary: dict[str, Any]) -> int:
    """Bytes the nodes published on their metrics topics (``by_kind`` of every link)."""
    total = 0
    for node in summary.get("nodes", []):
        links = [node.get(side) for side in ("up", "down")]
        if links[0] is not None and links[0] == links[1]:
            links = links[:1]
        for link in links:
            if link is not None:
                total += link.get("by_kind", {}).get("metrics", {}).get("bytes_sent", 0)
    return total


def check(results: dict[str, Any]) -> dict[str, str]:
    targets: dict[str, str] = {}
    for name in [name for name in ("sim", "monitor") if name in results]:
        stream = results[name]["dashboard"]
        ok_nodes = stream["complete"]
        gap = stream.get("refresh_gap_s") or {}
        lag = stream.get("lag_s") or {}
        growth = stream.get("backlog_growth_s")
        targets[f"{name}: every node shown"] = "met" if ok_nodes else "missed"
        targets[f"{name}: a refresh at least every {TARGET_GAP_S:g} s"] = (
            "met" if ok_nodes and gap and gap["max"] <= TARGET_GAP_S else "missed"
        )
        targets[f"{name}: lag p95 <= {TARGET_LAG_P95_S:g} s"] = (
            "met" if ok_nodes and lag and lag["p95"] <= TARGET_LAG_P95_S else "missed"
        )
        targets[f"{name}: backlog growth <= {TARGET_GROWTH_S:g} s"] = (
            "met" if growth is not None and growth <= TARGET_GROWTH_S else "missed"
        )
    return targets


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results = {
        name: await run_once(args, workdir, metrics=True, watch=name) for name in args.dashboards
    }
    if args.compare_off:
        results["off"] = await run_once(args, workdir, metrics=False, watch=None)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--edges", type=int, default=10)
    parser.add_argument("--workers-per-edge", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12, help="global rounds")
    parser.add_argument(
        "--compare-off",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run with metrics records off (default: on)",
    )
    parser.add_argument(
        "--dashboards",
        type=lambda value: value.split(","),
        default=["sim", "monitor"],
        help="whose dashboards to watch, one run each (default: sim,monitor)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if not args.dashboards or set(args.dashboards) - {"sim", "monitor"}:
        parser.error("--dashboards: sim, monitor or both (comma-separated)")
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = asyncio.run(run(args, workdir))
    targets = check(results)
    nodes = 1 + args.edges * (1 + args.workers_per_edge)
    print(f"\n{nodes} nodes, {args.rounds} global rounds:")
    for run_name, result in results.items():
        print(
            f"  {run_name}: {result['wall_seconds']:.1f} s, models and deltas "
            f"{result['total_bytes'] / 1e6:.1f} MB, metrics records "
            f"{result['metrics_bytes'] / 1e6:.2f} MB ({result['metrics_share']:.1%}), "
            f"final accuracy {result['final_accuracy']:.4f}"
        )
    for name in args.dashboards:
        print(f"  {name} dashboard: {json.dumps(results[name]['dashboard'])}")
    for target, state in targets.items():
        print(f"  {state:6} {target}")
    document = {
        "benchmark": "monitor_keep_up",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
        },
        "parameters": vars(args) | {"json": str(args.json), "workdir": str(args.workdir)},
        "results": results,
        "targets": targets,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1))
    return 0 if all(state == "met" for state in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
