"""The web dashboard's server (hfl_mqtt/monitor/web.py), its replay and the sim's node records."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from hfl_mqtt.brokers import MosquittoBroker
from hfl_mqtt.config import BrokerAddress
from hfl_mqtt.errors import ConfigError
from hfl_mqtt.monitor.command import MonitorOptions, run_monitor
from hfl_mqtt.monitor.replay import Replay, node_lines
from hfl_mqtt.monitor.sim_dashboard import SimDashboard
from hfl_mqtt.monitor.view import FederationView
from hfl_mqtt.monitor.web import Dashboard, parse_web_address, static_dir, web_server
from hfl_mqtt.sim import read_evaluations
from hfl_mqtt.simwatch import NodeWatch
from hfl_mqtt.transport.mqtt import MqttLink

pytestmark = pytest.mark.anyio

NODE_KEYS = {"id", "role", "level", "parent", "status", "version", "round", "rate_out"}


def record(node: str, t: float, **fields: Any) -> bytes:
    """A node's metrics record as the nodes publish it (hfl_mqtt/metrics.py)."""
    role, level, parent = {
        "cloud": ("root", 0, None),
        "edge-0": ("aggregator", 1, "cloud"),
    }.get(node, ("worker", 2, "edge-0"))
    value = {"node": node, "role": role, "level": level, "parent": parent, "status": "online"}
    value |= {"version": 1, "round": 1, "t": t, "uptime_s": 1.0, "traffic": {"up": [1, 100, 0, 0]}}
    return json.dumps(value | fields).encode()


def small_view(now: float) -> FederationView:
    view = FederationView("demo")
    for node in ("cloud", "edge-0", "worker-0", "worker-1"):
        view.observe(f"hfl/demo/{node}/metrics", record(node, now), now)
    accuracy = [[0.5, 1, 0.81, 0.7], [1.0, 2, 0.875, 0.5]]
    view.observe("hfl/demo/cloud/metrics", record("cloud", now + 1, accuracy=accuracy), now + 1)
    return view


