"""Conversions between wire messages (`meg.v1`) and the domain types below the services.

Servicers and recipes stay thin: decode with these functions, call the domain, encode the
answer. Plans and split points convert in `meg.recipes.plan`; reports in `meg.recipes.report`.
Zero in an optional numeric proto field means "not set" (proto3 scalars have no
presence); the defaults then come from the domain's own dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meg.channel.link import LinkConfig
from meg.errors import InvalidInputError
from meg.split.engine import GenerationInputs
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "channel_from_link_config",
    "channel_to_dict",
    "inputs_from_request",
    "link_config_from_channel",
]

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
        mode=mode,  # type: ignore[arg-type]  # one of LinkConfig's literals, from the table above
        fading=fading,  # type: ignore[arg-type]
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


def inputs_from_request(request: gen_pb.GenerationRequest, steps: int, *,
                        default_size_px: int | None = None) -> GenerationInputs:
    """Generation inputs of a request; width/height 0 take ``default_size_px`` (the model's
    native size, `SplitEngine.native_size_px`), other fields left at zero keep
    `GenerationInputs`'s defaults."""
    optional: dict[str, Any] = {}
    if default_size_px:
        optional["width"] = optional["height"] = int(default_size_px)
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
