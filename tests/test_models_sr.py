"""Hybrid SR models: light SR (torch, ONNX Runtime, Real-ESRGAN weights), diffusion upscaler, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from meg.errors import InvalidInputError
from meg.models.registry import MODELS_ROOT
from meg.models.sr import (
    DiffusionUpscaler,
    LightSRConfig,
    SRVGGNetCompact,
    UpscalerConfig,
    build_sr_unet,
    light_sr_flops,
    load_diffusion_sr,
    load_light_sr,
    save_light_sr,
)
from meg.models.world import render, sample_scenes


def _random_light(scale: int = 4, base: str = "bilinear", seed: int = 0) -> SRVGGNetCompact:
    torch.manual_seed(seed)
    return SRVGGNetCompact(LightSRConfig(scale=scale, num_feat=8, num_conv=3, base=base)).eval()  # type: ignore[arg-type]


def test_world_renders_the_same_scene_at_any_size() -> None:
    scenes = sample_scenes(8, 4)
    small, masks = render(scenes)
    big, big_masks = render(scenes, size=512)
    assert big.shape == (8, 3, 512, 512) and big_masks.shape == (8, 3, 512, 512)
    assert (F.avg_pool2d(big, 4) - small).abs().mean() < 0.01
    assert (F.avg_pool2d(big_masks.float(), 4).round().bool() ^ masks).float().mean() < 0.01
    with pytest.raises(InvalidInputError, match="size"):
        render(scenes, size=4)


@pytest.mark.parametrize("scale", [2, 4])
def test_light_sr_upscales_by_its_scale(scale: int) -> None:
    model = _random_light(scale)
    assert model(torch.rand(2, 3, 9, 14)).shape == (2, 3, 9 * scale, 14 * scale)
    # the residual starts from the upsampled input: a zeroed body returns the bilinear image
    for p in model.body[-1].parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(model(x), F.interpolate(x, scale_factor=scale, mode="bilinear"), atol=1e-6)


def test_real_esrgan_weights_load(tmp_path: Path) -> None:
    # A Real-ESRGAN SRVGGNetCompact checkpoint: {"params": state_dict}, nearest residual.
    original = _random_light(4, base="nearest", seed=3)
    path = tmp_path / "realesr-tiny-x4v3.pth"
    torch.save({"params": original.state_dict()}, path)
    loaded = load_light_sr(path)
    assert loaded.config == LightSRConfig(scale=4, num_feat=8, num_conv=3, base="nearest")
    x = torch.rand(1, 3, 12, 12)
    assert torch.equal(loaded(x), original(x))
    torch.save({"params_ema": _random_light(2, base="nearest").state_dict()}, path)
    assert load_light_sr(path).scale == 2
    torch.save({"params": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, path)
    with pytest.raises(InvalidInputError, match="SRVGGNetCompact"):
        load_light_sr(path)


def test_light_sr_folder_round_trip_in_fp16(tmp_path: Path) -> None:
    model = _random_light(2)
    save_light_sr(model, tmp_path / "sr_light_x2")
    loaded = load_light_sr(tmp_path / "sr_light_x2")
    x = torch.rand(1, 3, 10, 10)
    assert loaded.config == model.config
    assert (loaded(x) - model(x)).abs().max() < 1e-2
    assert (tmp_path / "sr_light_x2" / "model.safetensors").stat().st_size < 20_000


@pytest.mark.parametrize("scale", [2, 4])
def test_onnx_runtime_matches_torch(tmp_path: Path, scale: int) -> None:
    from meg.models.sr_onnx import LightSROnnx, export_light_sr

    model = _random_light(scale, seed=scale)
    runner = LightSROnnx(export_light_sr(model, tmp_path / f"x{scale}.onnx"))
    assert runner.scale == scale
    x = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    out = runner(x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-4
    with pytest.raises(InvalidInputError, match=r"\(3, 8, 8\)"):
        runner(torch.zeros(3, 8, 8))


def test_light_sr_flops_count_the_convolutions() -> None:
    model = _random_light(4)
    # 2 FLOPs per MAC over the convs at the input resolution: 3→8, 3×(8→8), 8→48
    macs_per_px = 9 * (3 * 8 + 3 * 8 * 8 + 8 * 48)
    assert light_sr_flops(model, 16, 16) == 2 * macs_per_px * 16 * 16


def _tiny_upscaler(seed: int = 0) -> DiffusionUpscaler:
    from diffusers import DDIMScheduler

    torch.manual_seed(seed)
    config = UpscalerConfig(channels=(8, 16, 16), steps=2)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False, timestep_spacing="trailing")
    return DiffusionUpscaler(build_sr_unet(config, groups=4).eval(), scheduler, config)


def test_diffusion_upscaler_folder_round_trip_and_determinism(tmp_path: Path) -> None:
    _tiny_upscaler().save(tmp_path)
    upscaler = load_diffusion_sr(tmp_path)
    assert upscaler.config.scales == (2, 4) and upscaler.config.steps == 2
    low = torch.rand(1, 3, 13, 10, generator=torch.Generator().manual_seed(1))
    a = upscaler(low, 4, generator=torch.Generator().manual_seed(5))
    b = upscaler(low, 4, generator=torch.Generator().manual_seed(5))
    c = upscaler(low, 4, generator=torch.Generator().manual_seed(6))
    assert a.shape == (1, 3, 52, 40) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert upscaler(low, 2, generator=torch.Generator().manual_seed(5)).shape == (1, 3, 26, 20)
    with pytest.raises(InvalidInputError, match="scales"):
        upscaler(low, 3)
    with pytest.raises(InvalidInputError, match=r"\(1, 1, 8, 8\)"):
        upscaler(torch.rand(1, 1, 8, 8), 2)


def test_plain_diffusers_unet_folder_is_a_scale_agnostic_upscaler(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(in_channels=6, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)  # fmt: skip
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    upscaler = load_diffusion_sr(tmp_path)
    assert upscaler.config.scales == ()
    assert upscaler(torch.rand(1, 3, 6, 6), 3, steps=1, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 18, 18)


def test_diffusion_flops_grow_with_steps_and_dwarf_light_sr() -> None:
    upscaler = _tiny_upscaler()
    one = upscaler.flops(16, 16, 4, steps=1)
    assert upscaler.flops(16, 16, 4, steps=3) == 3 * one
    assert one > light_sr_flops(_random_light(4), 16, 16)


@pytest.fixture
def family_vae(tmp_path: Path) -> Path:
    """A model folder holding only the shipped family's VAE (what SR training needs)."""
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "vae").symlink_to(MODELS_ROOT / "meg-tiny" / "vae")
    return folder


