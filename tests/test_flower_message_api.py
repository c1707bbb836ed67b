"""Flower's Message API on the tree: a template Flower app (``examples/flower_app``), unmodified,
with its ServerApp at the root through the MQTT Grid and its ClientApp in every worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hfl_mqtt.config import FederationConfig, load_federation
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto

flwr = pytest.importorskip("flwr")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.anyio

APP = Path(__file__).parent.parent / "examples" / "flower_app"
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 180


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tree(rounds: int, final_model: Path, **changes: Any) -> FederationConfig:
    """The example's federation with ``rounds`` server rounds, saving its model to
    ``final_model``, with ``changes`` on top."""
    data = load_federation(APP / "federation.yaml").model_dump()
    data["task"]["flower_app"] = str(APP)
    data["task"]["params"] = {"num-server-rounds": rounds, "final-model": str(final_model)}
    data.update(changes)
    return FederationConfig.model_validate(data)


def central_accuracy(model_file: Path) -> float:
    """The accuracy of a saved model on the app's held-out test set (the app's own code)."""
    sys.path.insert(0, str(APP))
    try:
        from digitsapp.task import Net, load_centralized_dataset, test

        net = Net()
        net.load_state_dict(torch.load(model_file))
        return float(test(net, load_centralized_dataset())[1])
    finally:
        sys.path.remove(str(APP))


@needs_mosquitto
async def test_a_template_flower_app_runs_unmodified_over_a_3_level_tree(tmp_path: Path) -> None:
    """2 edges of 4 workers, q8 uplinks: FedAvg's train and evaluate messages fan out, each edge
    answers once per message, and the ServerApp's model reaches 0.90 on the held-out digits."""
    rounds = 5
    final = tmp_path / "final.pt"
    config = tree(rounds, final)
    assert config.levels[1].uplink_codec == "q8"
    assert config.levels[2].uplink_codec == "q8"
    summary = await asyncio.wait_for(simulate(config, tmp_path / "out", processes=2), RUN_TIMEOUT_S)
    assert final.exists(), "the ServerApp did not save its model"
    assert central_accuracy(final) >= 0.90
    # The federated evaluation of the last round, weighted as Flower's FedAvg weighs it.
    assert summary["global_rounds"] == rounds
    assert summary["final_accuracy"] >= 0.85
    assert not summary["updates_rejected"]
    # One answer per edge and message: a train and an evaluate message per round.
    assert summary["staleness"]["cloud"]["count"] == 2 * 2 * rounds
    assert summary["staleness"]["edge"]["count"] == 8 * 2 * rounds
    # q8 deltas up: far below float32 models (4,810 parameters, 19,240 bytes each).
    float32_up = 8 * rounds * 19_240
    assert summary["bytes"]["worker"]["up"] < 0.4 * float32_up


# --- flat Flower, the same app, side by side ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperLink ended"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


@contextmanager
def flower_deployment(home: Path, supernodes: int) -> Iterator[dict[str, str]]:
    """A SuperLink and ``supernodes`` SuperNodes (partition i of ``supernodes``) on free
    loopback ports; yields the environment for ``flwr run ... local``. Each process is a
    session leader, and its whole group is ended after."""
    port = free_port()
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> None:
        out = (home / log).open("wb")
        started.append(
            subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start(
            str(BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(port),
            log="superlink.log",
        )
        wait_for_port(port, started[0])
        for i in range(supernodes):
            start(
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions={supernodes}",
                log=f"supernode-{i}.log",
            )
        yield env
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


def load(path: Path) -> Mapping[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(path).items()}


@needs_mosquitto
async def test_flat_and_lossless_the_tree_gives_flat_flowers_model(tmp_path: Path) -> None:
    """The same app on Flower's own deployment engine (a SuperLink, two SuperNodes, ``flwr
    run``) and on a flat tree with lossless (npy) uplinks: the same final model, to float32
    rounding (a delta's round trip, ``x + (y - x)``, and the order FedAvg sums in)."""
    rounds = 2
    flat = tmp_path / "flat.pt"
    with flower_deployment(tmp_path / "flower", supernodes=2) as env:
        run = await asyncio.to_thread(
            subprocess.run,
            [
                str(BIN / "flwr"),
                "run",
                str(APP),
                "local",
                "--stream",
                "--run-config",
                f'num-server-rounds={rounds} final-model="{flat}"',
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert flat.exists(), run.stdout[-3000:]

    ours = tmp_path / "tree.pt"
    data = tree(rounds, ours).model_dump()
    data["levels"] = [
        {"name": "cloud", "deadline_s": 120},
        {"name": "worker", "uplink_codec": "npy"},
    ]
    data["fanout"] = [2]
    await asyncio.wait_for(
        simulate(FederationConfig.model_validate(data), tmp_path / "out", processes=2),
        RUN_TIMEOUT_S,
    )
    theirs, mine = load(flat), load(ours)
    assert list(theirs) == list(mine)
    for name in theirs:
        np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
    assert central_accuracy(ours) == central_accuracy(flat)


def test_the_flwr_command_starts_in_this_environment() -> None:
    """A Flower user's environment has a working ``flwr`` (amqtt's typer pin stays out)."""
    flwr_cli = shutil.which("flwr", path=str(BIN))
    assert flwr_cli is not None
    result = subprocess.run(
        [flwr_cli, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Flower version" in result.stdout
