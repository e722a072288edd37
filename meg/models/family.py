"""Architectures of the meg-tiny family and the word-level tokenizer for its vocabulary.

Every component is a stock diffusers/transformers class built from a config here, so a
trained family is an ordinary diffusers folder: `CLIPTextModel` + a word-level
`PreTrainedTokenizerFast`, `AutoencoderKL` (×8, 4 latent channels), and
`UNet2DConditionModel`s whose highest-resolution level has no attention (the attention
there costs 3–5× more than everywhere else at this size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from meg.models.captions import VOCABULARY

__all__ = [
    "FamilyConfig",
    "SPECIAL_TOKENS",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
]

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes of every meg-tiny component (the shipped family uses the defaults)."""

    name: str = "meg-tiny"
    image_size: int = 128
    """Image side in pixels; latents are image_size / 8."""
    max_tokens: int = 40
    """Tokenizer model_max_length = text positions (BOS + words + EOS, padded)."""
    text_width: int = 128
    """CLIP hidden size = UNet cross-attention dimension."""
    text_layers: int = 3
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    """AutoencoderKL block_out_channels: four levels → ×8 downsampling."""
    vae_groups: int = 8
    vae_mid_attention: bool = False
    """Self-attention in the VAE's mid blocks. Off: the VAE is fully convolutional, so it
    trains on crops and works at any resolution."""
    unet_channels: tuple[int, ...] = (32, 64, 128)
    """Teacher and student UNet block_out_channels (no attention at level 0)."""
    unet_layers: int = 1
    unet_heads: int = 4
    unet_groups: int = 16
    small_channels: tuple[int, ...] = (16, 32, 64)
    """Device (small) UNet block_out_channels."""
    small_groups: int = 8
    teacher_guidance: float = 4.0
    """Classifier-free guidance scale the teacher is sampled with."""
    teacher_steps: int = 25
    """DDIM steps of the teacher."""
    student_guidance: float = 2.5
    """Guidance scale the student and the small UNet are distilled for (MEG: 2.5)."""
    student_steps: int = 4
    """Default number of student steps."""
    lcm_origin_steps: int = 25
    """Teacher ODE grid the students are distilled on (LCMScheduler original_inference_steps)."""

    @classmethod
    def gpu(cls) -> FamilyConfig:
        """The larger family of the shipped weights (trained on one GPU; see the model card)."""
        return replace(
            cls(), vae_channels=(32, 64, 64, 64), vae_groups=16, vae_mid_attention=True, unet_channels=(64, 128, 128),
            unet_groups=32, small_channels=(32, 64, 64), small_groups=16, lcm_origin_steps=50,
        )  # fmt: skip

    @classmethod
    def smoke(cls) -> FamilyConfig:
        """A miniature family with the same structure, for tests on a CPU."""
        return replace(
            cls(), name="meg-smoke", text_width=32, text_layers=1, text_heads=2, vae_channels=(8, 8, 16, 16),
            vae_groups=4, unet_channels=(16, 32, 32), unet_groups=8, unet_heads=2, small_channels=(8, 16, 16),
            small_groups=4, teacher_steps=4, lcm_origin_steps=10, max_tokens=40,
        )  # fmt: skip

    @property
    def latent_size(self) -> int:
        return self.image_size // 8


def build_tokenizer(config: FamilyConfig = FamilyConfig()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `VOCABULARY`; unknown words become [UNK] (never dropped)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Same split as the caption parser: runs of letters, or single other characters.
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern=Regex(r"[a-z]+|[^a-z]"), behavior="isolated")]
    )
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        model_max_length=config.max_tokens,
        padding_side="right",
    )


def build_text_encoder(config: FamilyConfig, vocab_size: int) -> Any:
    """A small CLIP text transformer (causal, as in SD's text encoder)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            projection_dim=config.text_width,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def build_vae(config: FamilyConfig) -> Any:
    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=config.vae_groups,
        sample_size=config.image_size,
        mid_block_add_attention=config.vae_mid_attention,
    )


def build_unet(config: FamilyConfig, *, small: bool = False) -> Any:
    channels = config.small_channels if small else config.unet_channels
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=config.unet_layers,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=config.text_width,
        attention_head_dim=config.unet_heads,
        norm_num_groups=config.small_groups if small else config.unet_groups,
    )


_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_scheduler(kind: str, config: FamilyConfig = FamilyConfig()) -> Any:
    """"teacher": DDIM (eta 0, SD 1.5's training schedule); "student": LCM multistep sampling."""
    if kind == "teacher":
        return DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon")
    if kind == "student":
        return LCMScheduler(
            **_SCHEDULE, original_inference_steps=config.lcm_origin_steps, clip_sample=False,
            set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
        )  # fmt: skip
    raise ValueError(f"unknown scheduler kind {kind!r}")
