"""The split engine on the SDXL layout (two text encoders, pooled and size conditioning)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meg.errors import SplitError
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.loading import load_pipeline
from meg.split.points import SplitPoint
from meg.split.unet_stages import crossing_specs_for_config

TOLERANCE = 1e-4
INPUTS = GenerationInputs("a red cube", seed=4, steps=3)


@pytest.fixture(scope="module")
def engine() -> SplitEngine:
    return SplitEngine(load_pipeline("tiny-random-xl"))


@pytest.fixture(scope="module")
def reference(engine: SplitEngine) -> torch.Tensor:
    return engine.run_full(INPUTS)


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_run_full_matches_the_diffusers_pipeline(engine: SplitEngine, negative: str) -> None:
    inputs = GenerationInputs("a red cube", negative_prompt=negative, seed=4, steps=3)
    image = engine.pipeline(
        inputs.prompt,
        # diffusers zeroes the unconditional embeddings for negative_prompt=None
        negative_prompt=negative or None,
        num_inference_steps=inputs.steps,
        guidance_scale=inputs.guidance_scale,
        height=inputs.height,
        width=inputs.width,
        generator=torch.Generator().manual_seed(inputs.seed),
        output_type="pt",
    ).images
    assert float((image - engine.run_full(inputs)).abs().max()) <= TOLERANCE


def test_every_split_point_equals_unsplit(engine: SplitEngine, reference: torch.Tensor) -> None:
    points = engine.split_points(INPUTS.steps)
    assert [str(p) for p in points] == ["device", "step:1", "step:2", "decoder", "image", "unet:1", "unet:2", "unet:3", "unet:4"]
    for split in points:
        crossing = engine.run_edge(INPUTS, split)
        specs = engine.crossing(split, INPUTS)
        assert [s.name for s in specs] == list(crossing)
        assert all(tuple(crossing[s.name].shape) == s.shape for s in specs)
        if split.kind in ("step", "unet"):
            assert crossing["pooled_embeds"].shape == (2, 32)
            assert crossing["prompt_embeds"].shape == (2, 77, 64)  # both encoders concatenated
        image = engine.run_device({k: v.clone() for k, v in crossing.items()}, INPUTS, split)
        assert float((image - reference).abs().max()) <= TOLERANCE, str(split)


def test_runtime_unet_steps_are_refused(engine: SplitEngine) -> None:
    split = SplitPoint("step", 1)
    crossing = engine.run_edge(INPUTS, split)
    with pytest.raises(SplitError, match="added conditioning"):
        engine.run_device(crossing, INPUTS, split, runtime=object())  # type: ignore[arg-type]


def test_tome_on_sdxl_layout(engine: SplitEngine) -> None:
    assert engine.tome.max_downsample == 2
    split = SplitPoint("decoder")
    plain = engine.run_edge(INPUTS, split)["latents"]
    merged = engine.run_edge(INPUTS, split, tome_ratio=0.5)["latents"]
    assert float((plain - merged).abs().max()) > 1e-5
    assert torch.equal(engine.run_edge(INPUTS, split)["latents"], plain)


def test_meta_crossing_specs_for_sdxl_config(engine: SplitEngine) -> None:
    specs = crossing_specs_for_config(dict(engine.unet.config), latent_hw=(8, 8), boundary=2, batch=2)
    assert specs["temb"][0] == (2, 128)
    assert len([n for n in specs if n.startswith("skip.")]) == 6


def test_sdxl_folder_loads_offline(tmp_path: Path, engine: SplitEngine, reference: torch.Tensor) -> None:
    engine.pipeline.save_pretrained(tmp_path / "xl", safe_serialization=True)
    loaded = load_pipeline(str(tmp_path / "xl"))
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert torch.equal(SplitEngine(loaded).run_full(INPUTS), reference)
