#!/usr/bin/env python3
"""Write plausible smart-farm sensor readings with an irrigation label, as a CSV file.

Stands in for the log a board in a field would keep: one row per reading of soil moisture
(% volumetric water content), soil and air temperature (deg C), air humidity (%) and light
(klux), labelled with the irrigation the plot needed (0: none, 1: light, 2: heavy). The label
follows the plot's water deficit: dry soil, heat and strong light raise it, humid air lowers
it, evaporation grows with heat *and* light together (so an MLP does better than a linear
model), and a few labels are wrong, as a farmer's log would be.

Each plot (``--plot``) has its own soil, so devices see different moisture ranges (non-IID
data, as real fields are); ``--plot mixed`` draws every row from a random plot, for the root's
held-out test file.

    python3 make_readings.py readings.csv --rows 400 --plot 3 --seed 3
    python3 make_readings.py holdout.csv --rows 1000 --plot mixed --seed 100

Needs numpy only (the agent's venv has it).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import numpy.typing as npt

COLUMNS = ("soil_moisture", "soil_temp_c", "air_temp_c", "air_humidity", "light_klux")
LABEL = "irrigation"
NUM_CLASSES = 3
NUM_PLOTS = 8
MEAN = (25.0, 17.0, 21.0, 62.0, 40.0)
"""Standardisation every node applies (the example config's ``mean`` and ``std``): fixed
from the sensors' ranges, not computed from any one device's data."""
STD = (9.0, 5.0, 7.0, 16.0, 28.0)
LABEL_NOISE = 0.03


def readings(
    rows: int, plot: int | None, seed: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """``rows`` readings (columns ``COLUMNS``) and their labels, of plot ``plot`` (0..7) or,
    for None, of random plots."""
    rng = np.random.default_rng([seed, NUM_PLOTS if plot is None else plot])
    plots = rng.integers(0, NUM_PLOTS, rows) if plot is None else np.full(rows, plot)
    # Sandy plots (low index) drain fast and read drier; clay plots (high index) hold water.
    soil_base = 14.0 + 2.6 * plots
    hour = rng.uniform(0, 24, rows)
    daylight = np.clip(np.sin((hour - 6) / 12 * np.pi), 0, None)
    air_temp = 12 + 14 * daylight + rng.normal(0, 3, rows)
    soil_temp = 0.6 * air_temp + 5 + rng.normal(0, 1.0, rows)
    humidity = np.clip(85 - 35 * daylight + rng.normal(0, 8, rows), 20, 100)
    light = np.clip(95 * daylight * rng.uniform(0.3, 1.0, rows), 0, None)
    moisture = np.clip(soil_base + rng.normal(0, 7, rows), 3, 50)
    evaporation = np.clip(air_temp - 10, 0, None) * light / 180
    deficit = (26 - moisture) + 0.25 * (air_temp - 20) - 0.06 * (humidity - 60) + evaporation
    labels = np.digitize(deficit, [4.0, 11.0]).astype(np.int64)
    wrong = rng.random(rows) < LABEL_NOISE
    labels[wrong] = rng.integers(0, NUM_CLASSES, int(wrong.sum()))
    x = np.column_stack([moisture, soil_temp, air_temp, humidity, light])
    return x, labels


def write_csv(path: Path, x: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> None:
    with path.open("w", newline="", encoding="utf8") as f:
        out = csv.writer(f)
        out.writerow([*COLUMNS, LABEL])
        for features, label in zip(x.tolist(), y.tolist(), strict=True):
            out.writerow([f"{v:.2f}" for v in features] + [str(label)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the CSV file to write")
    parser.add_argument("--rows", type=int, default=400, help="readings (default 400)")
    parser.add_argument(
        "--plot", default="0", help=f"plot 0..{NUM_PLOTS - 1}, or 'mixed' (default 0)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.plot == "mixed":
        plot = None
    elif args.plot.isdigit() and int(args.plot) < NUM_PLOTS:
        plot = int(args.plot)
    else:
        parser.error(f"--plot: expected 0..{NUM_PLOTS - 1} or 'mixed', got {args.plot!r}")
    if args.rows < 1:
        parser.error("--rows must be >= 1")
    x, y = readings(args.rows, plot, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.out, x, y)
    counts = ", ".join(f"{c}: {n}" for c, n in enumerate(np.bincount(y, minlength=NUM_CLASSES)))
    print(f"{args.out}: {len(y)} readings, labels {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
