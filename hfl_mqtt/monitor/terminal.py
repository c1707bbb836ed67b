"""The monitor in a terminal: the tree with statuses, versions, staleness and byte rates, and
the accuracy trend, drawn with rich from a ``FederationView`` snapshot.

``render`` is pure (a snapshot in, a rich renderable out: tests print it to a recording
console); ``live`` redraws it once a second. A parent with many children shows the first few
and one summary line for the rest, so a thousand workers still fit a screen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text
from rich.tree import Tree

from hfl_mqtt.monitor.view import FederationView, natural_key

__all__ = ["MAX_CHILDREN", "live", "render", "sparkline"]

MAX_CHILDREN = 8
"""Children drawn under one parent; the others are summed up in one line."""
_SPARK = "▁▂▃▄▅▆▇█"
_STYLE = {"online": "green", "idle": "yellow", "offline": "red", "unknown": "dim"}
_MARK = {"online": "●", "idle": "◐", "offline": "○", "unknown": "?"}


def _bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def sparkline(values: list[float], width: int = 40) -> str:
    """The last ``width`` values as block characters, scaled between their min and max."""
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    if span <= 0:
        return _SPARK[-1] * len(values)
    top = len(_SPARK) - 1
    return "".join(_SPARK[round((v - low) / span * top)] for v in values)


def _label(node: dict[str, Any]) -> Text:
    status = node["status"] if node["status"] in _STYLE else "unknown"
    text = Text()
    text.append(f"{_MARK[status]} ", style=_STYLE[status])
    text.append(node["id"], style="bold")
    text.append(f" {node['role'] or '?'}", style="dim")
    text.append(f" {status}", style=_STYLE[status])
    if node["version"] is not None:
        text.append(f"  v{node['version']}", style="cyan")
    if node["round"]:
        text.append(f" r{node['round']}")
    if node["status"] != "offline" and (node["rate_out"] or node["rate_in"]):
        text.append(f"  ↑{_bytes(node['rate_out'])}/s ↓{_bytes(node['rate_in'])}/s")
    text.append(f"  out {_bytes(node['bytes_out'])}", style="dim")
    staleness = node.get("staleness")
    if staleness and staleness.get("n"):
        text.append(
            f"  stale p50 {staleness.get('p50')} p95 {staleness.get('p95')} "
            f"max {staleness.get('max')} (n {staleness.get('n')})",
            style="magenta",
        )
    if node["accepted"]:
        text.append(f"  accepted {node['accepted']}")
    rejected = node.get("rejected") or {}
    if rejected:
        counts = " ".join(f"{reason}:{count}" for reason, count in sorted(rejected.items()))
        text.append(f"  rejected {counts}", style="red")
    if node["age_s"] is not None and node["age_s"] >= 10:
        text.append(f"  (record {node['age_s']:.0f} s old)", style="dim")
    return text


def _summary(rest: list[dict[str, Any]]) -> Text:
    statuses: dict[str, int] = {}
    for node in rest:
        statuses[node["status"]] = statuses.get(node["status"], 0) + 1
    versions = [node["version"] for node in rest if node["version"] is not None]
    text = Text(f"… {len(rest)} more: ", style="dim")
    text.append(", ".join(f"{count} {status}" for status, count in sorted(statuses.items())))
    if versions:
        low, high = min(versions), max(versions)
        text.append(f"  v{low}" if low == high else f"  v{low}-{high}", style="cyan")
    rate = sum(node["rate_out"] for node in rest)
    if rate:
        text.append(f"  ↑{_bytes(rate)}/s")
    return text


def _tree(snapshot: dict[str, Any]) -> Tree:
    nodes: list[dict[str, Any]] = snapshot["nodes"]
    ids = {node["id"] for node in nodes}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for node in nodes:  # already sorted by level, then id
        parent = node["parent"] if node["parent"] in ids else None
        children.setdefault(parent, []).append(node)
    totals = snapshot["totals"]
    title = Text(f"federation {snapshot['federation'] or '?'}", style="bold")
    title.append(
        f"  {totals['online']}/{totals['nodes']} up  out {_bytes(totals['bytes_out'])}"
        f"  {_bytes(totals['rate_out'])}/s",
        style="dim",
    )
    tree = Tree(title)

    drawn: set[str] = set()

    def add(branch: Tree, parent: str | None) -> None:
        # Parents are drawn in full; leaves past MAX_CHILDREN are summed up in one line.
        kids = children.get(parent, [])
        inner = [node for node in kids if node["id"] in children]
        leaves = [node for node in kids if node["id"] not in children]
        shown = inner + leaves[: max(0, MAX_CHILDREN - len(inner))]
        for node in sorted(shown, key=lambda n: natural_key(n["id"])):
            drawn.add(node["id"])
            add(branch.add(_label(node)), node["id"])
        if len(shown) < len(kids):
            rest = leaves[len(shown) - len(inner) :]
            drawn.update(node["id"] for node in rest)
            branch.add(_summary(rest))

    add(tree, None)
    for node in nodes:  # in a parent loop (hostile records): not under any root
        if node["id"] not in drawn:
            tree.add(_label(node))
    return tree


def _accuracy(snapshot: dict[str, Any]) -> Text:
    points: list[dict[str, Any]] = snapshot["accuracy"]
    if not points:
        return Text("accuracy: no evaluation yet", style="dim")
    last = points[-1]
    text = Text("accuracy ")
    text.append(sparkline([p["accuracy"] for p in points]), style="green")
    text.append(f" {last['accuracy']:.4f}", style="bold green")
    if last["version"] is not None:
        text.append(f" (v{last['version']}")
        text.append(f", loss {last['loss']:.4f})" if last["loss"] is not None else ")")
    text.append(f"  {len(points)} evaluations", style="dim")
    return text


def _staleness(snapshot: dict[str, Any]) -> Text | None:
    levels: dict[str, dict[str, Any]] = snapshot["staleness"]
    if not levels:
        return None
    parts = [
        f"level {level}: p50 {s.get('p50')} p95 {s.get('p95')} max {s.get('max')} n {s.get('n')}"
        for level, s in levels.items()
    ]
    return Text("staleness  " + "  |  ".join(parts), style="magenta")


def _rejections(snapshot: dict[str, Any], count: int = 5) -> Text | None:
    latest: list[dict[str, Any]] = snapshot["rejections"][:count]
    if not latest:
        return None
    text = Text("latest rejections", style="red")
    for entry in latest:
        text.append(f"\n  {entry['node']} {entry['reason']} x{entry['count']}")
        if entry["detail"]:
            text.append(f": {entry['detail']}", style="dim")
    return text


def render(snapshot: dict[str, Any]) -> RenderableType:
    """One screen of the monitor for a snapshot (``FederationView.snapshot``)."""
    parts: list[RenderableType] = [_tree(snapshot), _accuracy(snapshot)]
    for extra in (_staleness(snapshot), _rejections(snapshot)):
        if extra is not None:
            parts.append(extra)
    return Group(*parts)


async def live(
    view: FederationView,
    *,
    console: Console | None = None,
    interval: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Redraw the view every ``interval`` seconds until cancelled."""
    with Live(
        render(view.snapshot(clock())), console=console, auto_refresh=False, transient=False
    ) as screen:
        while True:
            await asyncio.sleep(interval)
            screen.update(render(view.snapshot(clock())), refresh=True)
