"""A diffusers UNet2DConditionModel as a sequence of blocks that can be cut in between.

The blocks are ``down.0 … down.{D-1}, mid, up.0 … up.{U-1}``; the time embedding and
``conv_in`` run before ``down.0`` (`unet_begin`), the output norm and ``conv_out`` after
the last up block (`unet_end`). Cutting at boundary B (1 ≤ B < block count) leaves the
state `UNetState` in flight: the hidden state, the time embedding, and every skip tensor
that a down block produced and an up block has not consumed yet. For SD 1.5 at a 64×64
latent, one image's state after the mid block is 13.4 MB in fp16 (twice that with
classifier-free guidance), against 32 KB for the latent itself; `crossing_specs_for_config`
computes this from a config alone, on the meta device, without weights.

The maths is that of ``UNet2DConditionModel.forward`` for the features text-to-image
pipelines use (no ControlNet/adapter residuals, no attention masks), so running
`unet_begin` → all blocks → `unet_end` equals calling the UNet (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from meg.errors import SplitError

# A diffusers ``UNet2DConditionModel`` (diffusers' module attributes are untyped).
UNetModel = Any

__all__ = [
    "SD15_UNET_CONFIG",
    "UNetState",
    "crossing_bytes_fp16",
    "crossing_specs_for_config",
    "state_tensors",
    "unet_begin",
    "unet_block_names",
    "unet_end",
    "unet_run_blocks",
]

# Published UNet config of Stable Diffusion 1.5 (unet/config.json of the SD 1.5 release):
# enough to compute shapes on the meta device.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


@dataclass(frozen=True)
class UNetState:
    """What is in flight between two UNet blocks.

    hidden: [B, C_b, H_b, W_b] output of the last block run.
    temb: [B, T] time embedding (after ``time_embed_act`` where the model has one).
    skips: pending skip tensors, oldest first; up blocks consume them from the end.
    """

    hidden: torch.Tensor
    temb: torch.Tensor
    skips: tuple[torch.Tensor, ...]


def unet_block_names(unet: UNetModel) -> list[str]:
    """Names of the cuttable blocks in execution order, e.g. ``["down.0", "down.1", "mid", "up.0", "up.1"]``."""
    names = [f"down.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid")
    names += [f"up.{i}" for i in range(len(unet.up_blocks))]
    return names


def _check_supported(unet: UNetModel) -> None:
    config = unet.config
    unsupported = {
        "center_input_sample": bool(config.center_input_sample),
        "class_embed_type": config.class_embed_type is not None,
        "addition_embed_type=image_hint": config.addition_embed_type == "image_hint",
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise SplitError(f"UNet features not supported by block-level splitting: {bad}")


def unet_begin(
    unet: UNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
) -> UNetState:
    """Time embedding and ``conv_in``: the part of the forward before ``down.0``.

    Args:
        sample: [B, C_in, h, w] scaled model input.
        timestep: scalar or [B].
        encoder_hidden_states: [B, L, E] text embeddings.
        added_cond_kwargs: SDXL's ``text_embeds``/``time_ids`` where the UNet needs them.
    """
    _check_supported(unet)
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=dict(added_cond_kwargs or {})
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    return UNetState(hidden=hidden, temb=emb, skips=(hidden,))


def _needs_upsample_size(unet: UNetModel, latent_hw: tuple[int, ...]) -> bool:
    factor = 2**unet.num_upsamplers
    return any(dim % factor != 0 for dim in latent_hw)


def unet_run_blocks(
    unet: UNetModel,
    state: UNetState,
    encoder_hidden_states: torch.Tensor,
    start: int,
    stop: int,
) -> UNetState:
    """Run blocks ``start … stop-1`` (indices into `unet_block_names`) on ``state``.

    ``encoder_hidden_states``: [B, L, E] after the UNet's own projection (identity for SD).
    """
    names = unet_block_names(unet)
    if not 0 <= start <= stop <= len(names):
        raise SplitError(f"block range {start}:{stop} outside 0:{len(names)}")
    hidden, temb, skips = state.hidden, state.temb, state.skips
    # The latent size is the size of the first skip (conv_in output keeps it).
    forward_upsample_size = _needs_upsample_size(unet, tuple(skips[0].shape[-2:])) if skips else False
    for name in names[start:stop]:
        kind, _, idx = name.partition(".")
        if kind == "down":
            block = unet.down_blocks[int(idx)]
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden_states=hidden, temb=temb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, res = block(hidden_states=hidden, temb=temb)
            skips = skips + tuple(res)
        elif kind == "mid":
            block = unet.mid_block
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden, temb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden = block(hidden, temb)
        else:
            i = int(idx)
            block = unet.up_blocks[i]
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            is_final = i == len(unet.up_blocks) - 1
            upsample_size = skips[-1].shape[2:] if (forward_upsample_size and not is_final) else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(
                    hidden_states=hidden,
                    temb=temb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=encoder_hidden_states,
                    upsample_size=upsample_size,
                )
            else:
                hidden = block(hidden_states=hidden, temb=temb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    return replace(state, hidden=hidden, temb=temb, skips=skips)


def unet_end(unet: UNetModel, state: UNetState) -> torch.Tensor:
    """Output norm, activation and ``conv_out``: [B, C_out, h, w] noise prediction."""
    if state.skips:
        raise SplitError(f"{len(state.skips)} skip tensors still pending at the UNet output")
    hidden = state.hidden
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def state_tensors(state: UNetState) -> dict[str, torch.Tensor]:
    """The state as crossing tensors: ``hidden``, ``temb``, ``skip.0``, ``skip.1``, …"""
    out = {"hidden": state.hidden, "temb": state.temb}
    out.update({f"skip.{i}": t for i, t in enumerate(state.skips)})
    return out


def state_from_tensors(tensors: Mapping[str, torch.Tensor]) -> UNetState:
    """Inverse of `state_tensors`; raises `SplitError` naming a missing tensor."""
    for name in ("hidden", "temb"):
        if name not in tensors:
            raise SplitError(f"crossing tensor {name!r} missing for a unet split", field=name)
    skips: list[torch.Tensor] = []
    while f"skip.{len(skips)}" in tensors:
        skips.append(tensors[f"skip.{len(skips)}"])
    return UNetState(hidden=tensors["hidden"], temb=tensors["temb"], skips=tuple(skips))


def crossing_specs_for_config(
    config: Mapping[str, Any],
    *,
    latent_hw: tuple[int, int],
    boundary: int,
    batch: int = 1,
    text_len: int = 77,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes of the UNet state at ``boundary`` from a UNet config alone (meta device).

    Args:
        config: ``UNet2DConditionModel`` config (e.g. `SD15_UNET_CONFIG`).
        latent_hw: latent (h, w), e.g. (64, 64) for 512×512 SD 1.5 images.
        boundary: B, cut before block B (1 ≤ B < block count).
        batch: UNet batch (2 per image with classifier-free guidance).
        text_len: text token count of the encoder hidden states.

    Returns:
        ``{name: (shape, dtype)}`` for ``hidden``, ``temb``, ``skip.i`` in the model's dtype
        (float32 here; the wire size in fp16 is 2 bytes per element).
    """
    with torch.device("meta"):
        unet: UNetModel = UNet2DConditionModel.from_config(dict(config))
    names = unet_block_names(unet)
    if not 1 <= boundary < len(names):
        raise SplitError(f"unet boundary {boundary} needs 1 <= B < {len(names)}", field="split")
    in_channels = unet.config.in_channels
    sample = torch.zeros(batch, in_channels, *latent_hw, device="meta")
    text = torch.zeros(batch, text_len, unet.config.cross_attention_dim, device="meta")
    timestep = torch.zeros(batch, device="meta")
    added = None
    if unet.config.addition_embed_type == "text_time":
        # SDXL: pooled text projection + six size numbers, sized from the config.
        time_dim = unet.config.addition_time_embed_dim
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
        added = {
            "text_embeds": torch.zeros(batch, pooled_dim, device="meta"),
            "time_ids": torch.zeros(batch, 6, device="meta"),
        }
    with torch.no_grad():
        state = unet_begin(unet, sample, timestep, text, added)
        state = unet_run_blocks(unet, state, text, 0, boundary)
    return {name: (tuple(t.shape), t.dtype) for name, t in state_tensors(state).items()}


def crossing_bytes_fp16(
    config: Mapping[str, Any],
    *,
    latent_hw: tuple[int, int],
    boundary: int,
    batch: int = 1,
    text_len: int = 77,
) -> int:
    """Bytes of the UNet state at ``boundary`` sent raw in fp16 (2 bytes per element).

    Counts ``hidden``, ``temb`` and every pending skip tensor, from the config alone. For
    `SD15_UNET_CONFIG`, ``latent_hw=(64, 64)``, ``batch=1`` and a cut after the last down
    block or after the mid block (B = 4 or 5): 13,437,440 bytes (13.4 MB); ``batch=2``
    (classifier-free guidance) doubles it. The text embeddings and the step's input
    latent, which also cross a UNet cut, are not included.
    """
    specs = crossing_specs_for_config(
        config, latent_hw=latent_hw, boundary=boundary, batch=batch, text_len=text_len
    )
    return sum(2 * torch.Size(shape).numel() for shape, _ in specs.values())
