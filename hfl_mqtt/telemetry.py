"""Staleness telemetry for ``summary.json`` and ``staleness.png``, built from node reports.

A level's telemetry covers the updates its aggregators received: the cloud level's is about the
edges' deltas, the edge level's about the workers'. Reports are the dicts of
``NodeReport.to_dict``; an arrival is ``[seconds_since_node_start, sender, staleness, weight]``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog

from hfl_mqtt.config import FederationConfig

__all__ = [
    "PERCENTILE_METHOD",
    "arrivals_by_level",
    "load_pyplot",
    "plot_staleness",
    "staleness_summary",
]

PERCENTILE_METHOD: Final = "linear"
"""How ``numpy.percentile`` interpolates p50 and p95 (numpy's default)."""
_DIGITS = 6
log = structlog.get_logger("hfl_mqtt.telemetry")


def _aggregator_levels(config: FederationConfig) -> list[str]:
    """Names of the levels that receive updates: every level but the last (the workers)."""
    return [level.name for level in config.levels[:-1]]


def arrivals_by_level(
    config: FederationConfig, reports: list[dict[str, Any]]
) -> dict[str, list[list[Any]]]:
    """Every accepted update of each aggregator level, in report order."""
    names = [level.name for level in config.levels]
    arrivals: dict[str, list[list[Any]]] = {name: [] for name in _aggregator_levels(config)}
    for report in reports:
        if report["role"] != "worker":
            arrivals[names[report["level"]]].extend(report.get("arrivals", []))
    return arrivals


def _number(value: float) -> float | None:
    """A JSON-safe float: rounded, and None where NaN or infinite (strict JSON has neither)."""
    return round(float(value), _DIGITS) if math.isfinite(value) else None


def _level_staleness(arrivals: list[list[Any]], rejected: Counter[str]) -> dict[str, Any]:
    staleness = np.array([a[2] for a in arrivals], dtype=np.int64)
    weights = np.array([a[3] for a in arrivals], dtype=np.float64)
    histogram = Counter(staleness.tolist())
    stats: dict[str, float | int | None] = dict.fromkeys(
        ("mean", "p50", "p95", "max", "weight_mean")
    )
    if staleness.size:
        p50, p95 = np.percentile(staleness, [50, 95], method=PERCENTILE_METHOD)
        stats = {
            "mean": _number(staleness.mean()),
            "p50": _number(p50),
            "p95": _number(p95),
            "max": int(staleness.max()),
            "weight_mean": _number(weights.mean()),
        }
    return {
        "count": int(staleness.size),
        **stats,
        # JSON object keys are strings; sorted by staleness, not as text.
        "histogram": {str(s): histogram[s] for s in sorted(histogram)},
        "rejected": dict(sorted(rejected.items())),
    }


def staleness_summary(
    config: FederationConfig, reports: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """``summary.json``'s ``staleness``: per aggregator level, the staleness of the updates its
    aggregators accepted, the weights they were given, and the refusals by reason."""
    names = [level.name for level in config.levels]
    rejected: dict[str, Counter[str]] = {name: Counter() for name in _aggregator_levels(config)}
    for report in reports:
        if report["role"] != "worker":
            rejected[names[report["level"]]].update(report["updates_rejected"])
    return {
        name: _level_staleness(arrivals, rejected[name])
        for name, arrivals in arrivals_by_level(config, reports).items()
    }


def load_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'hfl-mqtt[sim]')")
        return None
    return plt


def plot_staleness(
    plt: Any, config: FederationConfig, reports: list[dict[str, Any]], out: Path
) -> Path | None:
    """Write ``out/staleness.png``: per level that accepted updates, a histogram of their
    staleness and the staleness of each arrival over time. None if no update arrived."""
    from matplotlib.ticker import MaxNLocator

    levels = {name: a for name, a in arrivals_by_level(config, reports).items() if a}
    if not levels:
        return None
    stats = staleness_summary(config, reports)
    colours = plt.get_cmap("tab10").colors
    figure, axes = plt.subplots(
        len(levels), 2, figsize=(11, 2.8 * len(levels) + 0.6), squeeze=False
    )
    for row, (name, arrivals) in enumerate(levels.items()):
        colour = colours[row % len(colours)]
        summary = stats[name]
        histogram, timeline = axes[row]
        values = [int(s) for s in summary["histogram"]]
        histogram.bar(values, list(summary["histogram"].values()), width=0.8, color=colour)
        histogram.set_xlabel(f"staleness of updates received by {name} (versions)")
        histogram.set_ylabel("updates")
        histogram.set_title(
            f"{name}: {summary['count']} updates, mean {summary['mean']:.2f}, "
            f"p95 {summary['p95']:.1f}, max {summary['max']}",
            fontsize=10,
        )
        # Thousands of points: small, translucent markers show density instead of a blot.
        timeline.scatter(
            [a[0] for a in arrivals],
            [a[2] for a in arrivals],
            s=6,
            alpha=0.35,
            linewidths=0,
            color=colour,
            label=name,
        )
        timeline.set_xlabel("seconds since start")
        timeline.set_ylabel("staleness")
        timeline.legend(loc="upper left", fontsize=8, markerscale=2)
        for axis in (histogram.xaxis, histogram.yaxis, timeline.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        for subplot in (histogram, timeline):
            subplot.grid(alpha=0.3)
    figure.suptitle(f"{config.federation}: staleness of accepted updates")
    figure.tight_layout()
    path = out / "staleness.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
