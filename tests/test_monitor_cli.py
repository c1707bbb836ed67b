"""``hfl-mqtt monitor`` against a real Mosquitto holding a hand-made tree's retained records."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hfl_mqtt.brokers import BrokerConfig, MosquittoBroker, free_port
from hfl_mqtt.cli import main
from hfl_mqtt.transport.mqtt import MqttLink
from tests.fakes import needs_mosquitto

pytestmark = needs_mosquitto

StartBroker = Callable[..., MosquittoBroker]
TREE = [
    ("cloud", "root", 0, None, 4),
    ("edge-0", "aggregator", 1, "cloud", 9),
    ("w0", "worker", 2, "edge-0", 9),
    ("w1", "worker", 2, "edge-0", 8),
]


async def publish(host: str, port: int, fed: str = "lab", version_bump: int = 0) -> None:
    async with MqttLink(host, port, f"publisher-{version_bump}") as link:
        for node, role, level, parent, version in TREE:
            record = {
                "node": node, "role": role, "level": level, "parent": parent,
                "status": "online", "version": version + version_bump, "t": time.time(),
                "uptime_s": 5.0, "traffic": {"up": [1, 100, 0, 0]},
            }  # fmt: skip
            if role == "root":
                record["accuracy"] = [[2.0, 3, 0.71, 0.9], [4.0, 4, 0.83, 0.6]]
            topic = f"hfl/{fed}/{node}/metrics"
            await link.publish(topic, json.dumps(record).encode(), retain=True)
            await link.publish(f"hfl/{fed}/{node}/status", b'{"state": "online"}', retain=True)


def test_once_prints_the_tree(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_broker(BrokerConfig())
    asyncio.run(publish(broker.host, broker.port))
    started = time.monotonic()
    code = main(["monitor", "--broker", f"{broker.host}:{broker.port}", "--once"])
    assert code == 0
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert "federation lab  4/4 up" in out
    for node, role, *_ in TREE:
        assert f"{node} {role} online" in out
    assert "0.8300" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "nowhere"], "--broker 'nowhere': want HOST:PORT"),
        (["--broker", "127.0.0.1:1883", "--prometheus", "x"], "--prometheus 'x'"),
        (["--broker", "127.0.0.1:1883", "--password-file", "p"], "password_file needs a username"),
        (["--broker", "127.0.0.1:1883", "--cert", "c.pem"], "cert_file and key_file go together"),
        (["--broker", "127.0.0.1:1883", "--federation", "a/#"], "--federation 'a/#'"),
        (["--broker", "127.0.0.1:1883", "--replay", "x.jsonl"], "--replay FILE or --broker"),
    ],
)
def test_bad_options_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["monitor", *args, "--once"]) == 2
    assert message in capsys.readouterr().err


def test_a_refused_login_fails_at_once(
    start_broker: StartBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("HFL_MQTT_PASSWORD", raising=False)
    broker = start_broker(BrokerConfig(allow_anonymous=False))
    secret = tmp_path / "password"
    secret.write_text("nope\n")
    started = time.monotonic()
    login = ["--username", "watcher", "--password-file", str(secret)]
    code = main(["monitor", "--broker", f"{broker.host}:{broker.port}", *login])
    assert code == 2
    assert time.monotonic() - started < 5
    assert "AuthenticationError" in capsys.readouterr().err


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("node") in (None, "edge-0") and "kind" not in sample.labels:
                found[sample.name] = sample.value
    return found


def test_prometheus_scraped_while_the_monitor_runs(
    start_broker: StartBroker, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    broker = start_broker(BrokerConfig())
    asyncio.run(publish(broker.host, broker.port))
    port = free_port()
    where = f"{broker.host}:{broker.port}"
    options = ["--federation", "lab", "--prometheus", f"127.0.0.1:{port}", "--no-terminal"]
    monitor = spawn(
        [sys.executable, "-m", "hfl_mqtt.cli", "monitor", "--broker", where, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 15
    found: dict[str, float] = {}
    while time.monotonic() < deadline and found.get("hfl_node_model_version") != 9:
        try:
            found = scrape(url)
        except OSError:
            time.sleep(0.2)
    assert found.get("hfl_node_model_version") == 9, monitor.poll()
    assert found["hfl_federation_accuracy"] == pytest.approx(0.83)
    assert found["hfl_federation_nodes_up"] == 4
    asyncio.run(publish(broker.host, broker.port, version_bump=1))  # the run goes on
    while time.monotonic() < deadline and found.get("hfl_node_model_version") != 10:
        found = scrape(url)
    assert found["hfl_node_model_version"] == 10
    assert monitor.poll() is None


def test_once_on_a_broker_without_the_federation_says_so(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_broker(BrokerConfig())
    asyncio.run(publish(broker.host, broker.port))
    address = f"{broker.host}:{broker.port}"
    assert main(["monitor", "--broker", address, "--federation", "nosuch", "--once"]) == 1
    err = capsys.readouterr().err
    assert f"no status or metrics record of federation 'nosuch' on {address}" in err
    assert "broker(s) on ports" in err  # where a simulation's broker is


def test_prometheus_on_a_port_in_use_is_a_clear_error(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = start_broker(BrokerConfig())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = f"{broker.host}:{broker.port}"
        args = [
            "monitor",
            "--broker",
            address,
            "--no-terminal",
            "--prometheus",
            f"127.0.0.1:{port}",
        ]
        assert main(args) == 2
    assert "address already in use" in capsys.readouterr().err


@pytest.mark.parametrize("linger", ["5", "-1"])
def test_web_linger_needs_web_and_a_positive_time(
    linger: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path), "--web-linger", linger]) == 2
    assert "--web-linger" in capsys.readouterr().err
