"""A Flower app (Message API) on Flower's deployment engine and on the MQTT tree, side by side.

The app is ``examples/flower_app`` (a template-style app: a ServerApp with FedAvg and a
server-side evaluation, a ClientApp training a PyTorch MLP on digits, 2 local epochs), unmodified,
for ``--rounds`` rounds of train and evaluate messages, as:

- **flower**: Flower's deployment engine, flat: a SuperLink, ``--workers`` SuperNodes (partition
  i of n each, Flower's default subprocess isolation: one ``flwr-clientapp`` process per
  message) and ``flwr run``. This is how a Flower user runs the app outside simulation.
- **hfl-flat**: the ServerApp at the root of a flat MQTT tree through the MQTT Grid, the
  ClientApp in process in ``--workers`` workers, npy (lossless) deltas up.
- **hfl-tree**: ``--edges`` edges between, q8 deltas up from workers and edges; each edge's
  workers on a broker of the edge's own (``brokers: per_edge``), bridged to the cloud's.

**Clock**: FedAvg's own (``Strategy execution finished in ...``, from its start to its last
aggregation, every node connected), read from the ServerApp's log on both sides; the whole run
(processes, brokers, app loading) is reported apart. **Bytes** on the wire: a byte-counting
proxy (``hfl_mqtt.linkmeter``) in front of the SuperLink for its SuperNodes, and in front of
every broker for the trees (``meter_links``): all links, and the cloud link (what reaches the
SuperLink or the root's broker; everything, for Flower and the flat tree). **Accuracy**: the
saved final model on the app's held-out test set, by the app's own code.

**Seeds**: ``--seeds`` (3) values of the app's ``seed`` (model init, shuffling), the order of the
systems reversed on every other seed; the median and the range. Checked (``targets``): hfl-tree
takes at most a fifth of Flower's strategy time per round (the median); its final accuracy is
within 2 points of Flower's; hfl-flat's model is Flower's to 1e-6 on every seed.

    python benchmarks/message_api_bench.py --json benchmarks/out/message_api.json
    python benchmarks/message_api_bench.py --render benchmarks/out/message_api.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

try:  # run as a module (tests) or as a script (python benchmarks/...)
    from benchmarks.targets import print_targets, write_json
except ImportError:
    from targets import print_targets, write_json  # type: ignore[no-redef,import-not-found]
from hfl_mqtt.brokers import free_port
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.linkmeter import LinkMeter
from hfl_mqtt.sim import configure_logging, simulate

APP = Path(__file__).resolve().parent.parent / "examples" / "flower_app"
BIN = Path(sys.executable).parent
SYSTEMS = ("flower", "hfl-flat", "hfl-tree")
STRATEGY_S = re.compile(r"Strategy execution finished in ([0-9.]+)s")
RUN_TIMEOUT_S = 1800.0


# --- Flower's deployment engine -------------------------------------------------------------------


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], name: str, timeout_s: float = 60
) -> None:
    """Until something accepts connections on ``port`` (``process``, ``name``, must stay up
    meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} ended with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


@contextlib.contextmanager
def flower_deployment(
    home: Path, supernodes: int, *, metered: bool = False
) -> Iterator[tuple[dict[str, str], LinkMeter | None]]:
    """A SuperLink and ``supernodes`` SuperNodes (partition i of ``supernodes``) on free
    loopback ports, the SuperNodes behind a byte meter if ``metered``; yields the environment
    for ``flwr run APP local`` (a SuperLink connection named ``local`` in ``home``) and the
    meter. Every process leads a session of its own, and its whole group is ended after."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> subprocess.Popen[bytes]:
        with (home / log).open("wb") as out:
            process = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(process)
        return process

    with contextlib.ExitStack() as stack:
        try:
            superlink = start(
                str(BIN / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--port",
                str(port),
                log="superlink.log",
            )
            wait_for_port(port, superlink, "the SuperLink")
            meter = stack.enter_context(LinkMeter("127.0.0.1", port)) if metered else None
            target = meter.port if meter is not None else port
            for i in range(supernodes):
                start(
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{target}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={supernodes}",
                    log=f"supernode-{i}.log",
                )
            yield env, meter
        finally:
            for process in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            for process in started:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def flwr_run(env: dict[str, str], run_config: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
    """``flwr run`` of the app on the deployment's SuperLink; its streamed output."""
    result = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "local", "--stream", "--run-config", run_config],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"flwr run failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


# --- the app's own evaluation ---------------------------------------------------------------------


