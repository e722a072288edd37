"""FLOP counting with `torch.utils.flop_counter`: the one counter of the project.

The counter sees matmuls, convolutions and attention (the ops that dominate a diffusion
model); element-wise ops, norms and activations are not counted, so the numbers are the
usual "model FLOPs" (2 per multiply-accumulate) and a device's efficiency factor absorbs
the rest.

`count_flops` counts any callable (the split's partitions, calibration);
`count_architecture_flops` counts a *cost architecture*: the policy's distortion table is
measured on a small model that runs on this CPU, but the latency and energy it trades
against are those of the architecture the paper serves (SDXL, PAPERS.md §1), built from
its published configs on PyTorch's meta device (no weights needed) and counted, not
assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from meg.errors import InvalidInputError

__all__ = ["CostArchitecture", "count_architecture_flops", "count_flops"]

CostArchitecture = Literal["sdxl"]


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn()`` once under a FLOP counter (no autograd) and return the FLOPs it did.

    torch's formula table knows the CUDA attention kernels but not the CPU kernel that
    ``scaled_dot_product_attention`` dispatches to; it is added here, or every transformer
    block's attention would count as zero on CPU.

    Args:
        fn: a zero-argument callable, e.g. ``lambda: unet(x, t, encoder_hidden_states=e)``.

    Returns:
        Total floating-point operations (an int; 2 per multiply-accumulate).
    """
    # Imported here so that loading device profiles does not import torch.
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


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


def count_architecture_flops(arch: CostArchitecture, height: int, width: int, *,
                             tome_ratio: float = 0.0) -> dict[str, float]:
    """Count FLOPs of one UNet pass, the VAE decoder and the text encoders at HEIGHT×WIDTH.

    Args:
        arch: cost architecture ("sdxl": UNet 2.6B, VAE f=8, CLIP-L + OpenCLIP-bigG).
        height, width: image size in pixels (multiples of 8).
        tome_ratio: when > 0, also count the UNet pass with ToMe (tomesd, merging before
            self-attention) at this ratio on every transformer block, as MEG runs its edge
            UNet (PAPERS.md §1: ratio 0.5 on all transformer blocks).
    Returns:
        {"unet_pass_flops", "vae_decoder_flops", "text_encoder_flops"} in FLOPs, plus
        "unet_pass_flops_tome" and "tome_ratio" when ``tome_ratio > 0``. One denoising step
        with classifier-free guidance costs two UNet passes.
    """
    if not 0.0 <= tome_ratio < 0.75:
        raise InvalidInputError(f"tome_ratio {tome_ratio!r} outside [0, 0.75)")
    if arch != "sdxl":
        raise InvalidInputError(f"unknown cost architecture {arch!r} (known: 'sdxl')")
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise InvalidInputError(f"resolution {height}x{width} must be positive multiples of 8")
    import torch
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
        unet_flops = count_flops(lambda: unet(latent, torch.tensor([1]), text, added_cond_kwargs=added))  # type: ignore[operator]
        vae_flops = count_flops(lambda: vae.decode(latent))  # type: ignore[attr-defined]
        text_flops = count_flops(lambda: (clip_l(ids), clip_g(ids)))
        out = {"unet_pass_flops": float(unet_flops), "vae_decoder_flops": float(vae_flops),
               "text_encoder_flops": float(text_flops)}
        if tome_ratio > 0:
            import tomesd

            # every level: the largest downsampling of the UNet; deterministic destinations
            # (the random ones merge exactly as many tokens)
            tomesd.apply_patch(unet, ratio=tome_ratio, max_downsample=2 ** len(_SDXL_UNET["block_out_channels"]), use_rand=False)  # type: ignore[arg-type]
            try:
                out["unet_pass_flops_tome"] = float(count_flops(lambda: unet(latent, torch.tensor([1]), text, added_cond_kwargs=added)))  # type: ignore[operator]
            finally:
                tomesd.remove_patch(unet)
            out["tome_ratio"] = float(tome_ratio)
    return out
