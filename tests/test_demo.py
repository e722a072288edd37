"""`meg demo` and `meg bench e2e` run the real system on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from click.testing import CliRunner
from PIL import Image
from sr_models import write_random_sr_models

from meg.cli import cli
from meg.recipes.report import GenerationReport
from meg.split.regions import foreground_count


def test_demo_writes_image_and_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--model", "tiny-random", "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["fallback"]["used"] is False
    assert report["plan"]["policy"] != "fallback"
    assert report["bytes"]["downlink"] > 0
    assert report["channel"]["mode"] == "digital"
    assert abs(report["channel"]["snr_db"] - 2.18) < 0.05  # MEG's path loss at 200 m
    assert report["quality"]["mse_vs_reference"] < 0.05
    with Image.open(out / "image.png") as image:
        assert image.size == (report["width"], report["height"])
    assert "MSE vs reference" in result.output
    assert "torchvision" not in result.output and "accelerate" not in result.output  # no third-party notices
    # the one report schema (docs/report.schema.json), and the typed report reads it back
    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert GenerationReport.from_dict(report).to_dict() == report


def test_demo_runs_hybrid_sr(tmp_path: Path) -> None:
    light, diffusion = write_random_sr_models(tmp_path)
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--model", "tiny-random", "--runtime", "onnxruntime",
                                      "--recipe", "hybrid-sr", "--target-size", "256", "--sr-model", str(diffusion),
                                      "--light-sr", str(light)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text()))
    assert report["recipe"] == "hybrid-sr" and report["fallback"]["used"] is False
    scale, gamma = report["plan"]["params"]["sr_scale"], report["plan"]["params"]["foreground_fraction"]
    assert report["width"] == 256 and scale in (2.0, 4.0)  # the policy plans S and γ
    assert len(report["extra"]["hybrid_sr"]["foreground_cells"]) == foreground_count(gamma, 16)
    assert report["quality"]["max_abs_diff"] <= 1e-3  # the in-process pipeline, up to fp16 patches on the wire
    assert "measured overlap" in result.output


def test_bench_e2e_rows(tmp_path: Path) -> None:
    from meg.bench.e2e import run_e2e_bench

    rows = run_e2e_bench("tiny-random")
    assert {r.plan for r in rows} >= {"device", "decoder", "image"}
    assert not any(r.fallback for r in rows)
    for row in rows:
        if row.plan in {"decoder", "image"} or row.plan.startswith("step:"):
            # lossless-enough chains: the split reproduces the unsplit image
            assert row.mse_vs_reference < 1e-4, row
    by = {(r.plan, r.channel): r for r in rows}
    for channel in ("meg-1MHz-200m", "meg-1MHz-300m"):
        assert by[("decoder", channel)].link_bytes < by[("image", channel)].link_bytes
        assert by[("decoder", channel)].modelled_latency_s < by[("image", channel)].modelled_latency_s
