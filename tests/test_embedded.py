"""Without Mosquitto, the simulator falls back to the embedded amqtt broker and says so."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hfl_mqtt import sim
from hfl_mqtt.config import FederationConfig
from hfl_mqtt.errors import BrokerError

pytest.importorskip("amqtt")
pytestmark = pytest.mark.anyio

SMALL = FederationConfig.model_validate(
    {
        "federation": "embedded",
        "levels": [
            {"name": "cloud", "rounds": 3, "downlink_codec": "fp16"},
            {"name": "edge", "rounds": 1, "uplink_codec": "q8"},
            {"name": "worker", "uplink_codec": "q8"},
        ],
        "fanout": [2, 2],
        "task": {"model": "mlp", "train": {"learning_rate": 0.5}},
    }
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim, "find_mosquitto", lambda: None)


@pytest.mark.usefixtures("no_mosquitto")
async def test_sim_runs_on_the_embedded_broker_without_mosquitto(tmp_path: Path) -> None:
    said = io.StringIO()
    summary = await sim.simulate(SMALL, tmp_path, progress=sim.Progress(3, said), processes=1)
    assert "embedded amqtt broker" in said.getvalue()
    assert summary["global_rounds"] == 3
    assert summary["final_accuracy"] > 0.5
    # amqtt at times drops a client (an error inside it: "dictionary changed size during
    # iteration", then a take-over): the worker reconnects, gets its parent's retained model
    # again and re-sends its delta (the resend rule), which the edge drops as a duplicate.
    # Nothing else may be refused.
    assert set(summary["updates_rejected"]) <= {"duplicate"}
    assert summary["config"]["levels"][0]["name"] == "cloud"


@pytest.mark.usefixtures("no_mosquitto")
async def test_per_edge_brokers_need_mosquitto(tmp_path: Path) -> None:
    config = SMALL.model_copy(update={"brokers": "per_edge"})
    with pytest.raises(BrokerError, match="need Mosquitto"):
        await sim.simulate(config, tmp_path)
