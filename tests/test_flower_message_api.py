"""Flower's Message API on the tree: a template Flower app (``examples/flower_app``), unmodified,
with its ServerApp at the root through the MQTT Grid and its ClientApp in every worker."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from benchmarks.message_api_bench import APP, BIN, central_accuracy, flower_deployment, flwr_run
from hfl_mqtt.config import FederationConfig, load_federation
from hfl_mqtt.sim import simulate
from tests.fakes import needs_mosquitto

flwr = pytest.importorskip("flwr")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.anyio

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


def load(path: Path) -> Mapping[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(path).items()}


@needs_mosquitto
async def test_flat_and_lossless_the_tree_gives_flat_flowers_model(tmp_path: Path) -> None:
    """The same app on Flower's own deployment engine (a SuperLink, two SuperNodes, ``flwr
    run``) and on a flat tree with lossless (npy) uplinks: the same final model, to float32
    rounding (a delta's round trip, ``x + (y - x)``, and the order FedAvg sums in)."""
    rounds = 2
    flat = tmp_path / "flat.pt"
    with flower_deployment(tmp_path / "flower", 2) as (env, _):
        output = await asyncio.to_thread(
            flwr_run, env, f'num-server-rounds={rounds} final-model="{flat}"', RUN_TIMEOUT_S
        )
    assert flat.exists(), output[-3000:]

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


@needs_mosquitto
def test_a_failing_serverapp_ends_the_run_with_a_clear_error(tmp_path: Path) -> None:
    """The app cannot save its model (its parent is a file): ``hfl-mqtt sim`` says so and exits
    2, its brokers and workers ended."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = tree(1, blocker / "final.pt").model_dump(mode="json")
    data["levels"] = [
        {"name": "cloud", "deadline_s": 60},
        {"name": "worker", "uplink_codec": "npy"},
    ]
    data["fanout"] = [2]
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [str(BIN / "hfl-mqtt"), "sim", str(config), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ServerAppError: the ServerApp failed" in result.stderr
    assert "Traceback" not in result.stderr
