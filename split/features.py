"""The feature path: how a tensor crosses the edge–device link, in one place.

Every recipe that sends a latent, every distortion measurement and the merge-aware
decoder's training go through these two functions, so what is served is what is measured
and what the decoder learned from (MEG §1: merge → channel → unmerge)::

    edge                                   link                         device
    tensor ─ merge (chain's merge stage) ─ analog symbols + noise ─┐
                                           (analog mode only)       ├─ value/zstd stages ─ frames ─▶ receive_feature
                                                                    │  (digital: packets + ARQ,
                                                                    │   counted by the caller)

- ``digital`` and ``ideal`` modes: the chain encodes the tensor; the bytes go on the link as
  packets (the caller accounts airtime and retransmissions per message).
- ``analog`` mode: the kept values after merging are sent as complex symbols through the
  emulated channel (`LinkEmulator.send_analog`: power-normalised, fading, equalised), so
  noise falls on the merged tokens and airtime counts only the symbols actually sent; the
  received values then take the chain's remaining stages, which here only carry them to the
  device process (their bytes are not airtime).

``noise_sigma_link`` turns MEG's channel-noise σ (std of the noise relative to the token RMS;
the paper's absolute σ on unit-variance latents) into the analog link that adds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from meg.channel.link import LinkConfig, LinkEmulator
from meg.codecs.chain import EncodedTensor, decode, encode, parse_chain
from meg.codecs.merge import MergedLatent
from meg.errors import InvalidInputError

__all__ = [
    "SentFeature",
    "chain_for_tensor",
    "merge_noise_unmerge",
    "noise_sigma_link",
    "receive_feature",
    "send_feature",
    "through_link",
]

LATENT_NAME = "latents"
"""The crossing tensor that a chain's merge stage applies to (a ``[B, C, h, w]`` latent)."""


@dataclass(frozen=True)
class SentFeature:
    """One tensor after the edge's half of the feature path.

    Attributes:
        encoded: what the framing layer carries to the device.
        symbols: complex symbols sent in analog mode (0 otherwise).
        airtime_s: analog airtime of those symbols (digital airtime is per packet, elsewhere).
        energy_j: transmit energy of that airtime.
        feature_snr_db: SNR of the received values in analog mode (None otherwise).
    """

    encoded: EncodedTensor
    symbols: int = 0
    airtime_s: float = 0.0
    energy_j: float = 0.0
    feature_snr_db: float | None = None


def chain_for_tensor(name: str, chain: str) -> str:
    """The chain one crossing tensor takes: the merge stage applies only to ``latents``."""
    parsed = parse_chain(chain)
    if parsed.merge is None or name == LATENT_NAME:
        return parsed.spec
    rest = ",".join(str(stage) for stage in parsed.stages if stage is not parsed.merge)
    return rest or "none"


def send_feature(
    tensor: Tensor, chain: str, link: LinkEmulator | None, *, seed: int, name: str = LATENT_NAME
) -> SentFeature:
    """Edge half: encode ``tensor`` with ``chain`` and, in analog mode, pass its kept values
    through ``link``.

    Args:
        tensor: the crossing tensor (merge needs a float ``[B, C, h, w]`` latent).
        chain: codec chain spec (`meg.codecs.chain`); its merge stage applies to ``latents`` only.
        link: the downlink emulator; analog mode perturbs the values, other modes (or None)
            leave them to the packet layer.
        seed: the merge destinations are drawn from ``torch.Generator().manual_seed(seed)``
            (the link draws from its own generator).
        name: the tensor's name at the cut.
    """
    spec = chain_for_tensor(name, chain)
    generator = torch.Generator().manual_seed(int(seed))
    if link is None or link.config.mode != "analog" or not tensor.is_floating_point():
        return SentFeature(encode(tensor, spec, generator=generator))
    reports = []

    def through_channel(values: Tensor) -> Tensor:
        received, report = link.send_analog(values)
        reports.append(report)
        return received

    encoded = encode(tensor, spec, generator=generator, on_values=through_channel)
    report = reports[0]
    snr = report.feature_snr_db if math.isfinite(report.feature_snr_db) else None
    return SentFeature(encoded, report.symbols, report.airtime_s, report.energy_j, snr)


def receive_feature(encoded: EncodedTensor, *, keep_merged: bool = False) -> Tensor | MergedLatent:
    """Device half: decode what arrived; ``keep_merged`` leaves a merged latent merged (the
    device runtime unmerges it inside its decoder graph)."""
    return decode(encoded, unmerge=not keep_merged)


def through_link(
    tensor: Tensor, chain: str, link: LinkEmulator | None, *, seed: int, keep_merged: bool = False
) -> Tensor | MergedLatent:
    """`send_feature` then `receive_feature`: what the device gets for ``tensor`` (latents)."""
    return receive_feature(send_feature(tensor, chain, link, seed=seed).encoded, keep_merged=keep_merged)


def noise_sigma_link(sigma: float, *, generator: torch.Generator) -> LinkEmulator | None:
    """The analog AWGN link that adds noise of std ``sigma`` × the values' RMS (None for σ = 0).

    The link normalises the symbols to unit power and adds noise at SNR = −20·log10 σ, so
    the received values carry noise of std σ·RMS(values).
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise InvalidInputError(f"noise sigma {sigma!r} must be finite and >= 0", field="sigma")
    if sigma == 0:
        return None
    config = LinkConfig(mode="analog", snr_db=-20.0 * math.log10(sigma), fading="awgn")
    return LinkEmulator(config, generator=generator)


def merge_noise_unmerge(latents: Tensor, ratio: float | Tensor, sigmas: Tensor, *, generator: torch.Generator) -> Tensor:
    """The feature path on a batch, one sample at a time: ``latents[b]`` merged at ``ratio``
    (or ``ratio[b]``), through the analog link at noise σ = ``sigmas[b]`` (relative to the
    merged tokens' RMS), unmerged. What the merge-aware decoder trains on and is measured on.

    Args:
        latents: ``[B, C, h, w]`` latents (any device; the path runs on the CPU).
        ratio: merge ratio, 0 ≤ ratio ≤ 0.75: one for the batch, or ``[B]`` per sample.
        sigmas: ``[B]`` noise σ per sample (0: no noise).
        generator: draws each sample's merge and channel seeds.
    Returns:
        ``[B, C, h, w]`` on the latents' device and dtype.
    """
    out = []
    ratios = ratio.reshape(-1).tolist() if isinstance(ratio, Tensor) else [float(ratio)] * latents.shape[0]
    if len(ratios) != latents.shape[0]:
        raise InvalidInputError(f"{len(ratios)} merge ratios for a batch of {latents.shape[0]}", field="ratio")
    for b in range(latents.shape[0]):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        link = noise_sigma_link(float(sigmas[b]), generator=torch.Generator().manual_seed(seed + 1))
        received = through_link(latents[b : b + 1].detach().float().cpu(), f"merge:{ratios[b]:g}", link, seed=seed)
        assert isinstance(received, Tensor)
        out.append(received)
    return torch.cat(out).to(latents.device, latents.dtype)
