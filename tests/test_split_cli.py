"""`meg export-onnx` and `meg bench split` on the tiny-random pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meg.cli import cli
from meg.errors import SplitError
from meg.split.onnx_cli import parts_for_split


def test_parts_for_each_split() -> None:
    assert parts_for_split("decoder") == ("decoder",)
    assert parts_for_split("step:2") == ("unet", "decoder")
    assert parts_for_split("device") == ("unet", "decoder")
    with pytest.raises(SplitError, match="'image'"):
        parts_for_split("image")
    with pytest.raises(SplitError):
        parts_for_split("nowhere")


def test_export_onnx_then_bench_split_on_the_cached_export(tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    args = ["export-onnx", "--model", "tiny-random", "--split", "decoder", "--out", str(onnx_dir), "--exporter", "torchscript"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"decoder"} and manifest["parts"]["decoder"]["latent_hw"] == [8, 8]
    refused = CliRunner().invoke(cli, [*args[:4], "image", *args[5:]])
    assert refused.exit_code == 1 and "runs nothing on the device" in refused.output

    out = tmp_path / "split.json"
    result = CliRunner().invoke(cli, [
        "bench", "split", "--model", "tiny-random", "--splits", "decoder,step:3,image", "--repeats", "1", "--warmup", "0",
        "--exporter", "torchscript", "--onnx-dir", str(onnx_dir), "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    # The decoder has the weights and options export-onnx used; the UNet is new.
    assert data["meta"]["onnx_export"]["decoder"]["cached"] is True
    assert data["meta"]["onnx_export"]["unet"]["cached"] is False
    rows = {row["split"]: row for row in data["rows"]}
    assert set(rows) == {"decoder", "step:3", "image"}
    # step:3: the device's last step runs in the ONNX UNet, then the ONNX decoder.
    assert rows["step:3"]["max_abs_diff"] <= 1e-4 and rows["step:3"]["max_abs_diff_onnx"] <= 1e-4
    assert rows["step:3"]["crossing_bytes_fp16"] > rows["decoder"]["crossing_bytes_fp16"]  # + the text embeddings
    decoder, image = rows["decoder"], rows["image"]
    for key in ("split", "crossing_bytes_fp16", "edge_gflops", "device_gflops", "torch_s", "onnx_s", "max_abs_diff"):
        assert key in decoder
    assert decoder["crossing_bytes_fp16"] == 1 * 4 * 8 * 8 * 2  # the fp16 latent of a 64×64 image
    assert image["crossing_bytes_fp16"] == 1 * 3 * 64 * 64 * 2
    assert decoder["max_abs_diff"] <= 1e-4 and decoder["max_abs_diff_onnx"] <= 1e-4
    assert image["device_gflops"] == 0 and decoder["device_gflops"] > 0 and decoder["edge_gflops"] > decoder["device_gflops"]
    assert decoder["torch_s"] > 0 and decoder["onnx_s"] > 0
    assert set(decoder["modelled_latency_s"]) == {"jetson-agx-orin", "phone-class", "this-machine"}
    assert decoder["modelled_latency_s"]["phone-class"] > decoder["modelled_latency_s"]["jetson-agx-orin"]
    assert data["meta"]["onnx_providers"] == ["CPUExecutionProvider"]
