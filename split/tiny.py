"""The `tiny-random` pipeline: a Stable-Diffusion-shaped pipeline built from configs in code.

Every component has the topology of SD 1.5 at a tiny width, with weights drawn from a
fixed seed, so tests and runs before the project's own model exists need no download:

- UNet: two resolution levels (32, 64 channels), two resnets per level like SD, cross-
  attention only at the lower-resolution level (as SDXL does at its top level), latent
  sample size 8 (64×64 images).
- VAE: ×8 spatial downsampling (four levels), 4 latent channels, SD's scaling factor.
- Text encoder: a 2-layer CLIP text transformer, width 32, 77 positions.
- Tokenizer: a byte-level CLIP BPE tokenizer whose vocabulary (the 256 byte symbols,
  their end-of-word forms and ten merges) is generated here; transformers ships no
  test tokenizer, and nothing may be downloaded.
- Scheduler: DDIM with SD 1.5's training schedule and ``eta = 0``. Its step is a pure
  function of ``(noise prediction, t, x_t)`` given the timestep table, so a device that
  holds its own copy of the scheduler continues at step K+1 without any scheduler state
  crossing the cut (Euler-type schedulers keep a step index and need ``set_begin_index``;
  the engine handles both).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TinyRandomConfig",
    "build_tiny_random_pipeline",
    "build_tiny_random_xl_pipeline",
    "build_tiny_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Frequent English letter pairs; merging them makes token counts word-like without a corpus.
_MERGES = (
    ("t", "h"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e"),
    ("th", "e</w>"), ("e", "d</w>"), ("in", "g</w>"), ("an", "d</w>"),
)  # fmt: skip


@dataclass(frozen=True)
class TinyRandomConfig:
    """Sizes of the `tiny-random` pipeline. Defaults are the ones tests rely on."""

    seed: int = 0
    """Seed of every weight draw (the global RNG is restored afterwards)."""
    unet_channels: tuple[int, int] = (32, 64)
    """UNet block_out_channels: level 0 (full latent resolution), level 1 (½)."""
    latent_sample_size: int = 8
    """Latent side length; images are 8× larger (64×64)."""
    text_width: int = 32
    """CLIP hidden size = UNet cross-attention dimension."""
    max_tokens: int = 77
    """Tokenizer model_max_length and text position count, as in SD."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode symbol table (bijective over 0..255)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


@cache
def _tiny_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    for merge in _MERGES:
        vocab_list.append(merge[0] + merge[1])
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_list)}, _MERGES


def build_tiny_tokenizer(max_tokens: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer over a generated vocabulary (524 tokens).

    Every byte sequence is encodable (no unknown tokens); the ten merges are frequent
    English pairs. Padding uses the end-of-text token, as SD's tokenizer does.
    """
    vocab, merges = _tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))  # type: ignore[arg-type]
    tokenizer.model_max_length = max_tokens
    return tokenizer


def _tiny_vae(config: TinyRandomConfig) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=config.latent_sample_size * 8,
        scaling_factor=0.18215,
    )


def _tiny_clip_config(config: TinyRandomConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=config.max_tokens,
        projection_dim=config.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_random_xl_pipeline(config: TinyRandomConfig = TinyRandomConfig()) -> StableDiffusionXLPipeline:
    """Build `tiny-random-xl`: the SDXL layout (two text encoders, pooled text and size
    conditioning, Euler scheduler) at `tiny-random`'s sizes, with seeded weights."""
    tokenizer = build_tiny_tokenizer(config.max_tokens)
    c0, c1 = config.unet_channels
    time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_sample_size,
            block_out_channels=(c0, c1),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # SDXL concatenates both encoders' penultimate hidden states.
            cross_attention_dim=2 * config.text_width,
            attention_head_dim=8,
            norm_num_groups=16,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # six size numbers (original, crop corner, target) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + config.text_width,
        )
        vae = _tiny_vae(config)
        text_encoder = CLIPTextModel(_tiny_clip_config(config, tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(config, tokenizer))
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)  # type: ignore[union-attr]
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(config.max_tokens),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_random_pipeline(config: TinyRandomConfig = TinyRandomConfig()) -> StableDiffusionPipeline:
    """Build the `tiny-random` pipeline (float32, CPU, eval mode) with seeded weights."""
    tokenizer = build_tiny_tokenizer(config.max_tokens)
    c0, c1 = config.unet_channels
    # fork_rng: drawing the weights must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.latent_sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(c0, c1),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=config.text_width,
            attention_head_dim=8,
            norm_num_groups=16,
        )
        vae = _tiny_vae(config)
        text_encoder = CLIPTextModel(_tiny_clip_config(config, tokenizer))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)  # type: ignore[union-attr]
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
