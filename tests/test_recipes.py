"""The recipe layer: a recipe is one module, served by the unchanged services; one feature
path; one plan type and its wire converter."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from meg.channel.link import LinkConfig, LinkEmulator
from meg.codecs.chain import EncodedTensor, decode, encode, parse_chain
from meg.convert import link_config_from_channel
from meg.errors import InvalidInputError
from meg.recipes.base import (
    DeviceContext,
    DeviceHalf,
    DeviceOutput,
    EdgeContext,
    EdgeJob,
    Outgoing,
    Recipe,
)
from meg.recipes.plan import Plan, make_plan, plan_from_proto, plan_to_proto
from meg.recipes.registry import register, unregister
from meg.recipes.report import PartCost
from meg.services.background import RunningServer
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
from meg.services.edge import EdgeConfig
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.features import merge_noise_unmerge, noise_sigma_link, send_feature, through_link
from meg.split.points import SplitPoint
from meg.v1 import generation_pb2 as gen_pb

PROMPT = "a red circle"


# -- a new recipe is one module: this one lives in this test file ------------------------------


class _TileRecipe(Recipe):
    """Edge: a 3×H×W image filled with ``params["level"]`` plus twice the device's uplinked
    "probe" tensor, sent as two halves (top first, so the stream carries two tensors).
    Device: stacks the halves."""

    name = "tile"
    wire_id = 97
    uplink_names = ("probe",)
    param_names = ("level",)

    def run_edge(self, ctx: EdgeContext, job: EdgeJob) -> Iterator[Outgoing]:
        probe = decode(job.uplink.get("probe", job.should_stop))
        assert isinstance(probe, torch.Tensor)
        image = torch.full((1, 3, 8, 8), job.plan.param("level", 0.0)) + 2 * probe
        job.costs.append(PartCost("edge.compute", "this-machine", 0.001, measured=True))
        job.on_progress("tile", 1, 2)
        yield Outgoing("top", send_feature(image[..., :4, :], job.plan.codec_chain, job.downlink, seed=0, name="top"))
        job.on_progress("tile", 2, 2)
        yield Outgoing("bottom", send_feature(image[..., 4:, :], job.plan.codec_chain, job.downlink, seed=0,
                                              name="bottom"))

    def device_half(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> DeviceHalf:
        return _TileDevice()


class _TileDevice(DeviceHalf):
    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def uplink(self) -> list[tuple[str, EncodedTensor]]:
        return [("probe", encode(torch.full((1, 3, 8, 8), 0.25), "none"))]

    def on_tensor(self, name: str, encoded: EncodedTensor) -> None:
        value = decode(encoded)
        assert isinstance(value, torch.Tensor)
        self.parts[name] = value
        self.order.append(name)

    def finish(self) -> DeviceOutput:
        image = torch.cat([self.parts["top"], self.parts["bottom"]], dim=-2)
        return DeviceOutput(image=image, parts=[], extra={"tile": {"order": self.order}})

    def fallback(self, reason: str) -> DeviceOutput:
        self.plan = make_plan("device", steps=1, policy="fallback")
        return DeviceOutput(image=torch.zeros(1, 3, 8, 8), parts=[])


@pytest.fixture()
def tile_recipe() -> Iterator[_TileRecipe]:
    recipe = register(_TileRecipe())
    yield recipe
    unregister(recipe.wire_id)


def test_a_recipe_defined_here_is_served_by_the_unchanged_services(
    edge: RunningServer, pipeline: Any, tile_recipe: _TileRecipe
) -> None:
    plan = make_plan("image", steps=1, codec_chain="zstd:3", params={"level": 0.5})
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client:
        result = client.generate(DeviceRequest(prompt=PROMPT, recipe="tile", plan=plan))
    assert torch.equal(result.image, torch.full((1, 3, 8, 8), 1.0))  # 0.5 + 2 × 0.25, through the uplink
    report = result.report
    assert report.recipe == "tile" and report.plan["params"] == {"level": 0.5}
    assert report.extra["tile"]["order"] == ["top", "bottom"]  # streamed in the order the edge yielded
    assert [t.name for t in report.bytes.tensors] == ["top", "bottom"]
    assert report.bytes.uplink > 3 * 8 * 8 * 4  # the probe went up
    assert ("edge.compute", True) in {(p.part, p.measured) for p in report.parts}

    # its plan is checked by the recipe's own names, before any work
    bad = make_plan("image", steps=1, params={"lvl": 1.0})
    with (DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client,
          pytest.raises(InvalidInputError, match="'lvl'.*recipe 'tile'")):
        client.generate(DeviceRequest(prompt=PROMPT, recipe="tile", plan=bad))


def test_an_unregistered_recipe_is_refused_by_name(edge: RunningServer, pipeline: Any) -> None:
    request = DeviceRequest(prompt=PROMPT).to_proto()
    request.recipe = 96  # type: ignore[assignment]
    with (DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client,
          pytest.raises(InvalidInputError, match="recipe 96 is not served")):
        client.generate(request)


# -- one feature path ------------------------------------------------------------------------


def test_a_served_analog_request_equals_the_profiling_feature_path(edge: RunningServer, pipeline: Any,
                                                                     engine: SplitEngine) -> None:
    link = LinkConfig(mode="analog", snr_db=12.0)
    plan = make_plan("decoder", steps=2, codec_chain="merge:0.5")
    request = DeviceRequest(prompt=PROMPT, seed=7, link=link, plan=plan)
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client:
        served = client.generate(request)

    # what `meg policy profile` (and the decoder's training) runs: the same function, same seeds
    inputs = GenerationInputs(prompt=PROMPT, seed=7, steps=2)
    latents = engine.run_edge(inputs, SplitPoint("decoder"))["latents"]
    emulated = dataclasses.replace(link_config_from_channel(request.to_proto().channel, EdgeConfig().link),
                                   realtime=False)
    downlink = LinkEmulator(emulated, generator=torch.Generator().manual_seed(7 + 1))
    received = through_link(latents, "merge:0.5", downlink, seed=7, keep_merged=True)
    expected = engine.run_device({"latents": received}, inputs, SplitPoint("decoder"))
    assert torch.equal(served.image, expected)

    # noise falls on the merged tokens: the analog symbols are half the latent's
    merged = send_feature(latents, "merge:0.5", LinkEmulator(emulated, generator=torch.Generator()), seed=7)
    full = send_feature(latents, "none", LinkEmulator(emulated, generator=torch.Generator()), seed=7)
    assert merged.symbols == full.symbols // 2 == latents.numel() // 4
    assert served.report.channel.downlink_airtime_s >= merged.airtime_s > 0
    clean = engine.run_device({"latents": latents}, inputs, SplitPoint("decoder"))
    assert not torch.equal(served.image, clean)


def test_training_corruption_is_the_feature_path_per_sample(engine: SplitEngine) -> None:
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.0, 0.1, 0.3])
    out = merge_noise_unmerge(latents, 0.5, sigmas, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    for b in range(3):
        seed = int(torch.randint(0, 2**62, (1,), generator=draws))
        link = noise_sigma_link(float(sigmas[b]), generator=torch.Generator().manual_seed(seed + 1))
        assert torch.equal(out[b : b + 1], through_link(latents[b : b + 1], "merge:0.5", link, seed=seed))
    # the noise grows with σ (relative to the tokens' RMS)
    clean = through_link(latents[:1], "merge:0.5", None, seed=0)
    assert isinstance(clean, torch.Tensor)
    errors = [float((out[b] - through_link(latents[b : b + 1], "merge:0.5", None, seed=0)).pow(2).mean())
              for b in range(3)]
    assert errors[1] > 0 and errors[2] > errors[1]


@pytest.mark.parametrize("grouping", [1, 2, 4, 8])
@pytest.mark.parametrize("runtime", ["torch", "eager"])
def test_every_merge_grouping_decodes_on_the_device(edge: RunningServer, pipeline: Any, engine: SplitEngine,
                                                    grouping: int, runtime: str) -> None:
    chain = f"merge:0.5:g{grouping},fp16"
    plan = make_plan("decoder", steps=2, codec_chain=chain)
    with DeviceClient(edge.address, ClientConfig(runtime=runtime, fallback=False), pipeline=pipeline) as client:
        result = client.generate(DeviceRequest(prompt=PROMPT, seed=3, plan=plan))
    assert result.report.bytes.tensors[0].codec_chain == parse_chain(chain).spec
    inputs = GenerationInputs(prompt=PROMPT, seed=3, steps=2)
    latents = engine.run_edge(inputs, SplitPoint("decoder"))["latents"]
    received = through_link(latents, chain, None, seed=3)
    expected = engine.run_device({"latents": received}, inputs, SplitPoint("decoder"))
    assert float((result.image - expected).abs().max()) < 1e-5


def test_onnx_runtime_decodes_a_g2_merged_latent(edge: RunningServer, pipeline: Any, engine: SplitEngine,
                                                 tmp_path: Any) -> None:
    plan = make_plan("decoder", steps=2, codec_chain="merge:0.5:g2")
    config = ClientConfig(runtime="onnxruntime", onnx_dir=tmp_path, fallback=False)
    with DeviceClient(edge.address, config, pipeline=pipeline) as client:
        result = client.generate(DeviceRequest(prompt=PROMPT, seed=4, plan=plan), reference=True)
    inputs = GenerationInputs(prompt=PROMPT, seed=4, steps=2)
    latents = engine.run_edge(inputs, SplitPoint("decoder"))["latents"]
    expected = engine.run_device({"latents": through_link(latents, "merge:0.5:g2", None, seed=4)}, inputs,
                                 SplitPoint("decoder"))
    assert result.report.device.runtime == "onnxruntime"
    assert float((result.image - expected).abs().max()) < 1e-4


def test_each_side_validates_a_request_once(edge: RunningServer, pipeline: Any, monkeypatch: Any) -> None:
    calls: list[int] = []
    real = SplitEngine._validate

    def counting(self: SplitEngine, inputs: GenerationInputs, split: SplitPoint) -> None:
        calls.append(id(self))
        real(self, inputs, split)

    monkeypatch.setattr(SplitEngine, "_validate", counting)
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client:
        client.generate(DeviceRequest(prompt="once per side", seed=11, plan=make_plan("decoder", steps=2)))
    assert len(calls) == 2 and len(set(calls)) == 2  # the edge's engine once, the device's once


# -- one plan type, one converter ----------------------------------------------------------------


def test_plan_round_trips_the_wire_and_json() -> None:
    plan = make_plan("decoder", steps=4, merge_ratio=0.5, codec_chain="int8,zstd:3", tome_ratio=0.5,
                     params={"strength": 0.3})
    assert plan.codec_chain == "merge:0.5,int8,zstd:3" and plan.merge_ratio == 0.5
    wire = plan_to_proto(plan)
    assert wire.merge_ratio == 0.5 and wire.codec_chain == "merge:0.5,int8,zstd:3"
    assert plan_from_proto(wire) == plan
    assert Plan.from_dict(plan.to_dict()) == plan
    # a sender may set only the field: the chain gets the merge stage
    only_field = gen_pb.Plan(split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, merge_ratio=0.25,
                             codec_chain="fp16")
    assert plan_from_proto(only_field).codec_chain == "merge:0.25,fp16"


@pytest.mark.parametrize(("wire", "field"), [
    (gen_pb.Plan(split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, merge_ratio=0.5,
                 codec_chain="merge:0.25"), "plan.merge_ratio"),
    (gen_pb.Plan(split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, codec_chain="lz4"),
     "plan.codec_chain"),
    (gen_pb.Plan(split=gen_pb.SplitPoint(kind=9), steps=2), "plan.split.kind"),
    (gen_pb.Plan(split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, params={"s": float("nan")}),
     "plan.params"),
])
def test_bad_wire_plans_name_the_field(wire: gen_pb.Plan, field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_from_proto(wire)
    assert info.value.field == field
