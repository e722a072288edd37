"""Limits on what a request may ask of the edge, checked before any work is queued.

Every violation raises `InvalidInputError` naming the request field and the bad value;
the service boundary answers it with INVALID_ARGUMENT. Sizes on the wire (message bytes,
tensor elements) are limited by gRPC's message-size options and `FramingLimits`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from meg.codecs.merge import MAX_MERGE_RATIO
from meg.errors import InvalidInputError
from meg.v1 import generation_pb2 as gen_pb

__all__ = ["ServiceLimits", "validate_plan", "validate_request"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]*$")


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on one request; the edge server and `meg serve edge` read these."""

    max_prompt_chars: int = 2000
    """Longest prompt (and negative prompt), in characters."""
    max_request_id_chars: int = 128
    """Longest client-chosen request id."""
    vae_scale_factor: int = 8
    """Width and height must be multiples of this (the VAE's down-sampling factor)."""
    max_side_px: int = 2048
    """Largest width or height, in pixels."""
    max_pixels: int = 1024 * 1024
    """Largest width × height."""
    max_steps: int = 100
    """Most denoising steps one request may ask for."""
    max_merge_ratio: float = MAX_MERGE_RATIO
    """Largest token-merge ratio of the latent sent to the device."""
    max_tome_ratio: float = 0.75
    """Largest ToMe ratio inside the edge UNet."""
    max_guidance_scale: float = 50.0
    """Largest classifier-free guidance scale."""
    max_codec_chain_chars: int = 256
    """Longest codec chain spec."""
    max_message_bytes: int = 8 << 20
    """Largest gRPC message either way (chunks are at most 1 MiB; headers are small)."""


def _finite(value: float, field: str, *, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInputError(f"{field} = {value!r} is outside [{low}, {high}]", field=field)


def validate_request(request: gen_pb.GenerationRequest, limits: ServiceLimits) -> None:
    """Check a `GenerationRequest` against `limits`; raise `InvalidInputError` naming the field.

    Width/height 0 mean "the edge's default" and pass here.
    """
    if len(request.request_id) > limits.max_request_id_chars or not _REQUEST_ID.match(request.request_id):
        raise InvalidInputError(
            f"request_id {request.request_id[:40]!r} must be at most {limits.max_request_id_chars} "
            "characters from [A-Za-z0-9._:-]",
            field="request_id",
        )
    if not request.prompt.strip():
        raise InvalidInputError("prompt is empty", field="prompt")
    for name in ("prompt", "negative_prompt"):
        text: str = getattr(request, name)
        if len(text) > limits.max_prompt_chars:
            raise InvalidInputError(
                f"{name} has {len(text)} characters, more than the limit {limits.max_prompt_chars}",
                field=name,
            )
    for name in ("width", "height"):
        side = int(getattr(request, name))
        if side == 0:
            continue
        if side % limits.vae_scale_factor:
            raise InvalidInputError(
                f"{name} = {side} is not a multiple of the VAE factor {limits.vae_scale_factor}",
                field=name,
            )
        if side > limits.max_side_px:
            raise InvalidInputError(f"{name} = {side} exceeds the limit {limits.max_side_px} px", field=name)
    if request.width * request.height > limits.max_pixels:
        raise InvalidInputError(
            f"width × height = {request.width * request.height} px exceeds the limit {limits.max_pixels}",
            field="width",
        )
    _finite(request.guidance_scale, "guidance_scale", low=0.0, high=limits.max_guidance_scale)
    _finite(request.limits.latency_s, "limits.latency_s", low=0.0, high=math.inf)
    _finite(request.limits.energy_j, "limits.energy_j", low=0.0, high=math.inf)
    channel = request.channel
    _finite(channel.snr_db, "channel.snr_db", low=-100.0, high=200.0)
    _finite(channel.bandwidth_hz, "channel.bandwidth_hz", low=0.0, high=1e12)
    _finite(channel.distance_m, "channel.distance_m", low=0.0, high=1e7)
    _finite(channel.rate_bps, "channel.rate_bps", low=0.0, high=1e13)
    _finite(channel.rician_k, "channel.rician_k", low=0.0, high=1e6)
    _finite(channel.tx_power_dbm, "channel.tx_power_dbm", low=-100.0, high=100.0)
    if request.HasField("plan_override"):
        validate_plan(request.plan_override, limits, field="plan_override")


def validate_plan(plan: gen_pb.Plan, limits: ServiceLimits, *, field: str = "plan") -> None:
    """Check a plan's numbers (the split against the steps is checked by `SplitPoint`)."""
    if not 1 <= plan.steps <= limits.max_steps:
        raise InvalidInputError(
            f"{field}.steps = {plan.steps} is outside [1, {limits.max_steps}]", field=f"{field}.steps"
        )
    _finite(plan.merge_ratio, f"{field}.merge_ratio", low=0.0, high=limits.max_merge_ratio)
    _finite(plan.tome_ratio, f"{field}.tome_ratio", low=0.0, high=limits.max_tome_ratio)
    if len(plan.codec_chain) > limits.max_codec_chain_chars:
        raise InvalidInputError(
            f"{field}.codec_chain has {len(plan.codec_chain)} characters, more than {limits.max_codec_chain_chars}",
            field=f"{field}.codec_chain",
        )
    split = plan.split
    if split.kind == gen_pb.SPLIT_KIND_STEP and not 1 <= split.index < plan.steps:
        raise InvalidInputError(
            f"{field}.split step:{split.index} needs 1 <= K < steps = {plan.steps}", field=f"{field}.split.index"
        )
    if split.kind == gen_pb.SPLIT_KIND_UNET and split.index < 1:
        raise InvalidInputError(f"{field}.split unet:{split.index} needs B >= 1", field=f"{field}.split.index")
