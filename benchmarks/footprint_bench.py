"""Footprint benchmark: what a worker costs a board in memory, disk, start-up and idle CPU.

One real worker process, started from the agent's venv (``pip install .[agent]`` into a fresh
venv, the way ``device_agents/install.sh`` makes it: no pip, torch, scikit-learn, matplotlib or
rich), joins a root run in this process over a private Mosquitto on loopback and trains the
numpy MLP (64 hidden units) on digits for ``--rounds`` rounds. Digits comes from scikit-learn,
which a board does not have: this script writes its training split to a CSV file and the worker
reads it with the local-data task (``hfl_mqtt.tasks.local_data``), as a board reads its own
readings; the root evaluates on the test split, written the same way.

Measured:
- ``worker_rss_startup_mb``: the worker's resident memory (VmRSS) once it is connected, has
  built its task and has settled; ``worker_rss_mb``: its peak while training, sampled every
  0.1 s; ``worker_rss_steady_mb``: the median over the second half of the training.
- ``idle_cpu_s_per_min``: CPU seconds (user + system) the connected worker uses with nothing to
  do (its parent not started yet), over ``--idle-s`` seconds, scaled to a minute.
- ``agent_venv_mb``: the venv's size on disk (allocated blocks, as ``du``; MB = 2^20 bytes).
- ``import_s``: ``python -c "import hfl_mqtt.roles.node"`` in the agent's venv, wall time of the
  whole process (interpreter start-up included), median of ``--imports`` runs; ``import_cli_s``
  the same for ``hfl_mqtt.cli`` (what ``hfl-mqtt run`` imports).

``--arch arm64`` runs the same in an emulated board (``benchmarks/emulated_device.py``): the
agent installed there by ``install.sh`` itself, the worker started with the systemd unit's
``ExecStart=`` line under chroot. Emulated numbers are not a Raspberry Pi's: qemu-user
translates every instruction (times are several times a native core's) and its own memory
(translator and code cache) counts in the worker's RSS. ``worker_guest_rss_mb`` leaves qemu's
own mappings out (its translated-code buffer, its binary and its heap, from
``/proc/PID/smaps``): an estimate of what the program itself holds; natively it is the RSS.
Needs root.

Targets (checked here): ``worker_rss_mb`` <= 60 (emulated: ``worker_guest_rss_mb``),
``agent_venv_mb`` <= 120, and no heavy module (rich, scikit-learn, torch, ...) in a node.

    python benchmarks/footprint_bench.py --json benchmarks/out/footprint.json
    python benchmarks/footprint_bench.py --arch arm64 --json benchmarks/out/footprint-arm64.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import structlog
import yaml

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import BrokerAddress, DownstreamConfig, NodeConfig, UpstreamConfig
from hfl_mqtt.logs import configure_logging
from hfl_mqtt.roles.messages import parse_status
from hfl_mqtt.roles.node import run_node
from hfl_mqtt.tasks.base import TaskConfig
from hfl_mqtt.tasks.datasets import load_digits_split
from hfl_mqtt.topics import status_topic

try:
    from benchmarks import emulated_device as board
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on the path
    import emulated_device as board  # type: ignore[no-redef,import-not-found]

TARGET_RSS_MB = 60.0
TARGET_VENV_MB = 120.0
FED = "footprint"
WORKER = "pi-0"
MB = 1 << 20
HEAVY = ("rich", "pygments", "greenlet", "sklearn", "scipy", "torch", "matplotlib", "flwr")
"""Modules a worker must not load."""


def digits_csv(directory: Path) -> tuple[Path, Path]:
    """Digits' training and test splits as CSV files (64 pixel columns and ``label``)."""
    split = load_digits_split(0.2, 0)
    header = ",".join([*(f"p{i}" for i in range(64)), "label"])
    paths = []
    for name, x, y in (
        ("digits_train.csv", split.x_train, split.y_train),
        ("digits_test.csv", split.x_test, split.y_test),
    ):
        path = directory / name
        table = np.column_stack([x, y])
        np.savetxt(path, table, delimiter=",", header=header, comments="", fmt="%.6g")
        paths.append(path)
    return paths[0], paths[1]


