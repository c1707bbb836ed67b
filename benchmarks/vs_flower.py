"""Side by side with Flower: flat Flower FedAvg against hfl-mqtt with edges, same task, same bytes.

The same federated task runs two ways, one after the other, per model:

(a) **flower**: flat FedAvg with Flower's own server (``flwr.server.start_server``) in one
    process and its clients (``flwr.client.start_client`` with a ``NumPyClient``) in
    ``--processes`` processes over loopback gRPC. Every client trains every round
    (``fraction_fit`` 1).
(b) **hfl-mqtt**: 1 cloud and ``--edges`` edges, each edge with its own Mosquitto broker bridged
    to the cloud's (``brokers: per_edge``), q8 uplinks at every level and fp16 downlinks; each edge
    runs ``--tau`` rounds per cloud round. Workers run in ``--processes`` processes.

Both use the same data (digits, Dirichlet(0.5) over ``--workers`` clients), the same model
(the numpy MLP of ``--hidden`` units, or softmax regression), the same local training per run
(2 epochs, batch 16), and the same number of local training runs per client: ``--rounds`` Flower
rounds, ``--rounds / --tau`` cloud rounds. The Flower client is a plain ``NumPyClient`` around
the very task the hfl-mqtt workers train.

The cloud's network link is metered the same way for both (``hfl_mqtt.linkmeter``, a
byte-counting TCP proxy, TCP payload both ways): in front of the Flower server, which every
client reaches, and in front of the cloud broker, which the edges' bridges reach. For hfl-mqtt
the worker-to-edge links are metered too (``total_bytes``); for Flower, the cloud link is every
link. ``cloud_link_bytes`` is what crossed the cloud link until the first evaluation at or above
``--target`` (the whole run's in ``cloud_link_bytes_run``); ``seconds_to_target`` is the time from
the top server's start to that evaluation.

    python benchmarks/vs_flower.py --json vs_flower.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from hfl_mqtt.config import FederationConfig, LevelConfig
from hfl_mqtt.linkmeter import LinkMeter
from hfl_mqtt.sim import configure_logging, read_evaluations, simulate
from hfl_mqtt.tasks.base import TaskConfig, load_task

TARGET_BYTES_RATIO = 25.0
"""Cloud-link bytes to the target: flat Flower over hfl-mqtt."""


def task_config(args: argparse.Namespace, model: str) -> TaskConfig:
    return TaskConfig.model_validate(
        {
            "dataset": "digits",
            "model": model,
            "hidden": args.hidden,
            "seed": args.seed,
            "partition": {"scheme": "dirichlet", "alpha": 0.5, "seed": args.seed},
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": args.lr},
        }
    )


# --- flat Flower ----------------------------------------------------------------------------


def _flower_server(address: str, task: str, workers: int, rounds: int, out: str) -> None:
    """The Flower server process: FedAvg over every client, centralized evaluation per round."""
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    _quiet_flower()
    config = TaskConfig.model_validate_json(task)
    evaluator = load_task(config, None, workers)
    initial = evaluator.get_weights()
    names = list(initial)
    started = time.monotonic()
    events: list[dict[str, Any]] = []

    def evaluate(server_round: int, arrays: list[Any], _: dict[str, Any]) -> Any:
        evaluator.set_weights(dict(zip(names, arrays, strict=True)))
        result = evaluator.evaluate()
        events.append(
            {
                "round": server_round,
                "accuracy": result.accuracy,
                "seconds": time.monotonic() - started,
                "wall": time.time(),
            }
        )
        return result.loss, {"accuracy": result.accuracy}

    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=workers,
        min_available_clients=workers,
        evaluate_fn=evaluate,
        initial_parameters=ndarrays_to_parameters(list(initial.values())),
    )
    fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    Path(out).write_text(json.dumps(events))


def _flower_clients(address: str, task: str, workers: int, partitions: list[int]) -> None:
    """One client process: a NumPyClient per partition, each on its own thread."""
    import flwr as fl

    _quiet_flower()
    config = TaskConfig.model_validate_json(task)

    class TaskClient(fl.client.NumPyClient):
        def __init__(self, partition: int) -> None:
            self.task = load_task(config, partition, workers)
            self.names = list(self.task.get_weights())

        def get_parameters(self, config: dict[str, Any]) -> list[Any]:
            return list(self.task.get_weights().values())

        def fit(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            self.task.set_weights(dict(zip(self.names, parameters, strict=True)))
            result = self.task.train(config_train)
            return list(self.task.get_weights().values()), result.num_examples, {}

        def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            return 0.0, 0, {}

    config_train = config.train
    threads = [
        threading.Thread(
            target=fl.client.start_client,
            kwargs={
                "server_address": address,
                "client": TaskClient(p).to_client(),
                "insecure": True,
            },
            daemon=True,
        )
        for p in partitions
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _quiet_flower() -> None:
    """Flower logs every connection and round at INFO, and deprecations at WARNING."""
    logging.getLogger("flwr").setLevel(logging.ERROR)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the Flower server did not listen on port {port} in {timeout} s")


class Sampler:
    """Samples a meter's count every 50 ms (wall clock), to read off the bytes at any time."""

    def __init__(self, meter: LinkMeter) -> None:
        self.meter = meter
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.time(), self.meter.counts().total))

    def at(self, wall: float) -> int:
        """Bytes counted by ``wall`` (the first sample at or after it)."""
        for when, total in self.samples:
            if when >= wall:
                return total
        return self.meter.counts().total

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def run_flower(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    task = task_config(args, model).model_dump_json()
    port = _free_port()
    events_file = workdir / f"flower-{model}.json"
    started = time.monotonic()
    server = context.Process(
        target=_flower_server,
        args=(f"127.0.0.1:{port}", task, args.workers, args.rounds, str(events_file)),
    )
    server.start()
    _wait_listening(port, 60)
    with LinkMeter("127.0.0.1", port) as meter, Sampler(meter).running() as sampler:
        address = f"{meter.host}:{meter.port}"
        shares = [list(range(args.workers))[i :: args.processes] for i in range(args.processes)]
        clients = [
            context.Process(target=_flower_clients, args=(address, task, args.workers, share))
            for share in shares
        ]
        for process in clients:
            process.start()
        server.join()
        for process in clients:
            process.join(30)
            if process.is_alive():
                process.terminate()
        counts = meter.counts()
    if server.exitcode != 0:
        raise RuntimeError(f"the Flower server failed (exit code {server.exitcode})")
    events = json.loads(events_file.read_text())
    reached = next((e for e in events if e["accuracy"] >= args.target), None)
    return {
        "system": "flower",
        "model": model,
        "cloud_link_bytes": sampler.at(reached["wall"]) if reached else None,
        "cloud_link_bytes_run": counts.total,
        "total_bytes": counts.total,
        "seconds_to_target": round(reached["seconds"], 3) if reached else None,
        "final_accuracy": events[-1]["accuracy"],
        "rounds": args.rounds,
        "local_runs_per_client": args.rounds,
        "wall_seconds": round(time.monotonic() - started, 3),
    }


# --- hfl-mqtt -------------------------------------------------------------------------------


def federation(args: argparse.Namespace, model: str) -> FederationConfig:
    per_edge, extra = divmod(args.workers, args.edges)
    if extra:
        raise SystemExit(f"--workers {args.workers} is not a multiple of --edges {args.edges}")
    return FederationConfig(
        federation=f"vs-flower-{model}",
        brokers="per_edge",
        levels=[
            LevelConfig(
                name="cloud",
                rounds=args.rounds // args.tau,
                deadline_s=120,
                min_fraction=1.0,
                downlink_codec="fp16",
            ),
            LevelConfig(
                name="edge",
                rounds=args.tau,
                deadline_s=120,
                min_fraction=1.0,
                uplink_codec="q8",
                downlink_codec="fp16",
            ),
            LevelConfig(name="worker", uplink_codec="q8"),
        ],
        fanout=[args.edges, per_edge],
        task=task_config(args, model),
    )


def run_hfl(args: argparse.Namespace, model: str, workdir: Path) -> dict[str, Any]:
    config = federation(args, model)
    started = time.monotonic()
    out = workdir / f"hfl-{model}"
    summary = asyncio.run(
        simulate(config, out, processes=args.processes, log_level=logging.ERROR, meter_links=True)
    )
    events = read_evaluations(out / "metrics.jsonl")
    reached = next((e for e in events if e["accuracy"] >= args.target), None)
    links = summary["links"]
    cloud = links["cloud"]["up"] + links["cloud"]["down"]
    return {
        "system": "hfl-mqtt",
        "model": model,
        "cloud_link_bytes": reached["cloud_link_bytes"] if reached else None,
        "cloud_link_bytes_run": cloud,
        "total_bytes": sum(link["up"] + link["down"] for link in links.values()),
        "seconds_to_target": round(reached["seconds"], 3) if reached else None,
        "final_accuracy": summary["final_accuracy"],
        "rounds": summary["global_rounds"],
        "local_runs_per_client": summary["global_rounds"] * args.tau,
        "wall_seconds": round(time.monotonic() - started, 3),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    parser.add_argument(
        "--models", nargs="+", choices=["mlp", "softmax"], default=["mlp", "softmax"]
    )
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1536, help="MLP units (1536: 115k params)")
    parser.add_argument("--rounds", type=int, default=40, help="Flower rounds (local runs each)")
    parser.add_argument("--tau", type=int, default=2, help="edge rounds per cloud round")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="keep each run's files here")
    args = parser.parse_args(argv)
    workdir = args.out or Path(tempfile.mkdtemp(prefix="hfl-vs-flower-"))
    workdir.mkdir(parents=True, exist_ok=True)
    saved_logging = structlog.get_config()
    configure_logging(logging.WARNING)
    records, comparisons = [], []
    try:
        for model in args.models:
            flower = run_flower(args, model, workdir)
            _say(flower)
            ours = run_hfl(args, model, workdir)
            _say(ours)
            records += [flower, ours]
            comparison = {
                "model": model,
                "cloud_link_bytes_ratio": _ratio(
                    flower["cloud_link_bytes"], ours["cloud_link_bytes"]
                ),
                "total_bytes_ratio": _ratio(flower["total_bytes"], ours["total_bytes"]),
                "speedup_to_target": _ratio(flower["seconds_to_target"], ours["seconds_to_target"]),
                "accuracy_gap_points": round(
                    100 * (ours["final_accuracy"] - flower["final_accuracy"]), 2
                ),
            }
            comparisons.append(comparison)
            print(f"  {model}: {json.dumps(comparison)}", flush=True)
    finally:
        structlog.configure(**saved_logging)
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "vs_flower",
        "command": " ".join(
            ["python", "benchmarks/vs_flower.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "target_accuracy": args.target,
        "target_cloud_link_bytes_ratio": TARGET_BYTES_RATIO,
        "comparisons": comparisons,
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "records": records,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _say(record: dict[str, Any]) -> None:
    print(
        f"{record['system']:>9} {record['model']:>7}: {record['rounds']} rounds, final accuracy "
        f"{record['final_accuracy']:.4f}, target in {record['seconds_to_target']} s, cloud link "
        f"{record['cloud_link_bytes']} bytes to target ({record['cloud_link_bytes_run']} in all), "
        f"all links {record['total_bytes']} ({record['wall_seconds']:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
