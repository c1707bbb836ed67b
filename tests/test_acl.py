"""The example ACL (brokers/acl.conf) lets a whole federation run, each node as itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker
from hfl_mqtt.config import BrokerAddress, FederationConfig
from hfl_mqtt.roles import run_node
from tests.fakes import needs_mosquitto

pytestmark = [
    pytest.mark.anyio,
    needs_mosquitto,
]

ACL = Path(__file__).parent.parent / "brokers" / "acl.conf"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_three_level_federation_runs_under_the_example_acl(tmp_path: Path) -> None:
    config = FederationConfig.model_validate(
        {
            "federation": "acl",
            "levels": [
                {"name": "cloud", "rounds": 2, "downlink_codec": "fp16"},
                {"name": "edge", "rounds": 1, "uplink_codec": "q8"},
                {"name": "worker", "uplink_codec": "q8"},
            ],
            "fanout": [2, 2],
            "chunk_size": 1024,  # models travel as retained chunks: the ACL must allow them
            "task": {"model": "mlp", "train": {"learning_rate": 0.3}},
        }
    )
    async with MosquittoBroker(BrokerConfig(acl_file=ACL), tmp_path / "broker") as broker:
        nodes = config.node_configs({"cloud": BrokerAddress(host=broker.host, port=broker.port)})
        async with asyncio.timeout(60):
            reports = await asyncio.gather(*(run_node(node) for node in nodes))
    root = reports[0]
    assert root.rounds == 2
    assert [e["global_round"] for e in root.evaluations] == [1, 2]
    assert all(not r.updates_rejected for r in reports)
