"""The monitor against a real run: ``hfl-mqtt sim`` on Mosquitto in one process, ``hfl-mqtt
monitor --prometheus`` in another, its endpoint scraped over HTTP while the federation trains."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from hfl_mqtt.brokers import free_port
from hfl_mqtt.cli import DEMO
from tests.fakes import needs_mosquitto

pytestmark = needs_mosquitto

ROOT = Path(__file__).resolve().parent.parent
Spawn = Callable[..., subprocess.Popen[bytes]]


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the endpoint, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_prometheus_is_scraped_during_a_run(tmp_path: Path, spawn: Spawn) -> None:
    config = DEMO.model_dump(mode="json") | {"federation": "scraped"}
    config["levels"][0]["rounds"] = 200  # long enough to scrape mid-run; stopped by the test
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "sim.log"
    command = [sys.executable, "-m", "hfl_mqtt.cli", "sim", str(path)]
    command += ["--out", str(tmp_path / "out"), "--processes", "2"]
    sim = spawn(command, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)

    def broker_port() -> int | None:
        found = re.search(rb"broker\(s\) on ports (\d+)", log_path.read_bytes())
        assert sim.poll() is None, log_path.read_text()
        return int(found.group(1)) if found else None

    port = wait_for("the simulation's broker", broker_port)
    exporter = free_port()
    monitor = [sys.executable, "-m", "hfl_mqtt.cli", "monitor", "--broker", f"127.0.0.1:{port}"]
    monitor += ["--federation", "scraped", "--no-terminal", "--prometheus", f"127.0.0.1:{exporter}"]
    watcher = spawn(monitor, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)

    def trained() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        assert watcher.poll() is None, watcher.stderr.read() if watcher.stderr else ""
        try:
            samples = scrape(exporter)
        except OSError:
            return None  # not listening yet
        evaluations = samples.get("hfl_federation_evaluations_total", [])
        nodes = samples.get("hfl_federation_nodes", [])
        # A worker's record goes out every 5 s at most: its first is from before it trained.
        worker_up = [
            value
            for labels, value in samples.get("hfl_node_bytes_sent_total", [])
            if labels["node"] == "worker-0" and labels["kind"] == "up"
        ]
        done = evaluations and evaluations[0][1] >= 3 and nodes and nodes[0][1] == 11
        return samples if done and worker_up and worker_up[0] > 0 else None

    samples = wait_for("evaluations, every node and a worker's deltas, scraped", trained)
    assert isinstance(samples, dict)
    assert sim.poll() is None  # scraped during the run
    (accuracy,) = samples["hfl_federation_accuracy"]
    assert accuracy[0]["federation"] == "scraped"
    assert 0.1 < accuracy[1] <= 1.0
    up = {labels["node"]: value for labels, value in samples["hfl_node_up"]}
    assert len(up) == 11
    assert up["cloud"] == 1.0
    sent = {
        (labels["node"], labels["kind"]): value
        for labels, value in samples["hfl_node_bytes_sent_total"]
    }
    assert sent["worker-0", "up"] > 0  # a worker's deltas, behind its edge
    assert sent["cloud", "model"] > 0
    roles = {labels["node"]: labels["role"] for labels, _ in samples["hfl_node_up"]}
    assert roles["cloud"] == "root"
    assert roles["edge-0"] == "aggregator"
    parents = {labels["node"]: labels["parent"] for labels, _ in samples["hfl_node_up"]}
    assert parents["worker-0"] in ("edge-0", "edge-1")
