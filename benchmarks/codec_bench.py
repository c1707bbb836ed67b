"""Codec benchmark: size, speed and error of every codec spec, side by side with Flower's bytes.

For a 1M- and a 10M-parameter float32 model made of realistic layer shapes (a small CNN, a small
transformer), and for each spec with and without zstd, it measures the encoded message size, the
ratio to Flower's npy bytes, end-to-end encode and decode throughput (envelope and digest
included; MB/s of float32 input, best of several runs, pinned to one core) and the relative error
``||decoded - x|| / ||x||``. When flwr is installed, Flower's own ``ndarrays_to_parameters`` /
``parameters_to_ndarrays`` are timed in the same run.

    python benchmarks/codec_bench.py --json codec.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hfl_mqtt.codec import Header, decode_message, encode_message, npy_bytes, parse_spec

SPECS = ("npy", "fp16", "q8", "q4", "q2", "topk0.01+q8")
REPEATS = 5


def cnn_1m() -> dict[str, tuple[int, ...]]:
    """A small CNN for 32x32 images: about 1.0M parameters."""
    return {
        "conv1.weight": (32, 3, 3, 3),
        "conv1.bias": (32,),
        "bn1.weight": (32,),
        "bn1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "bn2.weight": (64,),
        "bn2.bias": (64,),
        "conv3.weight": (128, 64, 3, 3),
        "conv3.bias": (128,),
        "fc1.weight": (256, 128 * 4 * 4 + 1536),
        "fc1.bias": (256,),
        "fc2.weight": (128, 256),
        "fc2.bias": (128,),
        "head.weight": (10, 128),
        "head.bias": (10,),
    }


def transformer_10m() -> dict[str, tuple[int, ...]]:
    """A small transformer encoder (d=384, 4 layers, 8k vocabulary): about 10.2M parameters."""
    d, ff, vocab = 384, 1536, 8000
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d), "pos.weight": (256, d)}
    for i in range(4):
        p = f"layers.{i}."
        shapes |= {
            p + "attn.in_proj.weight": (3 * d, d),
            p + "attn.in_proj.bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d),
            p + "attn.out_proj.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "ff.linear1.weight": (ff, d),
            p + "ff.linear1.bias": (ff,),
            p + "ff.linear2.weight": (d, ff),
            p + "ff.linear2.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        }
    shapes |= {"norm.weight": (d,), "norm.bias": (d,), "head.weight": (10, d), "head.bias": (10,)}
    return shapes


def scaled_to(shapes: dict[str, tuple[int, ...]], params: int) -> dict[str, tuple[int, ...]]:
    """Shrink a model's widest dimensions so it has about ``params`` parameters (for smoke runs)."""
    total = sum(math.prod(s) for s in shapes.values())
    if params >= total:
        return shapes
    factor = math.sqrt(params / total)
    return {k: tuple(max(1, round(d * factor)) for d in s) for k, s in shapes.items()}


