"""The benchmark scripts run end to end on tiny models (their numbers are not checked here)."""

import json
from pathlib import Path

from benchmarks import codec_bench


def test_codec_bench_writes_one_record_per_model_and_spec(tmp_path: Path) -> None:
    out = tmp_path / "codec.json"
    assert (
        codec_bench.main(
            [
                "--params",
                "20000",
                "--specs",
                "npy",
                "q4",
                "--repeats",
                "1",
                "--all-cores",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    records = json.loads(out.read_text())["records"]
    ours = [r for r in records if not r["spec"].startswith("flwr")]
    assert [r["spec"] for r in ours] == ["npy", "npy+zstd", "q4", "q4+zstd"]
    for r in ours:
        assert {
            "spec",
            "params",
            "bytes",
            "ratio_vs_npy",
            "encode_mb_s",
            "decode_mb_s",
            "rel_error",
        } <= set(r)
        assert min(r["bytes"], r["encode_mb_s"], r["decode_mb_s"]) > 0
    assert ours[0]["rel_error"] == 0.0
    assert ours[2]["ratio_vs_npy"] > 6
