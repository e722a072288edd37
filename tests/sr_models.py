"""Random-weight Hybrid SR models written to disk, as a user's model folders would be."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_sr_models(root: Path) -> tuple[Path, Path]:
    """(light SR family folder with ×2 and ×4 models, diffusion upscaler folder)."""
    from diffusers import DDIMScheduler

    from meg.models.sr import (
        DiffusionUpscaler,
        LightSRConfig,
        SRVGGNetCompact,
        UpscalerConfig,
        build_sr_unet,
        save_light_sr,
    )

    torch.manual_seed(1)
    for scale in (2, 4):
        model = SRVGGNetCompact(LightSRConfig(scale=scale, num_feat=8, num_conv=2)).eval()
        save_light_sr(model, root / "light" / f"sr_light_x{scale}")
    config = UpscalerConfig(scales=(2, 4), steps=2, channels=(8, 16))
    DiffusionUpscaler(build_sr_unet(config, groups=4), DDIMScheduler(num_train_timesteps=1000), config).save(root / "diffusion")
    return root / "light", root / "diffusion"
