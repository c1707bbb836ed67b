"""The Prometheus exporter, scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hfl_mqtt.monitor.prometheus import exposition, prometheus_app, serving
from hfl_mqtt.monitor.view import FederationView

pytestmark = pytest.mark.anyio


def observe(view: FederationView, node: str, t: float, **fields: Any) -> None:
    view.observe(f"hfl/demo/{node}/metrics", json.dumps({"t": t, **fields}).encode(), t)


def tree() -> FederationView:
    view = FederationView()
    staleness = {"n": 10, "mean": 0.5, "p50": 0, "p95": 2, "max": 3, "hist": [6, 2, 1, 1]}
    observe(
        view, "cloud", 100, role="root", level=0, parent=None, status="online", version=4,
        round=4, uptime_s=10, accuracy=[[5.0, 3, 0.7, 0.9], [9.0, 4, 0.81, 0.5]],
    )  # fmt: skip
    observe(
        view, "edge-0", 100, role="aggregator", level=1, parent="cloud", status="online",
        version=9, accepted=10, staleness=staleness, rejected={"stale": 2, "non_finite": 1},
        traffic={"model": [3, 3000, 1, 900], "up": [1, 50, 10, 500]}, reconnects=1,
        rss=123_456_789, cpu_s=3.25, uptime_s=10,
        privacy={"kind": "central", "epsilon": 2.5, "delta": 1e-5, "releases": 4},
    )  # fmt: skip
    observe(view, "w0", 100, role="worker", level=2, parent="edge-0", status="online", trained=5)
    view.observe("hfl/demo/w0/status", b'{"state": "offline"}', 100)
    return view


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def labels(node: str, role: str, level: str, parent: str, **extra: str) -> frozenset[Any]:
    base = {"federation": "demo", "node": node, "role": role, "level": level, "parent": parent}
    return frozenset({**base, **extra}.items())


EDGE = ("edge-0", "aggregator", "1", "cloud")


@pytest.mark.parametrize(
    ("name", "label_set", "value"),
    [
        ("hfl_node_up", labels(*EDGE), 1.0),
        ("hfl_node_up", labels("w0", "worker", "2", "edge-0"), 0.0),
        ("hfl_node_model_version", labels(*EDGE), 9.0),
        ("hfl_node_updates_accepted_total", labels(*EDGE), 10.0),
        ("hfl_node_privacy_epsilon", labels(*EDGE, kind="central"), 2.5),
        ("hfl_node_updates_rejected_total", labels(*EDGE, reason="stale"), 2.0),
        ("hfl_node_updates_rejected_total", labels(*EDGE, reason="non_finite"), 1.0),
        ("hfl_node_bytes_sent_total", labels(*EDGE, kind="model"), 3000.0),
        ("hfl_node_bytes_received_total", labels(*EDGE, kind="up"), 500.0),
        ("hfl_node_messages_sent_total", labels(*EDGE, kind="model"), 3.0),
        ("hfl_node_messages_received_total", labels(*EDGE, kind="up"), 10.0),
        ("hfl_node_reconnects_total", labels(*EDGE), 1.0),
        ("hfl_node_resident_memory_bytes", labels(*EDGE), 123_456_789.0),
        ("hfl_node_cpu_seconds_total", labels(*EDGE), 3.25),
        ("hfl_node_trained_total", labels("w0", "worker", "2", "edge-0"), 5.0),
        ("hfl_node_staleness", labels(*EDGE, quantile="0.95"), 2.0),
        ("hfl_node_staleness", labels(*EDGE, quantile="1"), 3.0),
        ("hfl_node_staleness_updates_total", labels(*EDGE), 10.0),
        ("hfl_node_model_version", labels("cloud", "root", "0", ""), 4.0),
        (
            "hfl_level_staleness",
            frozenset({"federation": "demo", "level": "1", "quantile": "0.5"}.items()),
            0.0,
        ),
        ("hfl_federation_accuracy", frozenset({("federation", "demo")}), 0.81),
        ("hfl_federation_loss", frozenset({("federation", "demo")}), 0.5),
        ("hfl_federation_evaluated_version", frozenset({("federation", "demo")}), 4.0),
        ("hfl_federation_evaluations_total", frozenset({("federation", "demo")}), 2.0),
        ("hfl_federation_nodes", frozenset({("federation", "demo")}), 3.0),
        ("hfl_federation_nodes_up", frozenset({("federation", "demo")}), 2.0),
    ],
)
def test_exposition(name: str, label_set: frozenset[Any], value: float) -> None:
    found = samples(exposition(tree().snapshot(101)).decode())
    assert found[(name, label_set)] == pytest.approx(value)


def test_empty_view_is_valid() -> None:
    text = exposition(FederationView("demo").snapshot(1)).decode()
    found = samples(text)
    assert found[("hfl_federation_nodes", frozenset({("federation", "demo")}))] == 0
    assert not any(name == "hfl_federation_accuracy" for name, _ in found)


async def test_scraped_over_http() -> None:
    view = tree()
    app = prometheus_app(view, clock=lambda: 101.0)
    async with serving(app, "127.0.0.1", 0) as port, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
        found = samples(text)
        key = ("hfl_node_model_version", labels(*EDGE))
        assert found[key] == 9
        observe(view, "edge-0", 101, role="aggregator", level=1, parent="cloud", version=10)
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert samples(await response.text())[key] == 10


def test_a_thousand_workers_scrape_in_time() -> None:
    view = FederationView()
    for i in range(1000):
        observe(
            view, f"w{i}", 1, role="worker", level=2, parent=f"edge-{i % 10}", status="online",
            version=3, round=3, trained=3, rss=1, cpu_s=1.0, uptime_s=1.0, rejected={"stale": 1},
            traffic={"model": [1, 0, 1, 80_000], "up": [1, 20_000, 0, 0], "status": [1, 30, 0, 0]},
        )  # fmt: skip
    started = time.perf_counter()
    text = exposition(view.snapshot(2))
    assert time.perf_counter() - started < 5
    assert text.count(b"hfl_node_up{") == 1000


def test_the_grafana_dashboard_reads_exported_names() -> None:
    dashboard = Path(__file__).parent.parent / "examples" / "grafana" / "hfl-mqtt.json"
    used = set(re.findall(r"hfl_[a-z_]+", dashboard.read_text()))
    assert used
    exported = {name for name, _ in samples(exposition(tree().snapshot(101)).decode())}
    assert used - {"hfl_mqtt"} <= exported, used - exported
