"""Which parent a node is attached to, and when it moves to another (docs/reparenting.md).

A node starts under its ``parent`` (its home). It watches the status of its home and of its
``fallbacks`` (retained, with the Last Will): when the current parent goes offline, or sends
no model for ``parent_timeout_s``, the node moves to the first fallback known to be online
(else the first whose status it has not seen). When its home is online again it goes back, if
``return_to_parent``. An operator's ``reparent`` moves it anywhere; that parent becomes its
home (it stays there). Pure: the roles do the subscribing, announcing and publishing.
"""

from __future__ import annotations

from hfl_mqtt.config import UpstreamConfig

__all__ = ["Parentage"]


class Parentage:
    """A node's current parent among its home and fallbacks."""

    def __init__(self, upstream: UpstreamConfig, now: float) -> None:
        self.home = upstream.parent
        self.current = upstream.parent
        self.fallbacks = upstream.fallback_ids
        self.return_home = upstream.return_to_parent
        self.timeout_s = upstream.parent_timeout_s
        self._online: dict[str, bool] = {}
        self._last_model = now

    @property
    def candidates(self) -> list[str]:
        """Every parent the node may be under: its home, its fallbacks, where it is now."""
        return list(dict.fromkeys([self.home, *self.fallbacks, self.current]))

    def status(self, node: str, online: bool) -> str | None:
        """``node``'s status came; returns the parent to move to now, if any."""
        self._online[node] = online
        if node == self.current and not online:
            return self._next()
        if node == self.home and online and self.return_home and self.current != self.home:
            return self.home
        return None

    def model_came(self, now: float) -> None:
        self._last_model = now

    def due_in(self, now: float) -> float | None:
        """Seconds until the current parent counts as silent (None: no timeout)."""
        if self.timeout_s is None:
            return None
        return max(0.0, self._last_model + self.timeout_s - now)

    def silent(self, now: float) -> str | None:
        """The current parent sent no model for too long: where to move (if anywhere)."""
        due = self.due_in(now)
        if due is None or due > 0:
            return None
        self._last_model = now  # one move per timeout
        self._online[self.current] = False
        return self._next()

    def unreachable(self, node: str) -> str | None:
        """``node``'s broker could not be reached: it counts as offline; returns the parent to
        try next (None: nowhere left, stay)."""
        self._online[node] = False
        return self._next()

    def move(self, parent: str, now: float, *, by_hand: bool = False) -> None:
        """The node is under ``parent`` from now on; by hand, it is its new home."""
        self.current = parent
        self._last_model = now
        if by_hand:
            self.home = parent

    def _next(self) -> str | None:
        others = [c for c in self.candidates if c != self.current]
        online = [c for c in others if self._online.get(c) is True]
        unseen = [c for c in others if c not in self._online]
        if online:
            return online[0]
        return unseen[0] if unseen else None
