"""Split engine: every split point reproduces the unsplit generation on tiny-random."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from meg.errors import DeadlineExceededError, InvalidInputError, NonFiniteError, SplitError
from meg.split.engine import GenerationInputs, SplitEngine, TensorSpec
from meg.split.loading import load_pipeline
from meg.split.points import SplitPoint
from meg.split.unet_stages import (
    SD15_UNET_CONFIG,
    crossing_bytes_fp16,
    crossing_specs_for_config,
    unet_begin,
    unet_block_names,
    unet_end,
    unet_run_blocks,
)

TOLERANCE = 1e-4
INPUTS = GenerationInputs("a red cube on a blue floor", negative_prompt="blurry", seed=7, steps=4)
ALL_POINTS = ["device", "step:1", "step:2", "step:3", "decoder", "image", "unet:1", "unet:2", "unet:3", "unet:4"]


@pytest.fixture(scope="module")
def engine() -> SplitEngine:
    return SplitEngine(load_pipeline("tiny-random"))


@pytest.fixture(scope="module")
def reference(engine: SplitEngine) -> torch.Tensor:
    return engine.run_full(INPUTS)


def _identity(crossing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # What an identity codec delivers: equal values in fresh storage.
    return {name: t.detach().clone() for name, t in crossing.items()}


def test_split_points_listed(engine: SplitEngine) -> None:
    assert [str(p) for p in engine.split_points(INPUTS.steps)] == ALL_POINTS
    assert engine.unet_blocks == ["down.0", "down.1", "mid", "up.0", "up.1"]


def test_partitions_as_runnable_objects(engine: SplitEngine, reference: torch.Tensor) -> None:
    stages = engine.stages(INPUTS.steps)
    assert stages == ["text_encode", "step:1", "step:2", "step:3", "step:4", "decode"]
    for text in ALL_POINTS:
        parts = engine.partitions(SplitPoint.parse(text), INPUTS)
        if text.startswith("unet"):
            assert parts.edge_stages == ("text_encode", f"step:1[:{text[5:]}]")
            assert parts.device_stages[1:] == tuple(stages[2:])
        else:
            assert parts.edge_stages + parts.device_stages == tuple(stages)
    step3 = engine.partitions(SplitPoint("step", 3), INPUTS)
    assert step3.device_stages == ("step:4", "decode")
    assert engine.partitions(SplitPoint("decoder"), INPUTS).device_stages == ("decode",)
    assert engine.partitions(SplitPoint("device"), INPUTS).edge_stages == ()
    image = step3.device(step3.edge(INPUTS), INPUTS)
    assert float((image - reference).abs().max()) <= TOLERANCE


def test_reference_is_an_image(reference: torch.Tensor) -> None:
    assert reference.shape == (1, 3, 64, 64) and reference.dtype == torch.float32
    assert float(reference.min()) >= 0.0 and float(reference.max()) <= 1.0
    assert float(reference.std()) > 1e-3  # not a constant image


@pytest.mark.parametrize("text", ALL_POINTS)
def test_edge_identity_device_equals_unsplit(engine: SplitEngine, reference: torch.Tensor, text: str) -> None:
    split = SplitPoint.parse(text)
    crossing = engine.run_edge(INPUTS, split)
    specs = engine.crossing(split, INPUTS)
    assert [s.name for s in specs] == list(crossing)
    for spec in specs:
        assert tuple(crossing[spec.name].shape) == spec.shape
        assert crossing[spec.name].dtype == spec.dtype
    image = engine.run_device(_identity(crossing), INPUTS, split)
    assert image.shape == reference.shape and image.dtype == torch.float32
    assert float((image - reference).abs().max()) <= TOLERANCE


def test_run_full_matches_the_diffusers_pipeline(engine: SplitEngine, reference: torch.Tensor) -> None:
    # The loop written out in the engine is the maths of StableDiffusionPipeline.__call__.
    image = engine.pipeline(
        INPUTS.prompt,
        negative_prompt=INPUTS.negative_prompt,
        num_inference_steps=INPUTS.steps,
        guidance_scale=INPUTS.guidance_scale,
        height=INPUTS.height,
        width=INPUTS.width,
        generator=torch.Generator().manual_seed(INPUTS.seed),
        output_type="pt",
    ).images
    assert float((image - reference).abs().max()) <= TOLERANCE


def test_seed_matters(engine: SplitEngine, reference: torch.Tensor) -> None:
    other = engine.run_full(GenerationInputs(INPUTS.prompt, negative_prompt="blurry", seed=8))
    assert float((other - reference).abs().max()) > 1e-3


def test_crossing_names_and_sizes(engine: SplitEngine) -> None:
    by_kind = {text: engine.crossing(SplitPoint.parse(text), INPUTS) for text in ALL_POINTS}
    assert by_kind["device"] == []
    assert by_kind["decoder"] == [TensorSpec("latents", (1, 4, 8, 8), torch.float32)]
    assert [s.name for s in by_kind["step:2"]] == ["latents", "prompt_embeds"]
    assert by_kind["step:2"][1].shape == (2, 77, 32)  # guidance: uncond + cond rows
    assert by_kind["image"] == [TensorSpec("image", (1, 3, 64, 64), torch.float32)]
    assert by_kind["decoder"][0].nbytes_fp16 == 4 * 8 * 8 * 2
    # After both down blocks every skip is pending: conv_in + 2 resnets + downsampler at
    # level 0, 2 resnets at level 1.
    names = [s.name for s in by_kind["unet:2"]]
    assert names == ["latents", "prompt_embeds", "hidden", "temb"] + [f"skip.{i}" for i in range(6)]
    # The block cut costs far more than the latent cut.
    unet_bytes = sum(s.nbytes_fp16 for s in by_kind["unet:2"])
    assert unet_bytes > 50 * by_kind["decoder"][0].nbytes_fp16


def test_sd15_block_cut_is_13_4_mb_per_image_in_fp16() -> None:
    # From the published SD 1.5 UNet config alone (meta device, no weights): the state
    # after the mid block at a 64×64 latent (512×512 image), one image, no guidance.
    specs = crossing_specs_for_config(SD15_UNET_CONFIG, latent_hw=(64, 64), boundary=5, batch=1)
    assert len([n for n in specs if n.startswith("skip.")]) == 12
    assert specs["skip.0"][0] == (1, 320, 64, 64) and specs["hidden"][0] == (1, 1280, 8, 8)
    total_fp16 = crossing_bytes_fp16(SD15_UNET_CONFIG, latent_hw=(64, 64), boundary=5)
    assert total_fp16 == sum(2 * torch.Size(shape).numel() for shape, _ in specs.values())
    assert 13.4e6 <= total_fp16 < 13.5e6
    assert crossing_bytes_fp16(SD15_UNET_CONFIG, latent_hw=(64, 64), boundary=5, batch=2) == 2 * total_fp16
    # ~420× the 32 KB latent that the decoder split sends.
    assert total_fp16 / (4 * 64 * 64 * 2) > 400


@pytest.mark.parametrize("hw", [(64, 64), (56, 72)])
def test_block_execution_equals_unet_forward(engine: SplitEngine, hw: tuple[int, int]) -> None:
    # 56×72 images give a 7×9 latent: the odd size exercises the forced upsample sizes.
    unet = engine.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, hw[0] // 8, hw[1] // 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor(501)
    with torch.no_grad():
        expected = unet(x, t, text, return_dict=False)[0]
        for boundary in range(1, len(unet_block_names(unet))):
            state = unet_run_blocks(unet, unet_begin(unet, x, t, text), text, 0, boundary)
            state = unet_run_blocks(unet, state, text, boundary, len(unet_block_names(unet)))
            assert torch.equal(unet_end(unet, state), expected)


def test_odd_latent_unet_split(engine: SplitEngine) -> None:
    inputs = GenerationInputs("odd", height=56, width=72, steps=2)
    reference = engine.run_full(inputs)
    split = SplitPoint("unet", 3)
    image = engine.run_device(engine.run_edge(inputs, split), inputs, split)
    assert float((image - reference).abs().max()) <= TOLERANCE


def test_without_guidance(engine: SplitEngine) -> None:
    inputs = GenerationInputs("no guidance", guidance_scale=1.0, steps=3)
    reference = engine.run_full(inputs)
    for text in ("step:2", "unet:3", "decoder"):
        split = SplitPoint.parse(text)
        crossing = engine.run_edge(inputs, split)
        if "prompt_embeds" in crossing:
            assert crossing["prompt_embeds"].shape[0] == 1
        image = engine.run_device(crossing, inputs, split)
        assert float((image - reference).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("scheduler_type", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_stateful_and_stochastic_schedulers(scheduler_type: Any) -> None:
    # Euler counts steps (set_begin_index on the device); Euler ancestral draws noise
    # every step (a generator per (seed, step) makes the draw independent of the side).
    pipeline = load_pipeline("tiny-random")
    pipeline.scheduler = scheduler_type.from_config(pipeline.scheduler.config)
    engine = SplitEngine(pipeline)
    inputs = GenerationInputs("euler", steps=3)
    reference = engine.run_full(inputs)
    for text in ("step:1", "step:2", "unet:2", "decoder"):
        split = SplitPoint.parse(text)
        image = engine.run_device(engine.run_edge(inputs, split), inputs, split)
        assert float((image - reference).abs().max()) <= TOLERANCE, text


def test_device_uses_its_own_unet_and_vae(engine: SplitEngine) -> None:
    pipeline = engine.pipeline
    same = SplitEngine(pipeline, device_unet=copy.deepcopy(pipeline.unet), device_vae=copy.deepcopy(pipeline.vae))
    reference = engine.run_full(INPUTS)
    step = SplitPoint("step", 2)
    assert torch.equal(same.run_device(same.run_edge(INPUTS, step), INPUTS, step), reference)

    other_unet = copy.deepcopy(pipeline.unet)
    with torch.no_grad():
        other_unet.conv_out.bias.add_(0.5)
    different = SplitEngine(pipeline, device_unet=other_unet)
    crossing = different.run_edge(INPUTS, step)
    assert float((different.run_device(crossing, INPUTS, step) - reference).abs().max()) > 1e-3
    # The decoder split runs no device UNet, so it is unaffected.
    decoder = SplitPoint("decoder")
    assert torch.equal(different.run_device(different.run_edge(INPUTS, decoder), INPUTS, decoder), reference)


def test_progress_and_stop(engine: SplitEngine) -> None:
    events: list[tuple[str, int, int]] = []
    engine.run_edge(INPUTS, SplitPoint("image"), on_progress=lambda *e: events.append(e))
    assert events == [("text_encode", 1, 1)] + [("denoise", i, 4) for i in range(1, 5)] + [("decode", 1, 1)]

    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(DeadlineExceededError, match="before step 2 of 4"):
        engine.run_edge(INPUTS, SplitPoint("decoder"), should_stop=stop_after_two)


def test_bad_inputs_name_the_value(engine: SplitEngine) -> None:
    with pytest.raises(InvalidInputError, match="height 60") as info:
        engine.run_full(GenerationInputs("x", height=60))
    assert info.value.field == "height"
    with pytest.raises(InvalidInputError, match="steps 0"):
        engine.run_full(GenerationInputs("x", steps=0))
    with pytest.raises(SplitError, match="step:4"):
        engine.run_edge(INPUTS, SplitPoint("step", 4))
    with pytest.raises(SplitError, match="unet:5"):
        engine.crossing(SplitPoint("unet", 5), INPUTS)


def test_bad_crossing_is_rejected(engine: SplitEngine) -> None:
    split = SplitPoint("step", 2)
    crossing = engine.run_edge(INPUTS, split)
    with pytest.raises(InvalidInputError, match="'prompt_embeds' missing") as info:
        engine.run_device({"latents": crossing["latents"]}, INPUTS, split)
    assert info.value.field == "prompt_embeds"
    with pytest.raises(InvalidInputError, match=r"shape \(1, 4, 4, 4\)"):
        engine.run_device({**crossing, "latents": torch.zeros(1, 4, 4, 4)}, INPUTS, split)
    with pytest.raises(InvalidInputError, match="dtype torch.int64"):
        engine.run_device({**crossing, "latents": torch.zeros(1, 4, 8, 8, dtype=torch.int64)}, INPUTS, split)
    poisoned = crossing["prompt_embeds"].clone()
    poisoned[1, 3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'prompt_embeds'") as nan_info:
        engine.run_device({**crossing, "prompt_embeds": poisoned}, INPUTS, split)
    assert nan_info.value.field == "prompt_embeds"


def test_fp16_crossing_is_accepted(engine: SplitEngine, reference: torch.Tensor) -> None:
    # A cast-to-fp16 codec: the device casts back; the image stays close.
    split = SplitPoint("step", 2)
    crossing = {k: v.half() for k, v in engine.run_edge(INPUTS, split).items()}
    image = engine.run_device(crossing, INPUTS, split)
    assert float((image - reference).abs().max()) < 0.05


class _RecordingRuntime:
    """A DeviceRuntime (contract in meg.split.runtime) that runs torch and records calls."""

    name = "torch"
    providers = ("torch-cpu",)
    grouping = 4

    def __init__(self, engine: SplitEngine) -> None:
        self.engine = engine
        self.calls: list[str] = []

    def decode_latent(self, tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
        from meg.codecs.merge import unmerge_latent

        self.calls.append("decode_latent")
        latent = unmerge_latent(tokens, gather_index, latent_shape)
        return self.engine.decode(self.engine.device_vae, latent)

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        self.calls.append("unet")
        assert timestep.shape == (sample.shape[0],)
        return self.engine.device_unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def test_device_partition_through_a_runtime(engine: SplitEngine, reference: torch.Tensor) -> None:
    runtime = _RecordingRuntime(engine)
    split = SplitPoint("step", 1)
    image = engine.run_device(engine.run_edge(INPUTS, split), INPUTS, split, runtime=runtime)
    assert runtime.calls == ["unet"] * 3 + ["decode_latent"]
    assert float((image - reference).abs().max()) <= TOLERANCE


def test_device_partition_through_the_torch_runtime(engine: SplitEngine, reference: torch.Tensor) -> None:
    from meg.split.runtime import TorchRuntime

    runtime = TorchRuntime(engine.device_unet, engine.device_vae)
    for text in ("step:2", "decoder", "unet:3", "device"):
        split = SplitPoint.parse(text)
        image = engine.run_device(engine.run_edge(INPUTS, split), INPUTS, split, runtime=runtime)
        assert float((image - reference).abs().max()) <= TOLERANCE, text


def test_one_step_without_guidance_like_sd_turbo() -> None:
    # SD-Turbo: Euler with trailing timesteps, one step, guidance off.
    pipeline = load_pipeline("tiny-random")
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    engine = SplitEngine(pipeline)
    inputs = GenerationInputs("turbo", steps=1, guidance_scale=0.0)
    reference = engine.run_full(inputs)
    points = engine.split_points(1)
    assert [str(p) for p in points] == ["device", "decoder", "image", "unet:1", "unet:2", "unet:3", "unet:4"]
    for split in points:
        image = engine.run_device(engine.run_edge(inputs, split), inputs, split)
        assert float((image - reference).abs().max()) <= TOLERANCE, str(split)


def test_merged_latent_crossing(engine: SplitEngine, reference: torch.Tensor) -> None:
    from meg.codecs.merge import latent_to_tokens, merge_latent, unmerge_latent

    split = SplitPoint("decoder")
    latents = engine.run_edge(INPUTS, split)["latents"]
    # Ratio 0: nothing merged, so the image is exact.
    unmerged = merge_latent(latents, 0.0)
    assert torch.equal(unmerge_latent(unmerged.tokens, unmerged.gather_index, unmerged.latent_shape), latents)
    image = engine.run_device({"latents": unmerged}, INPUTS, split)
    assert float((image - reference).abs().max()) <= TOLERANCE
    # Ratio 0.5: half the tokens are copies; torch and runtime paths agree.
    merged = merge_latent(latents, 0.5, generator=torch.Generator().manual_seed(0))
    assert merged.tokens.shape[1] == latent_to_tokens(latents).shape[1] // 2
    image_torch = engine.run_device({"latents": merged}, INPUTS, split)
    image_runtime = engine.run_device({"latents": merged}, INPUTS, split, runtime=_RecordingRuntime(engine))
    assert torch.equal(image_torch, image_runtime)
    assert float((image_torch - reference).abs().max()) > 0.0
