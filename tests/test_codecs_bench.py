"""`meg bench codecs` machinery on tiny tensors (the real run is a benchmark, not a test)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from meg.cli.bench import bench
from meg.codecs.bench import CodecBenchConfig, _print_table, run_codec_bench


def test_rows_carry_the_documented_fields() -> None:
    config = CodecBenchConfig(chains=("none", "int8,zstd:3", "merge:0.5,int8,zstd"), min_time_s=0.0, min_repeats=1)
    tensors = {"tiny": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    rows = run_codec_bench(config, tensors, progress=False)
    assert [r["chain"] for r in rows] == ["none", "int8,zstd:3", "merge:0.5,int8,zstd:3"]
    for row in rows:
        for key in ("chain", "bits_per_element", "ratio_vs_fp16", "psnr_db", "encode_mb_s", "decode_mb_s"):
            assert key in row
        assert row["encode_mb_s"] > 0 and row["decode_mb_s"] > 0
    assert rows[0]["bits_per_element"] == 32.0 and rows[0]["psnr_db"] is None  # exact
    assert rows[1]["psnr_db"] > 40 and rows[2]["ratio_vs_fp16"] > rows[1]["ratio_vs_fp16"]
    json.dumps(rows)
    _print_table(rows)


def test_registered_under_meg_bench() -> None:
    result = CliRunner().invoke(bench, ["codecs", "--help"])
    assert result.exit_code == 0 and "--json" in result.output
