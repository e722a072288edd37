"""Fit a device profile's efficiency and overhead from stage times measured here.

Stages of different sizes (UNet forward with classifier-free guidance and VAE decode at
several latent resolutions) are timed (warm-up, then the median of several repeats) and
their FLOPs counted; a least-squares line ``latency_s = FLOPs / effective_flops +
overhead_s`` through the points gives the sustained throughput and the fixed overhead.
``peak_flops`` of this machine is measured as the throughput of a large fp32 matmul, so
``efficiency`` says how much of the machine's dense-matmul speed the model reaches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from meg.devices.flops import count_flops
from meg.devices.profile import DeviceProfile
from meg.errors import InvalidInputError

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "StageTiming",
    "calibrate",
    "fit_latency_model",
    "measure_peak_flops",
    "median_time_s",
]


@dataclass(frozen=True)
class CalibrationConfig:
    """What `meg devices calibrate` measures, and the profile values it cannot measure."""

    name: str = "this-machine"
    """Name written into the fitted profile."""
    latent_sizes: tuple[int, ...] = (8, 16, 24)
    """Latent side lengths of the timed stages (image side = 8 × latent side)."""
    text_tokens: int = 77
    """Length of the (random) text embeddings fed to the UNet."""
    warmup: int = 1
    """Untimed runs before timing each stage."""
    repeats: int = 5
    """Timed runs per stage; the median is used."""
    matmul_size: int = 1024
    """Side of the square fp32 matmul that measures peak FLOP/s."""
    power_active_w: float = 20.0
    """Not measurable from Python: assumed ~10 W per busy core of a 2-core server slice."""
    power_idle_w: float = 5.0
    """Not measurable from Python: assumed."""
    tx_power_dbm: float = 30.0
    """Radio power when this machine acts as the edge (MEG paper: 30 dBm)."""


@dataclass(frozen=True)
class StageTiming:
    """One timed stage."""

    stage: str
    flops: int
    latency_s: float


@dataclass(frozen=True)
class CalibrationResult:
    """The fitted profile and the measurements behind it."""

    profile: DeviceProfile
    timings: tuple[StageTiming, ...]
    measured_peak_flops: float
    fitted_effective_flops: float
    residual_rms_s: float


def median_time_s(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    if repeats < 1 or warmup < 0:
        raise InvalidInputError(f"need repeats >= 1 and warmup >= 0, got {repeats!r}, {warmup!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peak_flops(size: int = 1024, *, repeats: int = 5) -> float:
    """Dense fp32 matmul throughput of this machine with torch's current thread count."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    seconds = median_time_s(lambda: torch.mm(a, b), warmup=1, repeats=repeats)
    return 2.0 * size**3 / seconds


def fit_latency_model(timings: Sequence[StageTiming]) -> tuple[float, float, float]:
    """Least-squares fit of ``latency_s = seconds_per_flop · flops + overhead_s``.

    Returns:
        ``(seconds_per_flop, overhead_s, residual_rms_s)``; the overhead is clipped at 0.

    Raises:
        InvalidInputError: fewer than two distinct FLOP counts, or times that do not grow
            with FLOPs (a non-positive slope).
    """
    flops = np.array([t.flops for t in timings], dtype=np.float64)
    seconds = np.array([t.latency_s for t in timings], dtype=np.float64)
    if len(np.unique(flops)) < 2:
        raise InvalidInputError(f"need stages of at least two different FLOP counts, got {flops.tolist()}")
    design = np.stack([flops, np.ones_like(flops)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, seconds, rcond=None)
    if slope <= 0:
        raise InvalidInputError(f"measured times do not grow with FLOPs (slope {slope:.3e} s/FLOP)")
    overhead_s = max(float(intercept), 0.0)
    residual = seconds - (slope * flops + overhead_s)
    return float(slope), overhead_s, float(np.sqrt(np.mean(residual**2)))


def _stages(unet: Any, vae: Any, config: CalibrationConfig) -> list[tuple[str, Callable[[], object]]]:
    gen = torch.Generator().manual_seed(0)
    cross_dim = int(unet.config.cross_attention_dim)
    in_channels = int(unet.config.in_channels)
    latent_channels = int(vae.config.latent_channels)
    stages: list[tuple[str, Callable[[], object]]] = []
    for side in config.latent_sizes:
        # batch 2: one classifier-free-guidance step (uncond + cond).
        sample = torch.randn(2, in_channels, side, side, generator=gen)
        text = torch.randn(2, config.text_tokens, cross_dim, generator=gen)
        timestep = torch.tensor(500)
        latent = torch.randn(1, latent_channels, side, side, generator=gen)

        def run_unet(sample: torch.Tensor = sample, text: torch.Tensor = text, timestep: torch.Tensor = timestep) -> object:
            return unet(sample, timestep, encoder_hidden_states=text, return_dict=False)

        def run_decode(latent: torch.Tensor = latent) -> object:
            return vae.decode(latent, return_dict=False)

        stages.append((f"unet-step {side * 8}px", run_unet))
        stages.append((f"vae-decode {side * 8}px", run_decode))
    return stages


def calibrate(
    unet: Any,
    vae: Any,
    *,
    config: CalibrationConfig = CalibrationConfig(),
    on_stage: Callable[[StageTiming], None] | None = None,
) -> CalibrationResult:
    """Time UNet steps and VAE decodes of several sizes here and fit a profile.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (float32, CPU, eval).
        vae: a diffusers ``AutoencoderKL``.
        config: sizes, repeats and the power/radio values that cannot be measured.
        on_stage: called after each stage is timed (progress display).
    """
    timings: list[StageTiming] = []
    with torch.inference_mode():
        for stage, fn in _stages(unet, vae, config):
            flops = count_flops(fn)
            latency_s = median_time_s(fn, warmup=config.warmup, repeats=config.repeats)
            timing = StageTiming(stage=stage, flops=flops, latency_s=latency_s)
            timings.append(timing)
            if on_stage is not None:
                on_stage(timing)
        peak = measure_peak_flops(config.matmul_size, repeats=config.repeats)
    seconds_per_flop, overhead_s, rms_s = fit_latency_model(timings)
    effective = 1.0 / seconds_per_flop
    # A model can beat a single matmul's measured rate only by measurement noise.
    efficiency = min(effective / peak, 1.0)
    profile = DeviceProfile(
        name=config.name,
        peak_flops=peak,
        efficiency=efficiency,
        overhead_s=overhead_s,
        power_active_w=config.power_active_w,
        power_idle_w=config.power_idle_w,
        tx_power_dbm=config.tx_power_dbm,
        description=(
            f"Calibrated on this machine (torch threads: {torch.get_num_threads()}): peak_flops is the "
            f"measured fp32 {config.matmul_size}x{config.matmul_size} matmul rate; efficiency and "
            f"overhead_s are a least-squares fit over {len(timings)} UNet/VAE stages "
            f"(residual rms {rms_s * 1e3:.2f} ms). Power values are assumptions "
            f"({config.power_active_w} W active, {config.power_idle_w} W idle)."
        ),
    )
    return CalibrationResult(
        profile=profile,
        timings=tuple(timings),
        measured_peak_flops=peak,
        fitted_effective_flops=effective,
        residual_rms_s=rms_s,
    )
