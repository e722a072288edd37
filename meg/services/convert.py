"""Conversions between wire messages (`meg.v1`) and the domain types of the other parts.

Servicers stay thin: decode with these functions, call the domain, encode the answer.
Zero in an optional numeric proto field means "not set" (proto3 scalars have no
presence); the defaults then come from the domain's own dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meg.channel.link import LinkConfig
from meg.errors import InvalidInputError, SplitError
from meg.split.engine import GenerationInputs
from meg.split.points import SplitPoint
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "channel_from_link_config",
    "channel_to_dict",
    "inputs_from_request",
    "link_config_from_channel",
    "make_plan",
    "plan_to_dict",
    "split_from_proto",
    "split_to_proto",
]

_KIND_TO_PROTO: dict[str, Any] = {
    "device": gen_pb.SPLIT_KIND_DEVICE,
    "step": gen_pb.SPLIT_KIND_STEP,
    "decoder": gen_pb.SPLIT_KIND_DECODER,
    "image": gen_pb.SPLIT_KIND_IMAGE,
    "unet": gen_pb.SPLIT_KIND_UNET,
}
_KIND_FROM_PROTO = {v: k for k, v in _KIND_TO_PROTO.items()}

_MODE_FROM_PROTO = {
    gen_pb.TRANSPORT_MODE_UNSPECIFIED: "ideal",
    gen_pb.TRANSPORT_MODE_IDEAL: "ideal",
    gen_pb.TRANSPORT_MODE_DIGITAL: "digital",
    gen_pb.TRANSPORT_MODE_ANALOG: "analog",
}
_MODE_TO_PROTO = {
    "ideal": gen_pb.TRANSPORT_MODE_IDEAL,
    "digital": gen_pb.TRANSPORT_MODE_DIGITAL,
    "analog": gen_pb.TRANSPORT_MODE_ANALOG,
}
_FADING_FROM_PROTO = {
    gen_pb.FADING_MODEL_UNSPECIFIED: "awgn",
    gen_pb.FADING_MODEL_AWGN: "awgn",
    gen_pb.FADING_MODEL_RAYLEIGH: "rayleigh",
    gen_pb.FADING_MODEL_RICIAN: "rician",
}
_FADING_TO_PROTO = {
    "awgn": gen_pb.FADING_MODEL_AWGN,
    "rayleigh": gen_pb.FADING_MODEL_RAYLEIGH,
    "rician": gen_pb.FADING_MODEL_RICIAN,
}


def split_from_proto(split: gen_pb.SplitPoint, *, field: str = "plan.split") -> SplitPoint:
    """Domain split point of a wire `SplitPoint`; an unknown kind raises `SplitError`."""
    kind = _KIND_FROM_PROTO.get(split.kind)
    if kind is None:
        raise SplitError(f"split kind {split.kind} is not a known SplitKind", field=f"{field}.kind")
    if kind in ("step", "unet"):
        return SplitPoint.parse(f"{kind}:{split.index}")
    return SplitPoint.parse(kind)


def split_to_proto(split: SplitPoint) -> gen_pb.SplitPoint:
    """Wire `SplitPoint` of a domain split point."""
    return gen_pb.SplitPoint(kind=_KIND_TO_PROTO[split.kind], index=split.index)


def make_plan(
    split: str | SplitPoint,
    *,
    steps: int,
    merge_ratio: float = 0.0,
    codec_chain: str = "none",
    tome_ratio: float = 0.0,
    policy: str = "override",
) -> gen_pb.Plan:
    """A wire `Plan` from plain values, e.g. `make_plan("step:1", steps=2)`."""
    point = split if isinstance(split, SplitPoint) else SplitPoint.parse(split)
    return gen_pb.Plan(
        split=split_to_proto(point),
        steps=steps,
        merge_ratio=merge_ratio,
        codec_chain=codec_chain,
        tome_ratio=tome_ratio,
        policy=policy,
    )


def link_config_from_channel(channel: gen_pb.ChannelState, base: LinkConfig | None = None) -> LinkConfig:
    """`LinkConfig` for the emulator from the channel state the device reported.

    Fields left at zero keep `base`'s value (the emulator's defaults), except `snr_db`,
    where 0 dB is a meaningful value and is taken as given.
    """
    base = base or LinkConfig()
    mode = _MODE_FROM_PROTO.get(channel.mode)
    if mode is None:
        raise InvalidInputError(f"transport mode {channel.mode} is not a known TransportMode", field="channel.mode")
    fading = _FADING_FROM_PROTO.get(channel.fading)
    if fading is None:
        raise InvalidInputError(f"fading model {channel.fading} is not a known FadingModel", field="channel.fading")
    return dataclasses.replace(
        base,
        mode=mode,
        fading=fading,
        snr_db=float(channel.snr_db),
        bandwidth_hz=float(channel.bandwidth_hz) or base.bandwidth_hz,
        rate_bps=float(channel.rate_bps) or base.rate_bps,
        rician_k=float(channel.rician_k) or base.rician_k,
        tx_power_dbm=float(channel.tx_power_dbm) or base.tx_power_dbm,
    )


def channel_from_link_config(link: LinkConfig, *, distance_m: float = 0.0) -> gen_pb.ChannelState:
    """Wire `ChannelState` describing a `LinkConfig`."""
    return gen_pb.ChannelState(
        snr_db=link.snr_db,
        bandwidth_hz=link.bandwidth_hz,
        distance_m=distance_m,
        fading=_FADING_TO_PROTO[link.fading],
        mode=_MODE_TO_PROTO[link.mode],
        rate_bps=link.rate_bps,
        rician_k=link.rician_k,
        tx_power_dbm=link.tx_power_dbm,
    )


def plan_to_dict(plan: gen_pb.Plan) -> dict[str, Any]:
    """JSON-ready plan for the report."""
    return {
        "split": str(split_from_proto(plan.split)) if plan.HasField("split") else None,
        "steps": int(plan.steps),
        "merge_ratio": float(plan.merge_ratio),
        "codec_chain": plan.codec_chain,
        "tome_ratio": float(plan.tome_ratio),
        "policy": plan.policy,
    }


def channel_to_dict(channel: gen_pb.ChannelState) -> dict[str, Any]:
    """JSON-ready channel state for the report."""
    return {
        "mode": _MODE_FROM_PROTO.get(channel.mode, str(channel.mode)),
        "fading": _FADING_FROM_PROTO.get(channel.fading, str(channel.fading)),
        "snr_db": float(channel.snr_db),
        "bandwidth_hz": float(channel.bandwidth_hz),
        "distance_m": float(channel.distance_m),
        "rate_bps": float(channel.rate_bps),
        "rician_k": float(channel.rician_k),
        "tx_power_dbm": float(channel.tx_power_dbm),
    }


def inputs_from_request(request: gen_pb.GenerationRequest, steps: int) -> GenerationInputs:
    """Generation inputs of a request; fields left at zero keep `GenerationInputs`'s defaults."""
    optional: dict[str, Any] = {}
    if request.width:
        optional["width"] = int(request.width)
    if request.height:
        optional["height"] = int(request.height)
    if request.guidance_scale:
        optional["guidance_scale"] = float(request.guidance_scale)
    return GenerationInputs(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=int(request.seed),
        steps=int(steps),
        **optional,
    )
