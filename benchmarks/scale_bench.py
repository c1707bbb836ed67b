"""Scale benchmark: thousands of real MQTT workers in one ``hfl-mqtt sim`` on this machine.

For each size in ``--sizes`` (default 1,000, 2,000, 5,000 and 10,000 workers) a 3-level
federation runs as ``hfl-mqtt sim`` in a process of its own: a cloud, edges of
``--workers-per-edge`` workers (500), ``--rounds`` global rounds (5) of one edge round each,
one private Mosquitto, the workers in one process per core; Synthetic(0.5, 0.5), softmax, one
local epoch at lr 0.1 with FedProx (``proximal_mu`` 1: the device sizes are heavy-tailed, and
the few devices with tens of thousands of samples make plain FedAvg's loss rise once there are
thousands of devices), metrics records off (their cost is ``monitor_bench.py``'s). While it
runs, every second, the resident memory of its worker processes and the broker's CPU time are
read from ``/proc``.

Per size: ``seconds_per_round`` (the median gap between global rounds after the first, so
start-up is apart: ``first_round_s``), ``rss_mb_per_worker`` (the worker processes' peak RSS
summed, over the workers), ``broker_cpu_s``, ``tracebacks`` (in the simulator's output),
``loss_first`` and ``loss_last``. Targets: every size completes with no traceback and a falling
loss.

    python benchmarks/scale_bench.py --json scale.json
"""

from __future__ import annotations

import argparse
import asyncio
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

import yaml

_ROUND = re.compile(r"round +(\d+)/\d+ +accuracy ([\d.]+) +loss ([\d.]+) +([\d.]+) s")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def federation(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    edges = max(1, workers // args.workers_per_edge)
    return {
        "federation": f"scale-{workers}",
        "levels": [
            {"name": "cloud", "rounds": args.rounds, "deadline_s": 300, "min_fraction": 0.9},
            {"name": "edge", "rounds": 1, "deadline_s": 120, "min_fraction": 0.9},
            {"name": "worker", "uplink_codec": "q8"},
        ],
        "fanout": [edges, workers // edges],
        "metrics_interval_s": 0,
        "worker_metrics_interval_s": 0,
        "task": {
            "dataset": "synthetic",
            "synthetic": {"alpha": 0.5, "beta": 0.5},
            "model": "softmax",
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 0.1,
                "proximal_mu": args.proximal_mu,
            },
        },
    }


def _processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            found[int(entry.name)] = (ppid, cmdline)
    return found


def _below(pid: int, processes: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _) in processes.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_s(pid: int) -> float:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def run_size(workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = workdir / f"scale-{workers}.yaml"
    config.write_text(yaml.safe_dump(federation(workers, args), sort_keys=False))
    out = workdir / f"out-{workers}"
    sim = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "hfl_mqtt.cli", "sim", str(config), "--out", str(out)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert sim.stdout is not None
    started = time.monotonic()
    rounds: list[tuple[int, float, float, float]] = []
    output: list[str] = []
    peak_rss, broker_cpu = 0, 0.0

    async def sample() -> None:
        nonlocal peak_rss, broker_cpu
        while True:
            processes = _processes()
            below = _below(sim.pid, processes)
            spawned = [p for p in below if "multiprocessing.spawn" in processes[p][1]]
            peak_rss = max(peak_rss, sum(_rss(p) for p in spawned))
            for pid in below:
                if "mosquitto" in processes[pid][1]:
                    broker_cpu = max(broker_cpu, _cpu_s(pid))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    try:
        async for raw in sim.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            found = _ROUND.search(line)
            if found:
                number, accuracy, loss, seconds = found.groups()
                rounds.append((int(number), float(accuracy), float(loss), float(seconds)))
                print(f"  {workers} workers: {line.strip()}", flush=True)
        code = await sim.wait()
    finally:
        sampler.cancel()
        if sim.returncode is None:
            sim.kill()
            await sim.wait()
    gaps = [b[3] - a[3] for a, b in itertools.pairwise(rounds)]
    return {
        "workers": workers,
        "edges": max(1, workers // args.workers_per_edge),
        "exit_code": code,
        "rounds": len(rounds),
        "elapsed_s": round(time.monotonic() - started, 1),
        "first_round_s": rounds[0][3] if rounds else None,
        "seconds_per_round": round(statistics.median(gaps), 2) if gaps else None,
        "rss_mb_per_worker": round(peak_rss / workers / 2**20, 3),
        "broker_cpu_s": round(broker_cpu, 1),
        "tracebacks": sum("Traceback" in line for line in output),
        "loss_first": rounds[0][2] if rounds else None,
        "loss_last": rounds[-1][2] if rounds else None,
        "accuracy_last": rounds[-1][1] if rounds else None,
        "losses": [r[2] for r in rounds],
    }


def check(records: list[dict[str, Any]], rounds: int) -> dict[str, str]:
    targets = {}
    for r in records:
        size = f"{r['workers']:,} workers"
        done = r["exit_code"] == 0 and r["rounds"] == rounds
        targets[f"{size}: completes"] = "met" if done else "missed"
        targets[f"{size}: no traceback"] = "met" if r["tracebacks"] == 0 else "missed"
        falling = r["loss_last"] is not None and r["loss_last"] < r["loss_first"]
        targets[f"{size}: loss falls"] = "met" if done and falling else "missed"
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--sizes",
        type=lambda value: [int(v) for v in value.split(",")],
        default=[1000, 2000, 5000, 10000],
        help="workers per run, comma-separated (default 1000,2000,5000,10000)",
    )
    parser.add_argument("--workers-per-edge", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5, help="global rounds")
    parser.add_argument("--proximal-mu", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        for workers in args.sizes:
            records.append(asyncio.run(run_size(workers, args, workdir)))
    targets = check(records, args.rounds)
    print()
    for r in records:
        print(
            f"{r['workers']:>6} workers: {r['seconds_per_round']} s/round "
            f"(first round at {r['first_round_s']} s), {r['rss_mb_per_worker']} MB/worker, "
            f"broker {r['broker_cpu_s']} s CPU, {r['tracebacks']} tracebacks, "
            f"loss {r['loss_first']} -> {r['loss_last']}"
        )
    for target, state in targets.items():
        print(f"  {state:6} {target}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "benchmark": "scale",
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cores": os.cpu_count(),
            },
            "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "records": records,
            "targets": targets,
        }
        args.json.write_text(json.dumps(document, indent=1))
    return 0 if all(state == "met" for state in targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
