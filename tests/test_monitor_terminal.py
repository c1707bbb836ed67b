"""The terminal view of a small tree, rendered to a recording console."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from rich.console import Console

from hfl_mqtt.monitor.terminal import MAX_CHILDREN, live, render, sparkline
from hfl_mqtt.monitor.view import FederationView


def observe(view: FederationView, node: str, t: float, **fields: Any) -> None:
    fields.setdefault("role", "worker")
    fields.setdefault("level", 2)
    view.observe(f"hfl/demo/{node}/metrics", json.dumps({"t": t, **fields}).encode(), t)


def small_tree() -> FederationView:
    view = FederationView()
    staleness = {"n": 12, "mean": 0.5, "p50": 0, "p95": 2, "max": 3, "hist": [8, 2, 1, 1]}
    accuracy = [[1.0, 1, 0.31, 2.0], [2.0, 2, 0.62, 1.1], [3.0, 3, 0.875, 0.42]]
    for t in (100.0, 102.0):
        grow = int(t - 99)
        observe(
            view, "cloud", t, role="root", level=0, parent=None, status="online", version=3,
            round=3, uptime_s=t - 99, accuracy=accuracy, traffic={"model": [1, 0, 1, 0]},
        )  # fmt: skip
        observe(
            view, "edge-0", t, role="aggregator", level=1, parent="cloud", status="online",
            version=7, staleness=staleness, rejected={"stale": 2}, last_error="stale: base v1",
            traffic={"model": [grow, 2000 * grow, 0, 0], "up": [0, 0, grow, 500 * grow]},
        )  # fmt: skip
        observe(view, "w0", t, parent="edge-0", status="online", version=7)
        observe(view, "w1", t, parent="edge-0", status="online", version=6)
    view.observe("hfl/demo/w1/status", b'{"state": "offline"}', 102.0)
    return view


def text_of(snapshot: dict[str, Any]) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render(snapshot))
    return console.export_text()


def test_a_small_tree() -> None:
    text = text_of(small_tree().snapshot(102.5))
    lines = text.splitlines()
    assert lines[0].startswith("federation demo  3/4 up")
    [cloud] = [line for line in lines if "cloud" in line]
    [edge] = [line for line in lines if "edge-0 aggregator" in line]
    [w0] = [line for line in lines if " w0 " in line]
    [w1] = [line for line in lines if " w1 " in line]
    # the tree: indentation grows with the level
    assert cloud.index("cloud") < edge.index("edge-0") < w0.index("w0")
    assert lines.index(cloud) < lines.index(edge) < lines.index(w0) < lines.index(w1)
    assert "root online" in cloud
    assert "v3" in cloud
    assert "aggregator online" in edge
    assert "v7" in edge
    assert "↑2.0 kB/s" in edge  # 4,000 bytes more in 2 s
    assert "↓500 B/s" in edge
    assert "stale p50 0 p95 2 max 3 (n 12)" in edge
    assert "rejected stale:2" in edge
    assert "offline" in w1
    assert "v6" in w1
    assert "accuracy ▁▅█ 0.8750 (v3, loss 0.4200)  3 evaluations" in text
    assert "level 1: p50 0 p95 2 max 3 n 12" in text
    assert "edge-0 stale x2: stale: base v1" in text


def test_status_colours() -> None:
    console = Console(record=True, width=120, file=io.StringIO(), color_system="truecolor")
    console.print(render(small_tree().snapshot(102.5)))
    html = console.export_html(inline_styles=True)
    assert "color: #008000" in html  # green: online
    assert "color: #800000" in html  # red: offline


def test_many_workers_are_summed_up() -> None:
    view = FederationView()
    observe(view, "edge-0", 1, role="aggregator", level=1, parent=None)
    for i in range(30):
        observe(view, f"w{i:02d}", 1, parent="edge-0", status="online", version=5 + i % 2)
    text = text_of(view.snapshot(2))
    assert f"… {30 - MAX_CHILDREN} more: {30 - MAX_CHILDREN} online  v5-6" in text
    assert len(text.splitlines()) < 15


def test_empty_and_unknown() -> None:
    text = text_of(FederationView("demo").snapshot(1))
    assert "federation demo  0/0 up" in text
    assert "no evaluation yet" in text
    view = FederationView()
    view.observe("hfl/demo/w3/status", b'{"state": "online", "parent": "ghost"}', 1)
    observe(view, "a", 1, parent="b")  # a parent loop: still drawn
    observe(view, "b", 1, parent="a")
    text = text_of(view.snapshot(1))
    assert "w3 ? online" in text
    assert " a worker" in text
    assert " b worker" in text


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], ""), ([1.0, 1.0], "██"), ([0.0, 0.5, 1.0], "▁▅█"), (list(range(50)), None)],
)
def test_sparkline(values: list[float], expected: str | None) -> None:
    line = sparkline(values)
    if expected is None:
        assert len(line) == 40
        assert line[0] == "▁"
        assert line[-1] == "█"
    else:
        assert line == expected


@pytest.mark.anyio
async def test_live_redraws() -> None:
    view = small_tree()
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    task = asyncio.create_task(live(view, console=console, interval=0.05, clock=lambda: 102.5))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "edge-0" in console.export_text()
