"""img2img in the split engine: diffusers' ``StableDiffusionImg2ImgPipeline`` semantics."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from meg.errors import InvalidInputError, NonFiniteError
from meg.split.engine import GenerationInputs, SplitEngine

PROMPT = "a red circle above a blue square"


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_img2img_equals_diffusers_img2img_pipeline(pipeline: Any, engine: SplitEngine, strength: float) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    inputs = GenerationInputs(prompt=PROMPT, seed=11, steps=10, guidance_scale=2.5)
    init = torch.randn(engine.latent_shape(inputs), generator=torch.Generator().manual_seed(3))
    ours = engine.run_img2img(inputs, init, strength)

    reference = StableDiffusionImg2ImgPipeline(**pipeline.components)
    reference.set_progress_bar_config(disable=True)
    # a 4-channel "image" is taken as the latent itself (no VAE encoding)
    theirs = reference(PROMPT, image=init, strength=strength, num_inference_steps=10, guidance_scale=2.5,
                       generator=torch.Generator().manual_seed(11), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_img2img_runs_int_strength_times_steps_and_depends_on_the_init(engine: SplitEngine) -> None:
    inputs = GenerationInputs(prompt=PROMPT, seed=1, steps=10)
    calls: list[tuple[str, int, int]] = []
    init = torch.zeros(engine.latent_shape(inputs))
    a = engine.run_img2img(inputs, init, 0.3, on_progress=lambda *e: calls.append(e))
    assert calls[-1] == ("denoise", 3, 3) and len(calls) == 3
    b = engine.run_img2img(inputs, init + 1.0, 0.3)
    assert not torch.allclose(a, b)  # at low strength the result keeps the init


def test_generate_latents_is_what_run_full_decodes(engine: SplitEngine) -> None:
    inputs = GenerationInputs(prompt=PROMPT, seed=5, steps=3)
    latents = engine.generate_latents(inputs)
    torch.testing.assert_close(engine.decode(engine.vae, latents), engine.run_full(inputs))
    # another UNet (the device's previewer) gives another latent of the same shape
    other = type(engine.unet).from_config(engine.unet.config)
    assert engine.generate_latents(inputs, unet=other).shape == latents.shape


@pytest.mark.parametrize(
    ("strength", "init_shape", "dtype", "error", "field"),
    [
        (0.0, None, torch.float32, InvalidInputError, "strength"),
        (1.5, None, torch.float32, InvalidInputError, "strength"),
        (0.05, None, torch.float32, InvalidInputError, "strength"),  # int(10 · 0.05) = 0 steps
        (0.5, (1, 4, 4, 4), torch.float32, InvalidInputError, "init_latents"),
        (0.5, None, torch.int64, InvalidInputError, "init_latents"),
        (0.5, "nan", torch.float32, NonFiniteError, "init_latents"),
    ],
)
def test_img2img_refuses_bad_input_naming_the_field(engine: SplitEngine, strength: float, init_shape: Any,
                                                    dtype: torch.dtype, error: type, field: str) -> None:
    inputs = GenerationInputs(prompt=PROMPT, steps=10)
    shape = engine.latent_shape(inputs) if init_shape in (None, "nan") else init_shape
    init = torch.zeros(shape, dtype=dtype)
    if init_shape == "nan":
        init[0, 0, 0, 0] = float("nan")
    with pytest.raises(error) as info:
        engine.run_img2img(inputs, init, strength)
    assert info.value.field == field