def digits_task(path: str) -> TaskConfig:
    return TaskConfig.model_validate(
        {
            "factory": "hfl_mqtt.tasks.local_data:make_task",
            "model": "mlp",
            "hidden": 64,
            "train": {"epochs": 2, "batch_size": 16, "learning_rate": 0.5},
            "params": {"path": path, "num_classes": 10},
        }
    )


def du_mb(path: Path) -> float:
    """Allocated size of a tree in MB (2^20), as ``du -sm`` counts it (hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in [".", *files]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return round(total / MB, 1)


def package_sizes(venv: Path) -> dict[str, float]:
    """The biggest entries of the venv's site-packages, in MB."""
    (site,) = venv.glob("lib/python3*/site-packages")
    sizes = {p.name: du_mb(p) for p in site.iterdir() if p.is_dir()}
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: Sequence[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


@dataclass
class Agent:
    """Where the agent lives and how to run things with it (natively or in a board)."""

    venv: Path
    """The venv as seen from here (for its size)."""
    wrap: Callable[[list[str]], list[str]]
    """Turns a command inside the agent's world into one to run here."""
    python: str
    """The venv's python, as the command inside sees it."""
    worker_argv: list[str]
    """The command that starts the worker (already wrapped)."""
    worker_data: str
    """The worker's training CSV, as its task sees it."""


def native_agent(workdir: Path, train_csv: Path, config_path: Path) -> Agent:
    """A fresh venv with ``.[agent]`` installed as install.sh does it (pip from its wheel)."""
    venv = workdir / "agent-venv"
    python3 = shutil.which("python3") or sys.executable
    subprocess.run([python3, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheels = sorted(Path("/usr/share/python-wheels").glob("pip-*.whl"))
    bundled = subprocess.run(
        [python3, "-c", "import ensurepip, os; print(os.path.dirname(ensurepip.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    wheels += sorted(Path(bundled, "_bundled").glob("pip-*.whl"))
    if wheels:
        pip = [str(venv / "bin" / "python"), f"{wheels[-1]}/pip"]
    else:
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    print("installing .[agent] into a fresh venv ...", file=sys.stderr, flush=True)
    subprocess.run(
        [*pip, "install", "-q", "--disable-pip-version-check", f"{board.REPO}[agent]"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return Agent(
        venv=venv,
        wrap=lambda argv: argv,
        python=str(venv / "bin" / "python"),
        # As the unit runs it (JSON logs), without systemd.
        worker_argv=[
            *(str(venv / "bin" / "hfl-mqtt"), "run", "--config", str(config_path)),
            *("--log-format", "json"),
        ],
        worker_data=str(train_csv),
    )


def board_agent(root: Path, train_csv: Path, config_path: Path) -> Agent:
    """The agent installed in an emulated board by install.sh; the worker as its unit runs."""
    board.copy_checkout(root)
    print("install.sh in the emulated board (minutes) ...", file=sys.stderr, flush=True)
    out = board.install_agent(root, config_path, data=[train_csv])
    if out.returncode != 0:
        raise RuntimeError(f"install.sh failed:\n{out.stdout[-3000:]}")
    service = board.exec_start(WORKER)
    return Agent(
        venv=root / board.AGENT_VENV.lstrip("/"),
        wrap=lambda argv: board.chroot_argv(root, argv),
        python=f"{board.AGENT_VENV}/bin/python",
        worker_argv=board.chroot_argv(
            root, service.argv, user=service.user, cwd=service.cwd, env=service.env
        ),
        worker_data=train_csv.name,
    )


def guest_rss_mb(pid: int) -> float | None:
    """The RSS of a process under qemu-user without qemu's own mappings: the anonymous
    writable-and-executable buffer of translated code, the ``qemu-*-static`` binary and the
    host heap (qemu's; the guest's heap lives in guest mappings)."""
    total = 0
    own = False
    try:
        with Path(f"/proc/{pid}/smaps").open() as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                    perms, path = fields[1], fields[5] if len(fields) > 5 else ""
                    own = (
                        ("w" in perms and "x" in perms and not path)
                        or "qemu-" in path
                        or path == "[heap]"
                    )
                elif fields[0] == "Rss:" and not own:
                    total += int(fields[1])
    except OSError:
        return None
    return total / 1024


def import_times(agent: Agent, repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, module in (("import_s", "hfl_mqtt.roles.node"), ("import_cli_s", "hfl_mqtt.cli")):
        times = timed(agent.wrap([agent.python, "-c", f"import {module}"]), repeats)
        result[key] = round(statistics.median(times), 3)
        result[f"{key}_range"] = [round(min(times), 3), round(max(times), 3)]
    probe = (
        "import sys, hfl_mqtt.cli, hfl_mqtt.roles.node; print(len(sys.modules)); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    out = subprocess.run(
        agent.wrap([agent.python, "-c", probe]), check=True, capture_output=True, text=True
    ).stdout.splitlines()
    result["modules_loaded"] = int(out[0])
    result["heavy_modules_loaded"] = json.loads(out[1].replace("'", '"'))
    return result


async def wait_online(broker: MosquittoBroker, process: subprocess.Popen[bytes]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(status_topic(FED, WORKER), qos=1)
        async with asyncio.timeout(300):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if parse_status(message.payload) == "online":
                    return
                if process.poll() is not None:
                    raise RuntimeError(f"the worker exited with {process.returncode}")


async def settle(pid: int, timeout: float = 120.0) -> float:
    """The RSS once it stops growing (two samples 2 s apart within 0.5 MB)."""
    deadline = time.monotonic() + timeout
    last = rss_mb(pid) or 0.0
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        now = rss_mb(pid) or 0.0
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


async def measure_worker(
    agent: Agent, broker: MosquittoBroker, root_config: NodeConfig, args: argparse.Namespace,
    logs: Path,
    emulated: bool,
) -> dict[str, Any]:  # fmt: skip
    with (logs / "worker.out").open("wb") as out, (logs / "worker.err").open("wb") as err:
        process = subprocess.Popen(
            agent.worker_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    try:
        started = time.monotonic()
        await wait_online(broker, process)
        startup_rss = await settle(process.pid)
        startup_s = time.monotonic() - started
        # Idle: connected, its parent not there yet, so no model to train on.
        cpu0 = cpu_s(process.pid)
        await asyncio.sleep(args.idle_s)
        idle = (cpu_s(process.pid) - cpu0) * 60.0 / args.idle_s

        samples: list[float] = []
        guest: list[float] = []
        events: list[dict[str, Any]] = []

        async def sample() -> None:
            while True:
                if (value := rss_mb(process.pid)) is not None:
                    samples.append(value)
                    own = guest_rss_mb(process.pid) if emulated else value
                    guest.append(own if own is not None else value)
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            train_start = time.monotonic()
            await run_node(root_config, on_event=events.append)
            train_s = time.monotonic() - train_start
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        code = process.poll()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
    second_half = samples[len(samples) // 2 :] or [0.0]
    return {
        "worker_rss_startup_mb": round(startup_rss, 1),
        "worker_rss_mb": round(max(samples, default=0.0), 1),
        "worker_guest_rss_mb": round(max(guest, default=0.0), 1),
        "worker_rss_steady_mb": round(statistics.median(second_half), 1),
        "startup_s": round(startup_s, 1),
        "idle_cpu_s_per_min": round(idle, 3),
        "idle_window_s": args.idle_s,
        "rounds": len(events),
        "train_s": round(train_s, 1),
        "final_accuracy": round(events[-1]["accuracy"], 4) if events else None,
        "worker_exit_code": code,
    }


@contextlib.contextmanager
def the_agent(
    args: argparse.Namespace, workdir: Path, train: Path, config: Path
) -> Iterator[Agent]:
    if args.arch == "native":
        yield native_agent(workdir, train, config)
        return
    with board.emulated_board(workdir / "board", args.arch) as root:
        yield board_agent(root, train, config)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    train, test = digits_csv(workdir)
    async with MosquittoBroker(BrokerConfig(), workdir / "broker") as broker:
        address = BrokerAddress(host=broker.host, port=broker.port)
        config = workdir / f"{WORKER}.yaml"
        emulated = args.arch != "native"

        def write_worker(data: str) -> None:
            worker = NodeConfig(
                federation=FED,
                node=WORKER,
                upstream=UpstreamConfig(broker=address, parent="cloud", codec="q8"),
                task=digits_task(data),
                partition=0,
                num_partitions=1,
                level=1,
            )
            config.write_text(yaml.safe_dump(worker.model_dump(mode="json", exclude_unset=True)))

        # The board's worker reads its data in its state directory; here, where it was written.
        write_worker(train.name if emulated else str(train))
        with the_agent(args, workdir, train, config) as agent:
            result: dict[str, Any] = {
                "agent_venv_mb": du_mb(agent.venv),
                "agent_venv_largest_mb": package_sizes(agent.venv),
                "agent_venv_has_pip": any(agent.venv.glob("lib/python3*/site-packages/pip")),
            }
            result.update(import_times(agent, args.imports))
            root = NodeConfig(
                federation=FED,
                node="cloud",
                downstream=DownstreamConfig(
                    broker=address, children=[WORKER], rounds=args.rounds, codec="fp16"
                ),
                task=digits_task(str(test)),
                num_partitions=1,
            )
            result.update(await measure_worker(agent, broker, root, args, workdir, emulated))
            machine = subprocess.run(
                agent.wrap(["uname", "-m"]), check=True, capture_output=True, text=True
            ).stdout.strip()
            result["arch"] = machine
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--arch",
        default="native",
        choices=["native", "arm64", "armhf"],
        help="native (this machine), or an emulated board's architecture (needs root)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="training rounds")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--imports", type=int, default=7, help="import timings (median)")
    args = parser.parse_args(argv)
    saved_logging = structlog.get_config()
    configure_logging(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="hfl-footprint-") as tmp:
            result = asyncio.run(run(args, Path(tmp)))
    finally:
        structlog.configure(**saved_logging)
    emulated = args.arch != "native"
    result["emulated"] = emulated
    result["note"] = (
        "emulated with qemu-user on "
        f"{platform.machine()}: times are not a board's, and the RSS includes qemu's own memory"
        if emulated
        else "native"
    )
    targets = {
        f"worker_rss_mb <= {TARGET_RSS_MB:g}{' (without qemu)' if emulated else ''}": (
            "met" if result["worker_guest_rss_mb"] <= TARGET_RSS_MB else "missed"
        ),
        f"agent_venv_mb <= {TARGET_VENV_MB:g}": (
            "met" if result["agent_venv_mb"] <= TARGET_VENV_MB else "missed"
        ),
        "no heavy module loaded": "met" if not result["heavy_modules_loaded"] else "missed",
    }
    rows = [
        ("arch", f"{result['arch']}{' (emulated)' if emulated else ''}"),
        ("worker RSS after start-up, MB", result["worker_rss_startup_mb"]),
        ("worker RSS peak while training, MB", result["worker_rss_mb"]),
        ("worker RSS steady (median, 2nd half), MB", result["worker_rss_steady_mb"]),
        ("worker RSS peak without qemu's mappings, MB", result["worker_guest_rss_mb"]),
        ("agent venv on disk, MB", result["agent_venv_mb"]),
        ("import hfl_mqtt.roles.node, s (median)", result["import_s"]),
        ("import hfl_mqtt.cli, s (median)", result["import_cli_s"]),
        ("modules loaded by a node", result["modules_loaded"]),
        (f"idle CPU s per minute ({args.idle_s:g} s window)", result["idle_cpu_s_per_min"]),
        ("rounds, final accuracy", f"{result['rounds']}, {result['final_accuracy']}"),
    ]
    for label, value in rows:
        print(f"{label:<46}{value!s:>20}")
    for target, state in targets.items():
        print(f"target {target}: {state}")
    record = {
        "benchmark": "footprint",
        "command": " ".join(
            ["python", "benchmarks/footprint_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            # The machine is shared: its load when the run ended, next to the timings.
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        **result,
        "targets": targets,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0 if all(state == "met" for state in targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
