"""The shipped meg-tiny family: loadable offline by name, small, documented, and it draws its prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meg.errors import InvalidInputError, ModelNotFoundError
from meg.models import registry
from meg.models.captions import parse_prompt
from meg.models.evaluate import generate
from meg.models.judge import score_prompts

FOLDER = registry.MODELS_ROOT / "meg-tiny"


def test_meg_tiny_is_available_small_and_documented() -> None:
    assert "meg-tiny" in registry.available()
    # the project's budget: every weight file it ships, together, at most 64 MB
    import meg

    weights = list(Path(meg.__file__).parent.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) <= 64 * 10**6
    assert not list(FOLDER.rglob("*.bin")) and not list(FOLDER.rglob("*.pt"))  # safetensors only
    for part in ("text_encoder", "vae", "vae_merge", "vae_merge_paper", "teacher_unet", "unet", "small_unet", "judge"):
        assert (FOLDER / part / "README.md").exists(), part
    card = (FOLDER / "README.md").read_text()
    assert "Prompt fidelity" in card and "Merge-aware decoder" in card
    evaluation = json.loads((FOLDER / "eval.json").read_text())
    assert evaluation["judge_on_renders"]["heldout"]["fidelity"] >= 0.95
    assert registry.default_steps() == 4 and registry.default_guidance() == 2.5


def test_unknown_names_and_options_raise() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        registry.load_pipeline("no-such-model")
    with pytest.raises(InvalidInputError, match="middle"):
        registry.load_pipeline(unet="middle")  # type: ignore[arg-type]


def test_student_pipeline_draws_its_prompts() -> None:
    torch.manual_seed(0)
    pipe = registry.load_pipeline("meg-tiny")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    prompts = ["a large blue circle in the center", "a yellow square at the top left", "a large green star in the center"]
    images = generate(pipe, prompts, steps=2, guidance_scale=registry.default_guidance(), seed=0)
    assert images.shape == (3, 3, 128, 128) and images.dtype == torch.float32
    report = score_prompts([parse_prompt(p) for p in prompts], images)
    assert report.fidelity >= 0.6, report


def test_small_unet_shares_the_latent_and_text_spaces() -> None:
    small = registry.load_small_unet()
    pipe_unet = registry.load_pipeline("meg-tiny", merge_decoder=False).unet
    assert small.config.cross_attention_dim == pipe_unet.config.cross_attention_dim
    assert small.config.in_channels == pipe_unet.config.in_channels == 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in pipe_unet.parameters()) / 2
