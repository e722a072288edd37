"""Latency and energy of a plan: edge compute, downlink airtime, device compute.

MEG's cost model (PAPERS.md §1, "Costs"), vectorised over requests and candidate plans:

    latency = κ_ES·F_ES + T_tx + κ_UE·F_UE (+ per-stage overheads)
    energy  = ε_ES·F_ES + P_tx·T_tx + ε_UE·F_UE + P_idle,UE·(waiting time)

κ, ε and the overheads come from `meg.devices` profiles (their `compute_latency_s` /
`compute_energy_j` are affine in FLOPs, so two calls recover slope and intercept exactly);
FLOPs come from the cost architecture counted in `meg.devices.flops`; the airtime is the
number of bits that cross divided by the Shannon rate B·log2(1 + SNR).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meg.codecs.merge import MAX_MERGE_RATIO
from meg.errors import InvalidInputError

__all__ = ["SPLIT_CODES", "CostModel", "PlanCosts", "crossing_bits"]

# Split points the environment plans over; a plan stores the index into this tuple.
SPLIT_CODES = ("device", "decoder", "image")


def crossing_bits(split: np.ndarray, pixels: np.ndarray, merge_ratio: np.ndarray, *,
                  latent_bits_per_value: int = 16, merge_index_bits: int = 16,
                  image_bits_per_pixel: int = 24) -> np.ndarray:
    """Bits that cross the link for each plan (PAPERS.md §1, "What crosses").

    Args:
        split: [...] int codes into SPLIT_CODES.
        pixels: [...] H·W of the requested image.
        merge_ratio: [...] token-merge ratio (only the "decoder" split merges), clipped to 0.75.
    Returns:
        [...] float bits: decoder → 256·(N − r) + 16·r with N = H·W/256 tokens of 16 values
        and r = ⌊ratio·N⌋; image → 24·H·W; device → 0.
    """
    tokens = pixels / 256.0
    merged = np.floor(np.clip(merge_ratio, 0.0, MAX_MERGE_RATIO) * tokens)
    decoder_bits = 16 * latent_bits_per_value * (tokens - merged) + merge_index_bits * merged
    image_bits = image_bits_per_pixel * pixels
    return np.where(split == 1, decoder_bits, np.where(split == 2, image_bits, 0.0))


@dataclass(frozen=True)
class PlanCosts:
    """Outcome of plans, all arrays of one broadcast shape."""

    latency_s: np.ndarray
    energy_j: np.ndarray
    airtime_s: np.ndarray
    edge_flops: np.ndarray
    device_flops: np.ndarray


def _affine(fn: object) -> tuple[float, float]:
    """(intercept for x > 0, slope) of a function that is affine on x > 0 and 0 at 0."""
    big = 1e15
    at_one = float(fn(1.0))  # type: ignore[operator]
    at_big = float(fn(big))  # type: ignore[operator]
    slope = (at_big - at_one) / (big - 1.0)
    return at_one - slope, slope


class CostModel:
    """Vectorised latency/energy of plans for an edge and a device profile.

    Args:
        edge, device: `meg.devices.DeviceProfile`s (anything with compute_latency_s,
            compute_energy_j, radio_energy_j, power_idle_w).
        flops_by_pixels: {H·W: {"unet_pass_flops", "vae_decoder_flops", "text_encoder_flops"}}, and
            optionally "edge_unet_pass_flops" (the edge's pass, e.g. with ToMe; default: unet_pass_flops).
        bandwidth_hz: link bandwidth for the Shannon rate.
        guidance_passes: UNet passes per step (2 with classifier-free guidance).
    """

    def __init__(self, edge: object, device: object, flops_by_pixels: dict[int, dict[str, float]], *,
                 bandwidth_hz: float, guidance_passes: int = 2) -> None:
        if bandwidth_hz <= 0:
            raise InvalidInputError(f"bandwidth_hz must be > 0, got {bandwidth_hz!r}")
        self.edge_latency = _affine(edge.compute_latency_s)  # type: ignore[attr-defined]
        self.edge_energy = _affine(edge.compute_energy_j)  # type: ignore[attr-defined]
        self.device_latency = _affine(device.compute_latency_s)  # type: ignore[attr-defined]
        self.device_energy = _affine(device.compute_energy_j)  # type: ignore[attr-defined]
        self.edge_tx_w = float(edge.radio_energy_j(1.0))  # type: ignore[attr-defined]
        self.device_idle_w = float(device.power_idle_w)  # type: ignore[attr-defined]
        self.bandwidth_hz = float(bandwidth_hz)
        self.guidance_passes = int(guidance_passes)
        self.pixels = np.array(sorted(flops_by_pixels), dtype=np.float64)
        rows = [flops_by_pixels[int(p)] for p in self.pixels]
        self.unet = np.array([r["unet_pass_flops"] for r in rows])
        # the edge's UNet pass (with ToMe when the edge runs it; the device never does)
        self.edge_unet = np.array([r.get("edge_unet_pass_flops", r["unet_pass_flops"]) for r in rows])
        self.vae = np.array([r["vae_decoder_flops"] for r in rows])
        self.text = np.array([r["text_encoder_flops"] for r in rows])

    def rate_bps(self, snr_db: np.ndarray) -> np.ndarray:
        """Shannon rate B·log2(1 + 10^(SNR/10)) in bit/s."""
        return self.bandwidth_hz * np.log2(1.0 + np.power(10.0, np.asarray(snr_db) / 10.0))

    def __call__(self, split: np.ndarray, steps: np.ndarray, merge_ratio: np.ndarray,
                 snr_db: np.ndarray, pixels: np.ndarray) -> PlanCosts:
        """Costs of plans (split code, total steps, merge ratio) at (SNR, resolution); broadcasts."""
        split, steps, merge_ratio, snr_db, pixels = np.broadcast_arrays(
            np.asarray(split), np.asarray(steps, dtype=np.float64), np.asarray(merge_ratio, dtype=np.float64),
            np.asarray(snr_db, dtype=np.float64), np.asarray(pixels, dtype=np.float64))
        idx = np.searchsorted(self.pixels, pixels)
        if (idx >= len(self.pixels)).any() or (self.pixels[np.minimum(idx, len(self.pixels) - 1)] != pixels).any():
            bad = sorted(set(pixels.ravel().tolist()) - set(self.pixels.tolist()))
            raise InvalidInputError(f"no cost FLOPs for image sizes {bad} (pixels); have {self.pixels.tolist()}")
        unet, edge_unet, vae, text = self.unet[idx], self.edge_unet[idx], self.vae[idx], self.text[idx]
        is_device, is_image = split == 0, split == 2
        edge_flops = np.where(is_device, 0.0, text + steps * self.guidance_passes * edge_unet + np.where(is_image, vae, 0.0))
        device_flops = np.where(is_device, text + steps * self.guidance_passes * unet + vae, np.where(is_image, 0.0, vae))
        bits = crossing_bits(split, pixels, merge_ratio)
        airtime_s = bits / self.rate_bps(snr_db)

        def run(flops: np.ndarray, model: tuple[float, float]) -> np.ndarray:
            return np.where(flops > 0, model[0] + model[1] * flops, 0.0)

        edge_s, device_s = run(edge_flops, self.edge_latency), run(device_flops, self.device_latency)
        latency_s = edge_s + airtime_s + device_s
        energy_j = (run(edge_flops, self.edge_energy) + run(device_flops, self.device_energy)
                    + self.edge_tx_w * airtime_s + self.device_idle_w * (edge_s + airtime_s))
        return PlanCosts(latency_s, energy_j, airtime_s, edge_flops, device_flops)
