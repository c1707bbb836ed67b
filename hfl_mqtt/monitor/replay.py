"""Replay a finished simulation's ``metrics.jsonl`` into a ``FederationView``.

The sim writes every status and metrics message of its nodes as a "node" line
(``{"event": "node", "t": WALL, "topic": ..., "payload": {...}}``, ``hfl_mqtt.simwatch``);
replaying feeds them to a view in order, each at its recorded time, either all at once (the
view ends as it was when the run ended) or paced at ``speed`` times the run's pace, for the
dashboard to show the run again. ``clock()`` is the replayed wall time, which the dashboard asks
the view at (so ages and byte rates are those of the run, not of today).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from hfl_mqtt.errors import ConfigError
from hfl_mqtt.monitor.view import FederationView

__all__ = ["NodeLine", "Replay", "node_lines", "serve_replay"]

log = structlog.get_logger("hfl_mqtt.monitor")

_MAX_SLEEP_S = 2.0
"""A pause longer than this in the recording is cut short at any speed (nothing happened)."""


@dataclass(frozen=True, slots=True)
class NodeLine:
    """One recorded message: when it arrived (wall seconds), its topic and payload."""

    t: float
    topic: str
    payload: bytes


def node_lines(path: Path) -> Iterator[NodeLine]:
    """The "node" lines of a metrics.jsonl, in order; evaluations and bad lines are skipped
    (a line cut short by a killed run is only logged)."""
    unreadable = 0
    with path.open(errors="replace") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                unreadable += 1
                if unreadable == 1:  # once: a file that is no metrics.jsonl has thousands
                    log.warning("unreadable line skipped", file=str(path), line=number)
                continue
            if not isinstance(line, dict) or line.get("event") != "node":
                continue
            t, topic = line.get("t"), line.get("topic")
            if not isinstance(t, int | float) or not isinstance(topic, str):
                log.warning("node line without t or topic skipped", file=str(path), line=number)
                continue
            payload = json.dumps(line.get("payload"), separators=(",", ":")).encode()
            yield NodeLine(float(t), topic, payload)
    if unreadable > 1:
        log.warning("unreadable lines skipped", file=str(path), lines=unreadable)


class Replay:
    """Feed ``path``'s node lines into ``view``: ``run()`` paced, or ``load()`` at once.

    ``speed``: how many recorded seconds pass per real second (pauses longer than 2 s real
    are cut short). ``on_change`` is told whenever the view changed (the dashboard's
    ``changed``).
    """

    def __init__(
        self,
        path: Path,
        view: FederationView,
        *,
        speed: float = 1.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self.path = path
        self.view = view
        self.speed = speed
        self.on_change = on_change
        self.lines = list(node_lines(path))
        self.fed = 0
        """Lines fed so far."""
        self._now = self.lines[0].t if self.lines else time.time()

    def clock(self) -> float:
        """The replayed wall time: that of the last line fed (the start before any)."""
        return self._now

    @property
    def done(self) -> bool:
        return self.fed == len(self.lines)

    def _feed(self, line: NodeLine) -> None:
        self._now = line.t
        self.fed += 1
        if self.view.observe(line.topic, line.payload, line.t) and self.on_change is not None:
            self.on_change()

    def load(self) -> int:
        """Feed every remaining line at once; returns how many were fed."""
        before = self.fed
        for line in self.lines[self.fed :]:
            self._feed(line)
        return self.fed - before

    async def run(self) -> None:
        """Feed the remaining lines at ``speed`` times the recorded pace."""
        for line in self.lines[self.fed :]:
            wait = (line.t - self._now) / self.speed
            if wait > 0:
                await asyncio.sleep(min(wait, _MAX_SLEEP_S))
            self._feed(line)
            if wait <= 0 and self.fed % 1000 == 0:
                await asyncio.sleep(0)  # a burst of lines must not starve the server
        log.info("replay done", lines=self.fed)


def _say(text: str) -> None:
    print(text, flush=True)  # at once, also into a pipe


async def serve_replay(
    path: Path,
    host: str,
    port: int,
    *,
    speed: float | None = None,
    say: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard of a finished run (its metrics.jsonl) until cancelled: the run's
    end at once, or the run again at ``speed``."""
    from hfl_mqtt.monitor.web import Dashboard

    view = FederationView()
    dashboard = Dashboard(view, host, port, mode="replay")
    replay = Replay(path, view, speed=speed or 1.0, on_change=dashboard.changed)
    dashboard.clock = replay.clock
    if not replay.lines:
        raise ConfigError(
            f"--replay {path}: no node records in it (a metrics.jsonl written by hfl-mqtt sim "
            "holds them)"
        )
    if speed is None:
        replay.load()
    async with dashboard:
        say = say or _say
        say(f"dashboard of {path} ({len(replay.lines)} records): {dashboard.url}")
        if speed is not None:
            await replay.run()
            say("replay done; still serving (Ctrl-C ends it)")
        await asyncio.Event().wait()
