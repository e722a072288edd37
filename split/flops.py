"""FLOPs of the edge and device partitions of a split, per step and per image.

Each stage is counted once with ``torch.utils.flop_counter`` (`meg.devices.flops.count_flops`:
matmuls, convolutions and attention including the CPU kernel, 2 per multiply-accumulate) on zero tensors of the
request's shapes — FLOPs depend on shapes, not values — and the partitions are sums of
stages:

=========  ===========================================  ==========================================
split      edge                                         device
=========  ===========================================  ==========================================
device     0                                            text + N·step_dev + decode_dev
step:K     text + K·step_edge                           (N−K)·step_dev + decode_dev
decoder    text + N·step_edge                           decode_dev
image      text + N·step_edge + decode_edge             0
unet:B     text + blocks[:B] of step 1                  blocks[B:] of step 1 + (N−1)·step_dev
                                                        + decode_dev
=========  ===========================================  ==========================================

A step is one UNet call at batch 2 with classifier-free guidance (1 without); scheduler
updates are element-wise and not counted. The edge's steps are counted with the request's
ToMe ratio, so merging shows up as fewer edge FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from meg.devices.flops import count_flops
from meg.split.points import SplitPoint
from meg.split.unet_stages import unet_begin, unet_block_names, unet_end, unet_run_blocks

if TYPE_CHECKING:
    # Annotations only: the engine imports this module, not the other way round.
    from meg.split.engine import GenerationInputs, SplitEngine

__all__ = ["PartitionFlops", "StageFlops", "partition_flops", "stage_flops"]


@dataclass(frozen=True)
class PartitionFlops:
    """FLOPs (``torch.utils.flop_counter``: matmul, conv, attention) of each partition.

    ``*_flops`` are per image (the whole partition); ``*_flops_per_step`` are one
    denoising step on that side (UNet batch 2B with guidance), 0 when the side runs no
    full step; for ``unet:B`` the edge's value is its part of step 1.
    """

    edge_flops: float
    device_flops: float
    edge_flops_per_step: float
    device_flops_per_step: float


class StageFlops(dict[str, float]):
    """FLOPs per stage: ``text``, ``step_edge``, ``step_dev``, ``decode_edge``,
    ``decode_dev`` and, for a UNet cut, ``part_edge`` / ``rest_dev``."""


def stage_flops(
    engine: SplitEngine, inputs: GenerationInputs, *, tome_ratio: float = 0.0, boundary: int | None = None
) -> StageFlops:
    """Count every stage of ``inputs`` once (cached on the engine by shape and options)."""
    batch = 2 if inputs.do_cfg else 1
    latent_shape = engine.latent_shape(inputs)
    base_key = (latent_shape, batch, float(tome_ratio))
    cache: dict[tuple[object, ...], StageFlops] = engine.__dict__.setdefault("_stage_flops_cache", {})
    key = (*base_key, boundary)
    if key in cache:
        return cache[key]

    x = torch.zeros((batch, *latent_shape[1:]), dtype=engine.unet.dtype, device=engine.unet.device)
    embeds = torch.zeros(
        (batch, engine.tokenizer.model_max_length, engine.unet.config.cross_attention_dim),
        dtype=engine.unet.dtype,
        device=engine.unet.device,
    )
    t = torch.tensor(999, device=engine.unet.device)
    pooled = None
    if engine.text_encoder_2 is not None:
        pooled = torch.zeros((batch, engine.text_encoder_2.config.projection_dim), dtype=engine.unet.dtype)
    added = engine.conditioning(embeds, pooled, inputs).added
    tome_kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(0),
                                   "latent_hw": (int(latent_shape[-2]), int(latent_shape[-1]))}

    if boundary is not None:
        # The whole-stage counts are shared by every boundary; only the cut step is new.
        out = StageFlops(stage_flops(engine, inputs, tome_ratio=tome_ratio))
        n_blocks = len(unet_block_names(engine.unet))

        def edge_part() -> object:
            with engine.tome.applied(tome_ratio, **tome_kwargs):
                state = unet_begin(engine.unet, x, t, embeds, added)
                return unet_run_blocks(engine.unet, state, embeds, 0, boundary)

        with torch.no_grad():
            start = unet_begin(engine.device_unet, x, t, embeds, added)
            state = unet_run_blocks(engine.device_unet, start, embeds, 0, boundary)

        def device_rest() -> object:
            rest = unet_run_blocks(engine.device_unet, state, embeds, boundary, n_blocks)
            return unet_end(engine.device_unet, rest)

        out["part_edge"] = float(count_flops(edge_part))
        out["rest_dev"] = float(count_flops(device_rest))
        cache[key] = out
        return out

    latents = torch.zeros(latent_shape, dtype=engine.unet.dtype, device=engine.unet.device)

    def edge_step() -> object:
        with engine.tome.applied(tome_ratio, **tome_kwargs):
            return engine.unet(x, t, embeds, added_cond_kwargs=added, return_dict=False)

    def device_step() -> object:
        return engine.device_unet(x, t, embeds, added_cond_kwargs=added, return_dict=False)

    out = StageFlops(
        text=float(count_flops(lambda: engine.encode_prompt(inputs))),
        step_edge=float(count_flops(edge_step)),
        step_dev=float(count_flops(device_step)),
        decode_edge=float(count_flops(lambda: engine.decode(engine.vae, latents))),
        decode_dev=float(count_flops(lambda: engine.decode(engine.device_vae, latents))),
    )
    cache[key] = out
    return out


def partition_flops(
    engine: SplitEngine, split: SplitPoint, inputs: GenerationInputs, *, tome_ratio: float = 0.0
) -> PartitionFlops:
    """Edge and device FLOPs of ``split``, counted with ``torch.utils.flop_counter`` running
    the engine's own stages (see the table in this module's docstring)."""
    engine.check(inputs, split)
    engine.tome.check_ratio(tome_ratio)
    s = stage_flops(
        engine, inputs, tome_ratio=tome_ratio, boundary=split.index if split.kind == "unet" else None
    )
    n = inputs.steps
    if split.kind == "device":
        return PartitionFlops(0.0, s["text"] + n * s["step_dev"] + s["decode_dev"], 0.0, s["step_dev"])
    if split.kind == "step":
        k = split.index
        return PartitionFlops(
            s["text"] + k * s["step_edge"], (n - k) * s["step_dev"] + s["decode_dev"], s["step_edge"], s["step_dev"]
        )
    if split.kind == "decoder":
        return PartitionFlops(s["text"] + n * s["step_edge"], s["decode_dev"], s["step_edge"], 0.0)
    if split.kind == "image":
        return PartitionFlops(s["text"] + n * s["step_edge"] + s["decode_edge"], 0.0, s["step_edge"], 0.0)
    device = s["rest_dev"] + (n - 1) * s["step_dev"] + s["decode_dev"]
    return PartitionFlops(s["text"] + s["part_edge"], device, s["part_edge"], s["step_dev"] if n > 1 else 0.0)
