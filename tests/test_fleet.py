"""A plan's nodes as separate ``hfl-mqtt run`` processes, the way a fleet runs them, through
trouble: the broker SIGKILLed while the nodes are still starting, and a wrong password.

The broker is the plan's own (``mosquitto -c`` on the file ``plan --tls`` wrote: TLS, one user
per node, the per-user ACL); every node reads its own file and secret.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hfl_mqtt.brokers import free_port
from hfl_mqtt.config import FederationConfig, load_node
from hfl_mqtt.errors import AuthenticationError
from hfl_mqtt.plan import write_plan
from hfl_mqtt.roles.node import mqtt_link_factory
from tests.fakes import needs_mosquitto
from tests.test_plan import started

pytestmark = [pytest.mark.anyio, needs_mosquitto]

Spawn = Callable[..., "subprocess.Popen[bytes]"]
ROUNDS = 3
RUN_TIMEOUT_S = 90.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fleet(tmp_path: Path, port: int, *, client_certs: bool = False) -> Path:
    """``plan --tls`` of a cloud, 2 edges and 4 workers on one broker at ``port``."""
    config = FederationConfig.model_validate(
        {
            "federation": "fleet",
            "levels": [
                # Every round needs everyone, and the deadline is far: a node that never came
                # up, or an update lost in the crash, stalls the run into the test's timeout.
                {"name": "cloud", "rounds": ROUNDS, "deadline_s": 60, "min_fraction": 1.0},
                {"name": "edge", "rounds": 1, "deadline_s": 60, "min_fraction": 1.0},
                {"name": "worker"},
            ],
            "fanout": [2, 2],
            "task": {
                "dataset": "digits",
                "model": "softmax",
                "partition": {"scheme": "iid"},
                "train": {"epochs": 2, "learning_rate": 0.3},
            },
        }
    )
    out = tmp_path / "plan"
    write_plan(config, out, broker=("127.0.0.1", port), tls=True, client_certs=client_certs)
    return out


def connections(log: Path) -> int:
    return log.read_text().count("New client connected") if log.exists() else 0


async def test_a_plans_nodes_come_up_through_a_broker_crash_at_start_and_finish(
    tmp_path: Path, spawn: Spawn
) -> None:
    port = free_port()
    out = fleet(tmp_path, port)
    conf = out / "brokers" / "cloud" / "mosquitto.conf"
    log = conf.parent / "mosquitto.log"
    nodes = sorted((out / "nodes").glob("*.yaml"))
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    with started(conf, port) as broker:
        for path in nodes:
            with (
                (logs / f"{path.stem}.out").open("wb") as stdout,
                (logs / f"{path.stem}.err").open("wb") as stderr,
            ):
                processes[path.stem] = spawn(
                    [sys.executable, "-m", "hfl_mqtt.cli", "run", "--config", str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                )
        # Crash as soon as the first nodes are in: the others are still starting (importing,
        # connecting), and those in may be subscribing or publishing their first model.
        deadline = time.monotonic() + 30
        while connections(log) < 2:
            assert time.monotonic() < deadline, "no node connected"
            await asyncio.sleep(0.01)
        broker.kill()
        broker.wait()
        connected_before = connections(log)
    assert connected_before < len(nodes), "every node was up before the crash: too late"
    await asyncio.sleep(1.5)
    with started(conf, port):
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(p.poll() is None for p in processes.values()):
            assert time.monotonic() < deadline, "the run did not complete"
            await asyncio.sleep(0.1)
    errors = {name: (logs / f"{name}.err").read_text()[-2000:] for name in processes}
    assert {name: p.returncode for name, p in processes.items()} == dict.fromkeys(processes, 0), (
        errors
    )
    reports = {name: json.loads((logs / f"{name}.out").read_text()) for name in processes}
    cloud = reports["cloud"]
    assert cloud["rounds"] == ROUNDS
    assert cloud["updates_accepted"] == 2 * ROUNDS
    for name, report in reports.items():
        if report["role"] == "worker":
            assert report["trained"] >= ROUNDS, name
            parent = load_node(out / "nodes" / f"{name}.yaml").upstream
            assert parent is not None
            accepted = set(reports[parent.parent]["accepted_ids"])
            assert set(report["sent_ids"]) <= accepted, f"{name}'s update was lost"


async def test_a_wrong_password_fails_at_once_with_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    out = fleet(tmp_path, port)
    secret = out / "secrets" / "worker-0.password"
    secret.write_text(secret.read_text().strip() + "-wrong\n")
    config = load_node(out / "nodes" / "worker-0.yaml")
    assert config.upstream is not None
    broker = config.upstream.broker
    with started(out / "brokers" / "cloud" / "mosquitto.conf", port):
        begun = time.monotonic()
        with pytest.raises(AuthenticationError) as refused:
            async with mqtt_link_factory(1 << 20)(broker, "worker-0", None):
                pass
        assert time.monotonic() - begun < 5, "a refusal was retried"
    message = str(refused.value)
    assert f"worker-0@127.0.0.1:{port}" in message
    assert "not authorized" in message
    assert "wrong" not in message  # the password is never in a message


async def test_a_device_without_its_client_certificate_is_refused_at_once(tmp_path: Path) -> None:
    """Under TLS 1.3 the broker's refusal is an alert after the handshake, while the client
    waits for its CONNACK: the link fails at once with the alert's reason, no retry."""
    port = free_port()
    out = fleet(tmp_path, port, client_certs=True)
    config = load_node(out / "nodes" / "worker-0.yaml")
    assert config.upstream is not None
    broker = config.upstream.broker
    assert broker.tls is not None
    assert broker.tls.cert_file is not None
    bare = broker.model_copy(
        update={"tls": broker.tls.model_copy(update={"cert_file": None, "key_file": None})}
    )
    with started(out / "brokers" / "cloud" / "mosquitto.conf", port):
        begun = time.monotonic()
        with pytest.raises(AuthenticationError, match="CERTIFICATE_REQUIRED"):
            async with mqtt_link_factory(1 << 20)(bare, "worker-0", None):
                pass
        assert time.monotonic() - begun < 5, "a refusal was retried"
        async with mqtt_link_factory(1 << 20)(broker, "worker-0", None) as link:
            assert link.connected  # with its certificate it is in