async def read_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next snapshot of an event stream (comment lines skipped)."""
    data = b""
    async with asyncio.timeout(5):
        while True:
            line = await response.content.readline()
            if line.startswith(b"data: "):
                data = line[6:]
            elif line == b"\n" and data:
                parsed: dict[str, Any] = json.loads(data)
                return parsed


@pytest.fixture
async def served() -> AsyncIterator[tuple[FederationView, Dashboard, aiohttp.ClientSession]]:
    view = small_view(time.time())
    async with (
        Dashboard(view, "127.0.0.1", 0, interval=0.05) as dashboard,
        aiohttp.ClientSession(dashboard.url) as session,
    ):
        yield view, dashboard, session


async def test_state_is_the_views_snapshot(
    served: tuple[FederationView, Dashboard, aiohttp.ClientSession],
) -> None:
    _, _, session = served
    async with session.get("/api/state") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        state = await response.json()
    assert state["federation"] == "demo"
    assert [n["id"] for n in state["nodes"]] == ["cloud", "edge-0", "worker-0", "worker-1"]
    assert all(node.keys() >= NODE_KEYS for node in state["nodes"])
    assert [p["accuracy"] for p in state["accuracy"]] == [0.81, 0.875]
    assert state["totals"]["nodes"] == state["totals"]["online"] == 4
    assert {"staleness", "rejections"} <= state.keys()


async def test_events_push_a_snapshot_after_a_change(
    served: tuple[FederationView, Dashboard, aiohttp.ClientSession],
) -> None:
    view, dashboard, session = served
    async with session.get("/api/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await read_event(response)  # the state at once
        assert len(first["nodes"]) == 4
        now = time.time() + 2
        assert view.observe("hfl/demo/worker-2/metrics", record("worker-2", now), now)
        dashboard.changed()
        second = await read_event(response)
        assert [n["id"] for n in second["nodes"]][-1] == "worker-2"
        assert dashboard.clients == 1
    async with asyncio.timeout(5):  # the client went away: dropped at the next write
        while dashboard.clients:
            dashboard.changed()
            await asyncio.sleep(0.05)


async def test_changes_are_coalesced_and_nan_is_null() -> None:
    view = small_view(time.time())
    async with (
        Dashboard(view, "127.0.0.1", 0, interval=0.3, keepalive=0.1) as dashboard,
        aiohttp.ClientSession(dashboard.url) as session,
        session.get("/api/events") as response,
    ):
        await read_event(response)
        now = time.time() + 2
        for i in range(50):
            view.observe("hfl/demo/cloud/metrics", record("cloud", now + i, cpu_s=i), now + i)
            dashboard.changed()
        view.observe("hfl/demo/edge-0/metrics", record("edge-0", now, cpu_s=float("nan")), now)
        dashboard.changed()
        last = await read_event(response)
        assert dashboard.sent == 1  # 51 changes, one snapshot
        await asyncio.sleep(0.4)  # keep-alive comments meanwhile, and nothing new to send
        assert dashboard.sent == 1
        assert last["nodes"][0]["cpu_s"] == 49
        edge = next(n for n in last["nodes"] if n["id"] == "edge-0")
        assert edge["cpu_s"] is None  # NaN is not JSON: a browser would refuse the snapshot


async def test_static_files_are_served(
    served: tuple[FederationView, Dashboard, aiohttp.ClientSession],
) -> None:
    _, _, session = served
    async with session.get("/") as response:
        page = await response.text()
    assert response.status == 200
    assert "/static/dashboard.js" in page
    assert 'id="accuracy-value"' in page
    assert "http" not in page.replace("http-equiv", "")  # nothing from elsewhere: no CDN
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        async with session.get(f"/static/{name}") as response:
            assert response.status == 200
            assert kind in response.content_type
            assert await response.read() == (static_dir() / name).read_bytes()
    async with session.get("/static/../web.py") as response:
        assert response.status in (403, 404)


async def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="address already in use"):
            async with Dashboard(FederationView(), "127.0.0.1", port):
                pass
    assert parse_web_address("[::1]:0") == ("::1", 0)
    with pytest.raises(ConfigError, match="--web"):
        parse_web_address("8080")


async def test_web_server_follows_its_source() -> None:
    class Source:
        def __init__(self) -> None:
            self.listeners: list[Any] = []

    view, source = small_view(time.time()), Source()
    async with web_server("127.0.0.1", 0)(view, source) as dashboard:
        assert source.listeners == [dashboard.changed]
    assert source.listeners == []


def write_run(path: Path, t0: float) -> None:
    lines: list[dict[str, Any]] = [
        {"event": "node", "t": t0, "topic": "hfl/demo/cloud/status", "payload": {"state": "online"}}
    ]
    for i, node in enumerate(("cloud", "edge-0", "worker-0")):
        payload = json.loads(record(node, t0 + i * 0.1))
        lines.append({"event": "node", "t": t0 + i * 0.1, "topic": f"hfl/demo/{node}/metrics"})
        lines[-1]["payload"] = payload
    lines.append({"global_round": 1, "version": 1, "accuracy": 0.9, "loss": 0.3, "seconds": 1})
    accuracy = [[1.0, 1, 0.9, 0.3]]
    final = json.loads(record("cloud", t0 + 0.5, version=2, accuracy=accuracy))
    lines.append({"event": "node", "t": t0 + 0.5, "topic": "hfl/demo/cloud/metrics"})
    lines[-1]["payload"] = final
    text = "\n".join(json.dumps(line) for line in lines)
    path.write_text(text + '\n{"event": "node", "t": 1, "topic"\n')  # cut short by a kill


async def test_replay_all_at_once_and_paced(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    t0 = time.time() - 3600  # an old run: ages are the run's, not today's
    write_run(path, t0)
    assert len(list(node_lines(path))) == 5
    assert [e["accuracy"] for e in read_evaluations(path)] == [0.9]

    view = FederationView()
    replay = Replay(path, view)
    assert replay.load() == 5
    assert replay.done
    state = view.snapshot(replay.clock())
    assert [n["id"] for n in state["nodes"]] == ["cloud", "edge-0", "worker-0"]
    assert state["accuracy"][-1]["accuracy"] == 0.9
    assert max(n["age_s"] for n in state["nodes"]) < 1

    changes: list[float] = []
    paced = Replay(path, FederationView(), speed=2.0, on_change=lambda: changes.append(1))
    started = time.monotonic()
    await paced.run()
    assert 0.2 < time.monotonic() - started < 2  # 0.5 recorded seconds at twice the pace
    assert paced.done
    assert len(changes) == 5
    with pytest.raises(ValueError, match="speed"):
        Replay(path, view, speed=0)


async def test_the_sims_watch_records_node_messages(start_broker: Any, tmp_path: Path) -> None:
    broker: MosquittoBroker = start_broker()
    address = BrokerAddress(host=broker.host, port=broker.port)
    path = tmp_path / "metrics.jsonl"
    heard: list[str] = []
    async with MqttLink(broker.host, broker.port, "node") as node:
        await node.publish("hfl/demo/cloud/status", b'{"state": "online"}', retain=True)
        with path.open("w") as sink:
            watch = NodeWatch(
                "demo", [address, address], sink, on_message=lambda t, p, n: heard.append(t)
            )
            async with watch:
                await node.publish("hfl/demo/cloud/metrics", record("cloud", time.time()))
                await node.publish("hfl/demo/cloud/model", b"not a record")
                await node.publish("hfl/other/cloud/metrics", record("cloud", time.time()))
                await node.publish("hfl/demo/edge-0/metrics", b"not JSON")
                async with asyncio.timeout(5):
                    while len(heard) < 2:
                        await asyncio.sleep(0.05)
    assert heard == ["hfl/demo/cloud/status", "hfl/demo/cloud/metrics"]  # one broker, once
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["node", "node"]
    assert lines[1]["payload"]["node"] == "cloud"
    assert read_evaluations(path) == []


async def test_monitor_serves_the_dashboard_of_a_broker(start_broker: Any) -> None:
    broker: MosquittoBroker = start_broker()
    said: list[str] = []
    options = MonitorOptions(
        broker=BrokerAddress(host=broker.host, port=broker.port),
        federation="demo",
        terminal=False,
        servers=[web_server("127.0.0.1", 0, say=said.append)],
    )
    stop = asyncio.Event()
    async with MqttLink(broker.host, broker.port, "cloud") as node:
        await node.publish("hfl/demo/cloud/metrics", record("cloud", time.time()), retain=True)
        monitor = asyncio.create_task(run_monitor(options, stop=stop))
        try:
            async with asyncio.timeout(10):
                while not said:
                    await asyncio.sleep(0.05)
            url = said[0].split()[-1]
            async with aiohttp.ClientSession(url) as session:
                async with session.get("/api/events") as response:
                    first = await read_event(response)
                    while [n["id"] for n in first["nodes"]] != ["cloud"]:
                        first = await read_event(response)  # the retained record arrives
                    await node.publish("hfl/demo/edge-0/metrics", record("edge-0", time.time()))
                    pushed = await read_event(response)
                assert [n["id"] for n in pushed["nodes"]] == ["cloud", "edge-0"]
        finally:
            stop.set()
            await monitor


def test_monitor_replays_a_finished_run(tmp_path: Path, spawn: Any) -> None:
    path = tmp_path / "metrics.jsonl"
    write_run(path, time.time() - 60)
    log = tmp_path / "monitor.log"
    command = [sys.executable, "-m", "hfl_mqtt.cli", "monitor", "--replay", str(path)]
    process = spawn(
        [*command, "--web", "127.0.0.1:0"], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 15
    while "http://" not in log.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    url = log.read_text().split("http://")[1].split()[0]
    with urllib.request.urlopen(f"http://{url}api/state", timeout=5) as response:
        state = json.loads(response.read())
    assert [n["id"] for n in state["nodes"]] == ["cloud", "edge-0", "worker-0"]
    assert state["accuracy"][-1]["accuracy"] == 0.9


async def test_the_sims_dashboard_process_serves_watches_and_appends(
    start_broker: Any, tmp_path: Path
) -> None:
    """``sim --web``'s dashboard runs in its own process: it serves the page at once, hears the
    nodes once told the brokers, and appends their lines after the simulator's own."""
    broker: MosquittoBroker = start_broker()
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_round": 1, "accuracy": 0.5}\n')
    async with (
        SimDashboard("127.0.0.1", 0) as dashboard,
        aiohttp.ClientSession() as session,
        MqttLink(broker.host, broker.port, "cloud") as node,
    ):
        await node.publish("hfl/demo/cloud/status", b'{"state": "online"}', retain=True)
        await dashboard.watch("demo", [BrokerAddress(host=broker.host, port=broker.port)], path)
        await node.publish("hfl/demo/cloud/metrics", record("cloud", time.time()), retain=True)
        async with asyncio.timeout(10):
            while True:
                async with session.get(dashboard.url + "api/state") as response:
                    state = await response.json()
                if state["nodes"] and state["nodes"][0]["role"] == "root":
                    break
                await asyncio.sleep(0.1)
        assert state["federation"] == "demo"
        assert await dashboard.drain() == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"global_round": 1, "accuracy": 0.5}  # the simulator's line kept
    assert [line.get("event") for line in lines[1:]] == ["node", "node"]


async def test_the_sims_dashboard_process_on_a_port_in_use_fails_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="address already in use"):
            async with SimDashboard("127.0.0.1", port):
                pass


def test_replaying_a_file_that_is_no_metrics_jsonl_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hfl_mqtt.cli import main

    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {n} of prose\n" for n in range(5000)))
    with capture_logs() as logs:
        assert main(["monitor", "--replay", str(path), "--web", "127.0.0.1:0"]) == 2
    assert "no node records" in capsys.readouterr().err
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == 2  # the first unreadable line, then how many: not 5,000 lines
    assert warnings[-1]["lines"] == 5000
