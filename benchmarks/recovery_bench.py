"""Recovery benchmark: how fast a federation goes on after its broker crashes and comes back.

A 3-level federation (a synchronous cloud, ``--edges`` edges of ``--workers-per-edge`` workers,
digits, softmax) runs on one private Mosquitto, every node a real MQTT client in this process.
Once the cloud has closed ``--crash-after`` global rounds the broker is killed (SIGKILL), stays
down ``--outage-s`` seconds, and is started again on the same port: with persistence (its
database as Mosquitto last saved it, every ``autosave_interval`` = 10 s by default) and without
(no session, no subscription, no retained model: everything forgotten).

Per run: ``recovery_s``, seconds from the broker accepting connections again to the first
update an aggregator accepts after that; ``round_after_s``, to the cloud's next global round;
``lost``, updates sent up that their parent never accepted (by update id); and whether any
round waited for its deadline (``--deadline-s``, 30 s). The clock starts when the restarted
broker's port accepts TCP and its log says it is running (``MosquittoBroker.start``). Each
setting runs ``--repeats`` times, alternating persistence on and off; the median and the range
are reported. Target: ``recovery_s`` <= 3 s for both, no update lost.

    python benchmarks/recovery_bench.py --json recovery.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import BrokerAddress, FederationConfig, LevelConfig
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.roles.report import NodeReport
from hfl_mqtt.sim import configure_logging
from hfl_mqtt.tasks.base import TaskConfig

TARGET_RECOVERY_S = 3.0


def federation(args: argparse.Namespace, persistence: bool, repeat: int) -> FederationConfig:
    round_settings = {"deadline_s": args.deadline_s, "min_fraction": 1.0}
    return FederationConfig(
        federation=f"recovery-{'persist' if persistence else 'amnesia'}-{repeat}",
        levels=[
            LevelConfig(name="cloud", rounds=args.rounds, downlink_codec="fp16", **round_settings),
            LevelConfig(name="edge", rounds=1, uplink_codec="q8", **round_settings),
            LevelConfig(name="worker", uplink_codec="q8"),
        ],
        fanout=[args.edges, args.workers_per_edge],
        task=TaskConfig.model_validate(
            {
                "dataset": "digits",
                "model": "softmax",
                "partition": {"scheme": "iid"},
                "train": {"epochs": args.epochs, "batch_size": 16, "learning_rate": 0.1},
            }
        ),
    )


async def run_once(
    args: argparse.Namespace, persistence: bool, repeat: int, workdir: Path
) -> dict[str, Any]:
    config = federation(args, persistence, repeat)
    broker = MosquittoBroker(BrokerConfig(persistence=persistence), workdir)
    await asyncio.to_thread(broker.start)
    try:
        nodes = config.node_configs({"cloud": BrokerAddress(host=broker.host, port=broker.port)})
        rounds: list[float] = []
        crashed = asyncio.Event()
        back: list[float] = []

        def on_event(event: dict[str, Any]) -> None:
            rounds.append(time.monotonic())
            if len(rounds) == args.crash_after:
                crashed.set()

        async def crash() -> None:
            await crashed.wait()
            await asyncio.sleep(0.05)  # into the next round: the workers are training
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(args.outage_s)
            await asyncio.to_thread(broker.start)
            back.append(time.monotonic())

        started = time.monotonic()
        async with asyncio.timeout(args.deadline_s * 3), asyncio.TaskGroup() as group:
            group.create_task(crash())
            runs = {n.node: group.create_task(run_node(n, on_event=on_event)) for n in nodes}
        reports: dict[str, NodeReport] = {name: task.result() for name, task in runs.items()}
    finally:
        await asyncio.to_thread(broker.close)
    restarted = back[0]
    accepted_after = [
        report.started + arrival.seconds
        for report in reports.values()
        for arrival in report.arrivals
        if report.started + arrival.seconds > restarted
    ]
    parents = {n.node: n.upstream.parent for n in nodes if n.upstream is not None}
    lost = sum(
        len(set(reports[node].sent_ids) - set(reports[parent].accepted_ids))
        for node, parent in parents.items()
    )
    next_round = [t for t in rounds if t > restarted]
    gaps = [b - a for a, b in zip([started, *rounds], rounds, strict=False)]
    return {
        "persistence": persistence,
        "repeat": repeat,
        "recovery_s": round(min(accepted_after) - restarted, 3) if accepted_after else None,
        "round_after_s": round(next_round[0] - restarted, 3) if next_round else None,
        "lost": lost,
        "resent": sum(r.resent for r in reports.values()),
        "duplicates_refused": sum(r.updates_rejected.get("duplicate", 0) for r in reports.values()),
        "waited_for_deadline": any(gap >= args.deadline_s for gap in gaps),
        "global_rounds": len(rounds),
        "final_accuracy": round(reports["cloud"].evaluations[-1]["accuracy"], 4),
    }


def summarize(records: list[dict[str, Any]], persistence: bool) -> dict[str, Any]:
    mine = [r for r in records if r["persistence"] == persistence]
    recovery = [r["recovery_s"] for r in mine if r["recovery_s"] is not None]
    summary: dict[str, Any] = {
        "runs": len(mine),
        "recovered_runs": len(recovery),
        "lost": sum(r["lost"] for r in mine),
        "waited_for_deadline": sum(r["waited_for_deadline"] for r in mine),
    }
    if recovery:
        summary |= {
            "recovery_s_median": round(statistics.median(recovery), 3),
            "recovery_s_range": [min(recovery), max(recovery)],
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--workers-per-edge", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="global rounds per run")
    parser.add_argument("--epochs", type=int, default=20, help="local epochs (round length)")
    parser.add_argument("--crash-after", type=int, default=2, help="global rounds before")
    parser.add_argument("--outage-s", type=float, default=3.0)
    parser.add_argument("--deadline-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    saved_logging = structlog.get_config()
    configure_logging(logging.ERROR)
    records: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hfl-recovery-") as tmp:
            for repeat in range(args.repeats):
                # Alternate which setting goes first, so neither always runs on a warmer machine.
                order = (True, False) if repeat % 2 == 0 else (False, True)
                for persistence in order:
                    workdir = Path(tmp) / f"{repeat}-{persistence}"
                    record = asyncio.run(run_once(args, persistence, repeat, workdir))
                    records.append(record)
                    print(
                        f"persistence {'on ' if persistence else 'off'}  run {repeat}: "
                        f"recovery {record['recovery_s']} s, next round "
                        f"{record['round_after_s']} s, lost {record['lost']}, "
                        f"re-sent {record['resent']}",
                        flush=True,
                    )
    finally:
        structlog.configure(**saved_logging)
    by_setting = {
        "persistence": summarize(records, True),
        "no_persistence": summarize(records, False),
    }
    targets = {
        f"recovery_s <= {TARGET_RECOVERY_S} ({name})": (
            "met"
            if s["recovered_runs"] == s["runs"] and s["recovery_s_range"][1] <= TARGET_RECOVERY_S
            else "missed"
        )
        for name, s in by_setting.items()
    }
    targets["no update lost"] = "met" if all(r["lost"] == 0 for r in records) else "missed"
    targets["no round waits for its deadline"] = (
        "met" if not any(r["waited_for_deadline"] for r in records) else "missed"
    )
    print()
    print(f"{'broker':<16}{'recovery s (median)':>22}{'range':>18}{'lost':>6}")
    for name, s in by_setting.items():
        spread = s.get("recovery_s_range", ["-", "-"])
        print(
            f"{name:<16}{s.get('recovery_s_median', '-')!s:>22}"
            f"{f'{spread[0]}-{spread[1]}':>18}{s['lost']:>6}"
        )
    for target, state in targets.items():
        print(f"target {target}: {state}")
    result = {
        "benchmark": "recovery",
        "command": " ".join(
            ["python", "benchmarks/recovery_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "summary": by_setting,
        "targets": targets,
        "records": records,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(state == "met" for state in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
