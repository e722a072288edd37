"""Small, fully known environments for the policy tests (no measured table needed)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from meg.devices import DeviceProfile
from meg.policy.distortion import DistortionTable, MeasuredPoint
from meg.policy.env import EnvConfig, PlanSimulator

EDGE = DeviceProfile(name="edge", peak_flops=1e12, efficiency=1.0, overhead_s=0.0, power_active_w=100.0,
                     power_idle_w=0.0, tx_power_dbm=30.0)
DEVICE = DeviceProfile(name="ue", peak_flops=5e11, efficiency=1.0, overhead_s=0.0, power_active_w=10.0,
                       power_idle_w=1.0, tx_power_dbm=23.0)
STEPS = (4, 8, 12)
MERGES = (0.0, 0.5)
SIGMAS = (0.0, 0.2)
# one UNet pass = 0.05 TFLOP → edge step (2 passes) = 0.1 s; VAE = 0.1 TFLOP
FLOPS = {"unet_pass_flops": 5e10, "vae_decoder_flops": 1e11, "text_encoder_flops": 1e10}


def mse_of(split: str, steps: int, merge: float, sigma: float) -> float:
    """A known distortion surface: fewer steps, more merging and noise all hurt."""
    base = 0.01 * math.exp(-0.25 * (steps - 4))
    if split == "decoder":
        return base + 0.004 * merge + 0.01 * sigma
    return base


def small_table() -> DistortionTable:
    points = []
    for s in STEPS:
        points.append(MeasuredPoint("device", s, 0.0, 0.0, mse_of("device", s, 0, 0), 0.0))
        points.append(MeasuredPoint("image", s, 0.0, 0.0, mse_of("image", s, 0, 0), 0.0))
        for m in MERGES:
            for g in SIGMAS:
                points.append(MeasuredPoint("decoder", s, m, g, mse_of("decoder", s, m, g), 0.0))
    return DistortionTable(model="test", height=64, width=64, reference_steps=12, prompts=("p",), steps=STEPS,
                           merge_ratios=MERGES, noise_sigmas=SIGMAS, points=tuple(points),
                           cost_flops={"by_resolution": {"64": FLOPS, "128": FLOPS}})


def small_sim(**overrides: object) -> PlanSimulator:
    fields: dict[str, object] = dict(
        resolutions=(64,), steps=STEPS, merge_ratios=MERGES, max_merge_ratio=0.5, episode_length=8,
        latency_limit_s=1.0, energy_limit_j=1000.0, fading="rayleigh", fading_correlation=0.9)
    fields.update(overrides)
    return PlanSimulator(EnvConfig.preset("extended", **fields), table=small_table(), edge=EDGE, device=DEVICE)  # type: ignore[arg-type]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread while a test trains (spinning threads are costly on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
