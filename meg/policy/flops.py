"""FLOPs of the cost architecture, counted on PyTorch's meta device (no weights needed).

The distortion table is measured on a small model that runs on this CPU; the latency and
energy the policy trades against are those of the architecture the paper serves (SDXL,
PAPERS.md §1). Its FLOPs are *counted*, not assumed: the UNet, VAE decoder and both text
encoders are built from their published configs on the meta device and one forward pass
is run under `torch.utils.flop_counter.FlopCounterMode` (matmul/conv FLOPs, 2 per MAC).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from meg.errors import InvalidInputError

__all__ = ["CostArchitecture", "count_architecture_flops"]

CostArchitecture = Literal["sdxl"]

_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
_SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, sample_size=1024,
)


def _count(fn: object) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()  # type: ignore[operator]
    return int(counter.get_total_flops())


def count_architecture_flops(arch: CostArchitecture, height: int, width: int) -> dict[str, float]:
    """Count FLOPs of one UNet pass, the VAE decoder and the text encoders at HEIGHT×WIDTH.

    Args:
        arch: cost architecture ("sdxl": UNet 2.6B, VAE f=8, CLIP-L + OpenCLIP-bigG).
        height, width: image size in pixels (multiples of 8).
    Returns:
        {"unet_pass_flops", "vae_decoder_flops", "text_encoder_flops"} in FLOPs. One
        denoising step with classifier-free guidance costs two UNet passes.
    """
    if arch != "sdxl":
        raise InvalidInputError(f"unknown cost architecture {arch!r} (known: 'sdxl')")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise InvalidInputError(f"resolution {height}x{width} must be positive multiples of 8")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    h, w = height // 8, width // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_SDXL_UNET)  # type: ignore[arg-type]
        vae = AutoencoderKL(**_SDXL_VAE)  # type: ignore[arg-type]
        clip_l = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, vocab_size=49408))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, vocab_size=49408, projection_dim=1280))
        latent = torch.empty(1, 4, h, w)
        text = torch.empty(1, 77, 2048)
        added = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)}
        ids = torch.zeros(1, 77, dtype=torch.long)
        unet_flops = _count(lambda: unet(latent, torch.tensor([1]), text, added_cond_kwargs=added))  # type: ignore[operator]
        vae_flops = _count(lambda: vae.decode(latent))  # type: ignore[attr-defined]
        text_flops = _count(lambda: (clip_l(ids), clip_g(ids)))
    return {"unet_pass_flops": float(unet_flops), "vae_decoder_flops": float(vae_flops),
            "text_encoder_flops": float(text_flops)}
