"""Hybrid SR through the real services: background out first, foreground as it finishes,
stitched on the device; equal to the in-process pipeline; falls back to light SR alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sr_models import write_random_sr_models

from meg.errors import InvalidInputError
from meg.recipes.hybrid_sr import HybridSrRecipe, hybrid_plan, run_hybrid_sr
from meg.recipes.report import PartCost
from meg.services.background import RunningServer, ServiceLoop, start_edge
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
from meg.services.edge import EdgeConfig
from meg.split.engine import SplitEngine

PROMPT = "a red circle at the top left"
TARGET = 128  # tiny-random generates 64 px natively: S = 2


@pytest.fixture(scope="module")
def sr_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_random_sr_models(tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def edge(pipeline: Any, sr_models: tuple[Path, Path]) -> Iterator[RunningServer]:
    loop = ServiceLoop()
    server = start_edge(EdgeConfig(port=0, model="tiny-random", sr_model=str(sr_models[1])), pipeline=pipeline, loop=loop)
    yield server
    server.stop(0)
    loop.close()


def _client(edge: RunningServer, pipeline: Any, sr_models: tuple[Path, Path], **fields: Any) -> DeviceClient:
    config = ClientConfig(runtime=fields.pop("runtime", "eager"), light_sr=str(sr_models[0]), sr_model=str(sr_models[1]),
                          **fields)
    return DeviceClient(edge.address, config, pipeline=pipeline)


def _request(**fields: Any) -> DeviceRequest:
    plan = fields.pop("plan", hybrid_plan(steps=2, sr_scale=2, foreground_fraction=0.25, codec_chain="none"))
    values: dict[str, Any] = {"prompt": PROMPT, "seed": 5, "width": TARGET, "height": TARGET, **fields}
    return DeviceRequest(recipe="hybrid-sr", plan=plan, **values)


def test_served_hybrid_sr_equals_the_in_process_pipeline(edge: RunningServer, pipeline: Any,
                                                         sr_models: tuple[Path, Path]) -> None:
    events: list[str] = []

    def on_event(message: Any) -> None:
        if message.WhichOneof("kind") == "tensor_header":
            events.append(message.tensor_header.name)

    with _client(edge, pipeline, sr_models, fallback=False) as client:
        result = client.generate(_request(), reference=True, on_event=on_event)
    report = result.report
    assert result.image.shape == (1, 3, TARGET, TARGET)
    assert report.quality is not None and report.quality.max_abs_diff <= 1e-4  # equal to run_hybrid_sr
    info = report.extra["hybrid_sr"]
    foreground = info["foreground_cells"]
    assert len(foreground) == 4 and len(events) == 16  # γ = 0.25 of the 4×4 cells
    # background first, then the foreground cells as their diffusion SR finishes
    assert all(name.startswith("bg:") for name in events[:12]) and all(n.startswith("fg:") for n in events[12:])
    assert sorted(int(n[3:]) for n in events[12:]) == sorted(foreground)
    assert info["foreground_bytes"] > 0 and info["background_bytes"] > 0
    assert info["measured_first_background_s"] <= info["measured_last_foreground_s"]
    parts = {(p.part, p.measured) for p in report.parts}
    assert {("edge.compute", False), ("edge.sr", False), ("device.sr", False), ("link.downlink", False)} <= parts
    # T = T1 + max(T2 + T4, T3 + T5): below the sum of the parts, at least the longer path
    modelled = [p for p in report.parts if not p.measured]
    serial = sum(p.latency_s for p in modelled)
    t1 = sum(p.latency_s for p in modelled if p.part == "edge.compute")
    t2 = sum(p.latency_s for p in modelled if p.part == "edge.sr")
    assert t1 + t2 <= report.latency_s.modelled_total < serial


def test_in_process_pipeline_upscales_foreground_and_background_differently(
    pipeline: Any, sr_models: tuple[Path, Path]
) -> None:
    from meg.models.sr import load_diffusion_sr, load_light_sr

    engine = SplitEngine(pipeline)
    request = _request().to_proto()
    light, diffusion = load_light_sr(sr_models[0], scale=2), load_diffusion_sr(sr_models[1])
    hybrid = run_hybrid_sr(engine, diffusion, light, request, hybrid_plan(steps=2, sr_scale=2, codec_chain="none"))
    light_only = run_hybrid_sr(engine, diffusion, light, request,
                               hybrid_plan(steps=2, sr_scale=2, foreground_fraction=0.0, codec_chain="none"))
    assert hybrid.image.shape == light_only.image.shape == (1, 3, TARGET, TARGET)
    assert torch.equal(hybrid.low_res, light_only.low_res)
    assert not torch.allclose(hybrid.image, light_only.image)  # the foreground took the other model


def test_onnx_runtime_light_sr_matches_torch(edge: RunningServer, pipeline: Any, sr_models: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    with _client(edge, pipeline, sr_models, runtime="onnxruntime", onnx_dir=tmp_path, fallback=False) as client:
        result = client.generate(_request(), reference=True)
    assert result.report.device.runtime == "onnxruntime"
    assert result.report.quality is not None and result.report.quality.max_abs_diff <= 1e-4


def test_without_a_plan_the_policy_plans_hybrid_sr(edge: RunningServer, pipeline: Any,
                                                   sr_models: tuple[Path, Path]) -> None:
    with _client(edge, pipeline, sr_models, fallback=False) as client:
        result = client.generate(_request(plan=None))
    assert result.report.plan["params"]["sr_scale"] in (1.0, 2.0, 4.0)  # the controller's S (batch of one)
    assert result.report.plan["policy"] == "hybrid-sr-sa" and not result.report.fallback.used
    assert result.image.shape[-1] == TARGET


def test_scale_one_sends_the_image_without_sr(edge: RunningServer, pipeline: Any, sr_models: tuple[Path, Path]) -> None:
    with _client(edge, pipeline, sr_models, fallback=False) as client:
        result = client.generate(_request(width=64, height=64, plan=hybrid_plan(steps=2, sr_scale=1, codec_chain="none")))
    assert [t.name for t in result.report.bytes.tensors] == ["image"]
    assert result.image.shape == (1, 3, 64, 64)


def test_device_upscales_everything_when_the_edge_is_lost(pipeline: Any, sr_models: tuple[Path, Path]) -> None:
    config = ClientConfig(runtime="eager", light_sr=str(sr_models[0]), connect_timeout_s=0.2)
    with DeviceClient("127.0.0.1:1", config, pipeline=pipeline) as client:
        result = client.generate(_request())
    report = result.report
    assert report.fallback.used and report.fallback.reason
    assert result.image.shape == (1, 3, TARGET, TARGET)
    assert report.extra["hybrid_sr"]["foreground_cells"] == []  # light SR on every cell
    assert report.bytes.downlink == 0


@pytest.mark.parametrize(("plan", "fields", "match"), [
    (hybrid_plan(steps=2, sr_scale=3), {}, r"sr_scale.*3 is not one of"),
    (hybrid_plan(steps=2, sr_scale=2, foreground_fraction=1.5), {}, r"foreground_fraction.*outside \[0, 1\]"),
    (hybrid_plan(steps=2, sr_scale=2), {"width": 96, "height": 96}, r"width 96 is not a multiple of 64"),
    (hybrid_plan(steps=2, sr_scale=2), {"width": 1152, "height": 128}, r"exceeds the Hybrid SR target limit"),
])
def test_bad_hybrid_plans_are_refused_naming_the_value(edge: RunningServer, pipeline: Any, sr_models: tuple[Path, Path],
                                                       plan: Any, fields: dict[str, Any], match: str) -> None:
    with _client(edge, pipeline, sr_models, fallback=False) as client, pytest.raises(InvalidInputError, match=match):
        client.generate(_request(plan=plan, **fields))


def test_modelled_latency_overlaps_the_two_paths() -> None:
    parts = [PartCost("edge.compute", "e", 1.0), PartCost("edge.sr", "e", 3.0), PartCost("device.sr", "d", 2.0),
             PartCost("link.downlink", "link", 1.0), PartCost("device.sr", "this-machine", 9.0, measured=True)]
    extra = {"hybrid_sr": {"foreground_bytes": 750, "background_bytes": 250}}
    # T1 + max(T2 + T4, T3 + T5) = 1 + max(3 + 0.75, 2 + 0.25)
    assert HybridSrRecipe().modelled_latency_s(parts, extra) == pytest.approx(4.75)