def make_model(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Update-like values: Gaussian, scaled by 1/sqrt(fan-in) per layer, as a model delta is."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        std = 0.01 / math.sqrt(fan_in)
        arrays[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    return arrays


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def relative_error(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((y[k].astype(np.float64) - x[k]) ** 2)) for k in x)
    den = sum(float(np.sum(x[k].astype(np.float64) ** 2)) for k in x)
    return math.sqrt(num / den)


def bench_spec(
    model: str, arrays: dict[str, np.ndarray], spec_text: str, npy_bytes: int, repeats: int
) -> dict[str, Any]:
    spec = parse_spec(spec_text)
    header = Header(federation="bench", sender="worker-1", kind="delta", version=1, base_version=0)
    params = sum(a.size for a in arrays.values())
    mb = params * 4 / 1e6
    data = encode_message(header, arrays, spec)
    decoded = decode_message(data).arrays
    encode_s = best_time(lambda: encode_message(header, arrays, spec), repeats)
    decode_s = best_time(lambda: decode_message(data), repeats)
    return {
        "model": model,
        "spec": str(spec),
        "params": params,
        "bytes": len(data),
        "ratio_vs_npy": npy_bytes / len(data),
        "encode_mb_s": mb / encode_s,
        "decode_mb_s": mb / decode_s,
        "rel_error": relative_error(arrays, decoded),
    }


def bench_flower(model: str, arrays: dict[str, np.ndarray], repeats: int) -> dict[str, Any] | None:
    try:
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    except ImportError:
        return None
    values = list(arrays.values())
    params = sum(a.size for a in values)
    mb = params * 4 / 1e6
    parameters = ndarrays_to_parameters(values)
    size = sum(len(t) for t in parameters.tensors)
    out = parameters_to_ndarrays(parameters)
    return {
        "model": model,
        "spec": "flwr.ndarrays_to_parameters",
        "params": params,
        "bytes": size,
        "ratio_vs_npy": 1.0,
        "encode_mb_s": mb / best_time(lambda: ndarrays_to_parameters(values), repeats),
        "decode_mb_s": mb / best_time(lambda: parameters_to_ndarrays(parameters), repeats),
        "rel_error": relative_error(arrays, dict(zip(arrays, out, strict=True))),
    }


TARGETS: dict[str, tuple[str, str, float]] = {
    "fp16 ratio": ("fp16", "ratio_vs_npy", 1.99),
    "q8 ratio": ("q8", "ratio_vs_npy", 3.9),
    "q4 ratio": ("q4", "ratio_vs_npy", 7.5),
    "q2 ratio": ("q2", "ratio_vs_npy", 14.0),
    "topk0.01+q8 ratio": ("topk0.01+q8", "ratio_vs_npy", 60.0),
    "q8+zstd encode MB/s": ("q8+zstd", "encode_mb_s", 500.0),
    "q8+zstd decode MB/s": ("q8+zstd", "decode_mb_s", 1000.0),
}
"""On the largest model measured: spec, measure, the least it may be."""


def check_targets(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each target of ``TARGETS`` on the largest model measured: met or missed, and the value."""
    largest = max(records, key=lambda r: r["params"])["model"]
    by_spec = {r["spec"]: r for r in records if r["model"] == largest}
    out: dict[str, dict[str, Any]] = {}
    for name, (spec, measure, least) in TARGETS.items():
        row = by_spec.get(spec)
        value = None if row is None else round(float(row[measure]), 2)
        out[name] = {
            "model": largest,
            "value": value,
            "target": f">= {least}",
            "met": value is not None and value >= least,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the records as JSON to FILE")
    parser.add_argument(
        "--params",
        type=int,
        nargs="*",
        default=[1_000_000, 10_000_000],
        help="approximate model sizes (default: 1M and 10M)",
    )
    parser.add_argument("--specs", nargs="*", default=list(SPECS), help="specs, each also +zstd")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timing runs, best is kept")
    parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    args = parser.parse_args(argv)

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    records: list[dict[str, Any]] = []
    header = f"{'model':<20}{'spec':<30}{'bytes':>12}{'ratio':>8}{'enc MB/s':>10}{'dec MB/s':>10}"
    print(header + f"{'rel.err':>10}")
    for target in args.params:
        base = cnn_1m() if target < 5_000_000 else transformer_10m()
        shapes = scaled_to(base, target)
        params = sum(math.prod(s) for s in shapes.values())
        model = f"{'cnn' if target < 5_000_000 else 'transformer'}-{params / 1e6:.2f}M"
        arrays = make_model(shapes, seed=params)
        npy_size = sum(len(npy_bytes(a)) for a in arrays.values())  # Flower's bytes
        rows = [bench_flower(model, arrays, args.repeats)]
        for spec in args.specs:
            for variant in (spec, f"{spec}+zstd"):
                rows.append(bench_spec(model, arrays, variant, npy_size, args.repeats))
        for row in rows:
            if row is None:
                continue
            records.append(row)
            print(
                f"{row['model']:<20}{row['spec']:<30}{row['bytes']:>12}{row['ratio_vs_npy']:>8.2f}"
                f"{row['encode_mb_s']:>10.0f}{row['decode_mb_s']:>10.0f}{row['rel_error']:>10.4f}",
                flush=True,
            )
    targets = check_targets(records)
    for name, target in targets.items():
        print(f"target {name}: {target['value']} ({target['target']}): "
              f"{'met' if target['met'] else 'MISSED'}")  # fmt: skip
    if args.json:
        result = {
            "benchmark": "codec",
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus_used": 1 if not args.all_cores else os.cpu_count(),
            "targets": targets,
            "records": records,
        }
        with open(args.json, "w", encoding="utf8") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