def central_accuracy(model_file: Path) -> float:
    """The saved model's accuracy on the app's held-out test set, by the app's own code."""
    import torch

    sys.path.insert(0, str(APP))
    try:
        from digitsapp.task import Net, load_centralized_dataset, test  # type: ignore[import-not-found]

        net = Net()
        net.load_state_dict(torch.load(model_file))
        return float(test(net, load_centralized_dataset())[1])
    finally:
        sys.path.remove(str(APP))


def max_difference(a: Path, b: Path) -> float:
    import torch

    first, second = torch.load(a), torch.load(b)
    return max(float((first[k] - second[k]).abs().max()) for k in first)


# --- the systems ----------------------------------------------------------------------------------


def run_config(args: argparse.Namespace, seed: int, model: Path) -> dict[str, Any]:
    return {"num-server-rounds": args.rounds, "seed": seed, "final-model": str(model)}


def run_flower(args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    model = work / "model.pt"
    config = run_config(args, seed, model)
    overrides = " ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in config.items()
    )
    started = time.monotonic()
    with flower_deployment(work / "flower", args.workers, metered=True) as (env, meter):
        output = flwr_run(env, overrides)
        assert meter is not None
        counts = meter.counts()
    seconds = time.monotonic() - started
    found = STRATEGY_S.findall(output)
    if not found:
        raise RuntimeError("flwr run's output has no strategy time")
    return {
        "strategy_seconds": float(found[-1]),
        "run_seconds": round(seconds, 2),
        "bytes": counts.up + counts.down,
        "cloud_bytes": counts.up + counts.down,  # every SuperNode talks to the SuperLink
        "model": str(model),
    }