def test_training_commands_write_loadable_components(tmp_path: Path, family_vae: Path) -> None:
    from meg.models.sr_cli import sr_diffusion, sr_light

    work = tmp_path / "work"
    args = ["--tiny", "--model-dir", str(family_vae), "--work-dir", str(work)]
    result = CliRunner().invoke(sr_light, [*args, "--scale", "4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(sr_diffusion, args)
    assert result.exit_code == 0, result.output
    light = load_light_sr(family_vae, scale=4)
    assert light(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    record = json.loads((family_vae / "sr_light_x4" / "training.json").read_text())
    assert record["run"]["steps"] == 3 and record["train"]["seed"] == 0
    upscaler = load_diffusion_sr(family_vae)
    assert upscaler(torch.rand(1, 3, 8, 8), 2, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 16, 16)
    # a continuation starts from the first run's weights and records it
    result = CliRunner().invoke(sr_diffusion, [*args, "--steps", "2", "--warm-start", str(work / "sr_diffusion.pt")])
    assert result.exit_code == 0, result.output
    run = json.loads((family_vae / "sr_unet" / "training.json").read_text())["run"]
    assert run["steps"] == 2 and run["warm_start_steps"] == 3


def test_training_pairs_are_aligned(tmp_path: Path, family_vae: Path) -> None:
    from meg.models.sr_train import SRTrainConfig, make_pairs, sample_batch

    pairs = make_pairs(family_vae, SRTrainConfig.smoke(), progress=False)
    x, y = sample_batch(pairs, 4, 4, 16, 1.0, torch.Generator().manual_seed(0))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4, 3, 64, 64)
    # the input is the VAE's image of the target's scene: close to the downsampled target
    assert (F.avg_pool2d(y, 4) - x).abs().mean() < 0.05
    shuffled = F.avg_pool2d(y.roll(1, dims=0), 4)
    assert (shuffled - x).abs().mean() > (F.avg_pool2d(y, 4) - x).abs().mean()