class _StrategyClock(logging.Handler):
    """Catches the ServerApp's own clock line, as Flower logs it in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = STRATEGY_S.search(record.getMessage())
        if found:
            self.seconds = float(found.group(1))


def federation(system: str, args: argparse.Namespace, seed: int, model: Path) -> FederationConfig:
    cloud = {"name": "cloud", "deadline_s": 300}
    if system == "hfl-flat":
        levels: list[dict[str, Any]] = [cloud, {"name": "worker", "uplink_codec": "npy"}]
        fanout = [args.workers]
    else:
        levels = [
            cloud,
            {"name": "edge", "rounds": 1, "deadline_s": 300, "uplink_codec": "q8"},
            {"name": "worker", "uplink_codec": "q8"},
        ]
        fanout = [args.edges, args.workers // args.edges]
    return FederationConfig.model_validate(
        {
            "federation": f"bench-{system}",
            "levels": levels,
            "fanout": fanout,
            # A site's workers talk to their edge on the site's broker; only edges use the cloud's.
            "brokers": "per_edge" if system == "hfl-tree" else "single",
            "task": {"flower_app": str(APP), "params": run_config(args, seed, model)},
        }
    )


def run_hfl(system: str, args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    model = work / "model.pt"
    import flwr.common.logger  # noqa: F401  (sets up Flower's console handler)

    clock = _StrategyClock()
    flower_log = logging.getLogger("flwr")
    # Flower's console lines stay out of the bench's output; the clock still reads them.
    quieted = {handler: handler.level for handler in flower_log.handlers}
    for handler in quieted:
        handler.setLevel(logging.WARNING)
    flower_log.addHandler(clock)
    started = time.monotonic()
    try:
        summary = asyncio.run(
            simulate(
                federation(system, args, seed, model),
                work / "out",
                processes=args.processes,
                meter_links=True,
                workers_first=True,
            )
        )
    finally:
        flower_log.removeHandler(clock)
        for handler, level in quieted.items():
            handler.setLevel(level)
    if clock.seconds is None:
        raise RuntimeError("the ServerApp logged no strategy time")
    return {
        "strategy_seconds": clock.seconds,
        "run_seconds": round(time.monotonic() - started, 2),
        "bytes": sum(link["up"] + link["down"] for link in summary["links"].values()),
        "cloud_bytes": summary["links"]["cloud"]["up"] + summary["links"]["cloud"]["down"],
        "model": str(model),
    }


def run(system: str, args: argparse.Namespace, seed: int, order: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    measured = (
        run_flower(args, seed, work) if system == "flower" else run_hfl(system, args, seed, work)
    )
    record = {
        "system": system,
        "seed": seed,
        "order": order,
        "rounds": args.rounds,
        "workers": args.workers,
        **measured,
        "seconds_per_round": round(measured["strategy_seconds"] / args.rounds, 3),
        "accuracy": round(central_accuracy(Path(measured["model"])), 4),
    }
    print(
        f"  {system:9} seed {seed}: {record['seconds_per_round']:7.2f} s/round  "
        f"accuracy {record['accuracy']:.4f}  {record['bytes'] / 1e6:6.2f} MB "
        f"({record['cloud_bytes'] / 1e6:.2f} MB cloud link)  "
        f"(whole run {record['run_seconds']:.0f} s)",
        flush=True,
    )
    return record


# --- the summary ----------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        mine = [r for r in records if r["system"] == system]
        if not mine:
            continue
        row: dict[str, Any] = {"seeds": len(mine)}
        for key in ("seconds_per_round", "accuracy", "bytes", "cloud_bytes", "run_seconds"):
            values = [r[key] for r in mine]
            row[key] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
        rows[system] = row
    return rows


def check_targets(records: list[dict[str, Any]], rows: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    if "flower" in rows and "hfl-tree" in rows:
        ratio = (
            rows["flower"]["seconds_per_round"]["median"]
            / rows["hfl-tree"]["seconds_per_round"]["median"]
        )
        targets["hfl-tree at least 5x faster per round than Flower's deployment engine"] = {
            "speedup": round(ratio, 2),
            "met": ratio >= 5.0,
        }
        gap = rows["flower"]["accuracy"]["median"] - rows["hfl-tree"]["accuracy"]["median"]
        targets["hfl-tree (q8) final accuracy within 2 points of Flower's"] = {
            "points_below": round(100 * gap, 2),
            "met": gap <= 0.02,
        }
    if "flower" in rows and "hfl-flat" in rows:
        models = {(r["system"], r["seed"]): Path(r["model"]) for r in records}
        differences = [
            max_difference(models["flower", seed], models["hfl-flat", seed])
            for (system, seed) in models
            if system == "flower" and ("hfl-flat", seed) in models
        ]
        targets["hfl-flat (npy) gives Flower's model to 1e-6 on every seed"] = {
            "max_abs_difference": max(differences),
            "met": max(differences) <= 1e-6,
        }
    return targets


def render(result: dict[str, Any]) -> str:
    """RESULTS.md's table: per system, the median [range] over seeds."""

    def cell(row: dict[str, Any], key: str, form: str, scale: float = 1.0) -> str:
        values = [row[key][k] / scale for k in ("median", "min", "max")]
        return f"{values[0]:{form}} [{values[1]:{form}}, {values[2]:{form}}]"

    lines = [
        "| system | strategy s / round | accuracy | MB, all links | MB, cloud link "
        "| whole run, s |",
        "|---|---|---|---|---|---|",
    ]
    for system, row in result["summary"].items():
        lines.append(
            f"| {system} | {cell(row, 'seconds_per_round', '.2f')} | "
            f"{cell(row, 'accuracy', '.3f')} | {cell(row, 'bytes', '.2f', 1e6)} | "
            f"{cell(row, 'cloud_bytes', '.2f', 1e6)} | "
            f"{cell(row, 'run_seconds', '.0f')} |"
        )
    for name, target in result["targets"].items():
        measured = ", ".join(f"{k} {v}" for k, v in target.items() if k != "met")
        lines.append(f"\n- {name}: {'met' if target['met'] else 'MISSED'} ({measured})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE")
    parser.add_argument("--render", metavar="JSON", type=Path, help="print RESULTS.md's table")
    parser.add_argument("--systems", nargs="*", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="SuperNodes, or MQTT workers")
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (the trees)")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if args.workers % args.edges:
        parser.error("--workers must be a multiple of --edges")
    if args.edges < 2:
        # The root's children are the nodes the ServerApp sees; FedAvg waits for two.
        parser.error("--edges must be at least 2 (the app's FedAvg waits for 2 nodes)")
    records = []
    saved_logging = structlog.get_config()
    configure_logging(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="message-api-") as tmp:
            for seed in range(args.seeds):
                order = list(args.systems) if seed % 2 == 0 else list(reversed(args.systems))
                for position, system in enumerate(order):
                    work = Path(tmp) / f"{system}-{seed}"
                    records.append(run(system, args, seed, position, work))
            rows = summarize(records)
            targets = check_targets(records, rows)
    finally:
        structlog.configure(**saved_logging)
    for record in records:
        del record["model"]
    print_targets(targets)
    write_json(
        args.json,
        {
            "benchmark": "message_api",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "render")},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "records": records,
            "summary": rows,
            "targets": targets,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
