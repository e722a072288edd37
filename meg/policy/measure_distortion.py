"""Measure the distortion table: run the real split pipeline over a plan × channel grid.

For every prompt, the reference is the unsplit `reference_steps`-step image. For every
(split, steps) the edge part runs once; for the "decoder" split the final latent then takes
the served feature path (`meg.split.features`: merge at every ratio, the analog link on the
merged tokens at every σ — AWGN at feature SNR = −20·log10 σ, i.e. noise of relative std σ
on the power-normalised tokens), and the device unmerges and decodes it; the "image" split sends the 8-bit image; the "device" split runs
everything on the device. Each point records the mean and std of the MSE over prompts.
The table also records FLOPs per partition of the profiled model and the FLOPs of the
cost architecture (`meg.devices.flops`) that the environment's cost model uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from meg.devices.flops import count_architecture_flops
from meg.errors import InvalidInputError
from meg.policy.distortion import MERGED_SPLITS, NOISY_SPLITS, DistortionTable, MeasuredPoint
from meg.split.flops import partition_flops

__all__ = ["DEFAULT_PROMPTS", "ProfileConfig", "profile_distortion"]

DEFAULT_PROMPTS = (
    "a red bicycle leaning on a brick wall",
    "a lighthouse on a cliff at sunset",
    "a bowl of oranges on a wooden table",
    "a snowy mountain above a blue lake",
    "a cat sleeping on a green sofa",
    "a city street at night in the rain",
)


@dataclass(frozen=True)
class ProfileConfig:
    """Grid and inputs of one profiling run."""

    model: str = "tiny-random"
    """Pipeline to profile (`meg.split.load_pipeline` name or local folder)."""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    """Prompt set; MSE is averaged over it (seed = base seed + prompt index)."""
    seed: int = 0
    """Base seed of the generations and of the merge/channel draws."""
    height: int = 64
    """Profiled image height, pixels."""
    width: int = 64
    """Profiled image width, pixels."""
    guidance_scale: float = 2.5
    """Classifier-free guidance (paper: 2.5)."""
    splits: tuple[str, ...] = ("device", "decoder", "image")
    """Split points to measure."""
    steps: tuple[int, ...] = (4, 6, 8, 10, 12)
    """Total steps grid (paper: 4…12)."""
    reference_steps: int = 12
    """Steps of the reference image (paper: the 12-step output)."""
    merge_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    """Merge-ratio grid for the decoder split."""
    noise_sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.32)
    """Relative channel-noise std grid for the decoder split (paper trains on U(0.05, 0.32))."""
    cost_architecture: str = "sdxl"
    """Architecture whose FLOPs the cost model uses (counted on the meta device)."""
    cost_resolutions: tuple[int, ...] = (512, 768, 1024)
    """Square sizes to count cost FLOPs at."""
    tome_ratio: float = 0.0
    """ToMe ratio inside the edge UNet for every generation, the reference included (MEG: 0.5);
    the cost FLOPs then also hold the UNet pass with ToMe."""
    decoder: str | None = None
    """VAE folder inside the model's folder whose decoder the device decodes with (the
    decoder and device splits; e.g. "vae" for the stock decoder, "vae_merge"); the reference
    and the edge's image then decode with the stock "vae". None: the pipeline's own VAE
    everywhere."""


def _quantise_8bit(image: torch.Tensor) -> torch.Tensor:
    """What an 8-bit RGB image on the wire decodes to."""
    return torch.round(image.clamp(0, 1) * 255.0) / 255.0


def _decoded(engine: Any, inputs: Any, tome_ratio: float) -> torch.Tensor:
    """The unsplit image with ToMe at TOME_RATIO in the edge UNet (the edge's own decoder)."""
    from meg.split import SplitPoint

    return engine.run_edge(inputs, SplitPoint.parse("image"), tome_ratio=tome_ratio)["image"]


def profile_distortion(config: ProfileConfig = ProfileConfig(), *,
                       on_progress: Callable[[int, int], None] | None = None) -> DistortionTable:
    """Run the grid and return the measured table (see module docstring)."""
    from meg.split import GenerationInputs, SplitEngine, SplitPoint, load_pipeline
    from meg.split.features import noise_sigma_link, through_link

    if config.reference_steps < max(config.steps):
        raise InvalidInputError(
            f"reference_steps {config.reference_steps} is below the largest profiled steps {max(config.steps)}")
    if not config.prompts:
        raise InvalidInputError("profile needs at least one prompt")
    pipeline = load_pipeline(config.model)
    device_vae = None
    if config.decoder is not None:
        from meg.models.registry import load_vae

        pipeline.vae, device_vae = load_vae(config.model, "vae"), load_vae(config.model, config.decoder)
    engine = SplitEngine(pipeline, device_vae=device_vae)
    merge_axis = config.merge_ratios
    sigma_axis = config.noise_sigmas
    per_prompt = (len(config.splits) - sum(s in MERGED_SPLITS for s in config.splits)
                  + sum(len(merge_axis) * len(sigma_axis) for s in config.splits if s in MERGED_SPLITS))
    total = len(config.prompts) * len(config.steps) * per_prompt
    done = 0
    samples: dict[tuple[str, int, float, float], list[float]] = {}
    flops: dict[str, dict[str, float]] = {}

    tome = config.tome_ratio

    def inputs_for(i: int, prompt: str, steps: int) -> Any:
        return GenerationInputs(prompt=prompt, seed=config.seed + i, height=config.height, width=config.width,
                                steps=steps, guidance_scale=config.guidance_scale)

    def record(key: tuple[str, int, float, float], image: torch.Tensor, reference: torch.Tensor) -> None:
        nonlocal done
        samples.setdefault(key, []).append(float(torch.mean((image.float() - reference.float()) ** 2)))
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    with torch.inference_mode():
        for i, prompt in enumerate(config.prompts):
            reference = _decoded(engine, inputs_for(i, prompt, config.reference_steps), tome)
            for steps in config.steps:
                inputs = inputs_for(i, prompt, steps)
                for split_name in config.splits:
                    split = SplitPoint.parse(split_name)
                    if i == 0:
                        pf = partition_flops(engine, split, inputs, tome_ratio=tome)
                        flops[f"{split_name}@{steps}"] = {"edge_flops": float(pf.edge_flops),
                                                          "device_flops": float(pf.device_flops)}
                    crossing = engine.run_edge(inputs, split, tome_ratio=tome) if split_name != "device" else {}
                    if split_name == "image":
                        record((split_name, steps, 0.0, 0.0), _quantise_8bit(crossing["image"]), reference)
                        continue
                    if split_name not in MERGED_SPLITS:
                        record((split_name, steps, 0.0, 0.0), engine.run_device(crossing, inputs, split), reference)
                        continue
                    latents = crossing["latents"]
                    for m, ratio in enumerate(merge_axis):
                        merge_seed = config.seed * 7919 + i * 101 + steps * 13 + m
                        for k, sigma in enumerate(sigma_axis):
                            # the served feature path: merge -> analog link on the merged tokens -> device
                            link = (noise_sigma_link(sigma, generator=torch.Generator().manual_seed(merge_seed * 31 + k))
                                    if split_name in NOISY_SPLITS else None)
                            received = through_link(latents, f"merge:{ratio:g}", link, seed=merge_seed, keep_merged=True)
                            image = engine.run_device({**crossing, "latents": received}, inputs, split)
                            record((split_name, steps, float(ratio), float(sigma)), image, reference)

    points = []
    for (split_name, steps, ratio, sigma), values in sorted(samples.items()):
        t = torch.tensor(values, dtype=torch.float64)
        points.append(MeasuredPoint(split_name, steps, ratio, sigma, float(t.mean()),
                                    float(t.std(unbiased=False)) if len(values) > 1 else 0.0))
    cost = {"architecture": config.cost_architecture, "guidance_passes": 2,
            "by_resolution": {str(r): count_architecture_flops(config.cost_architecture, r, r, tome_ratio=tome)  # type: ignore[arg-type]
                              for r in config.cost_resolutions}}
    return DistortionTable(
        model=config.model, height=config.height, width=config.width, reference_steps=config.reference_steps,
        prompts=tuple(config.prompts), steps=tuple(config.steps), merge_ratios=tuple(merge_axis),
        noise_sigmas=tuple(sigma_axis), points=tuple(points), flops=flops, cost_flops=cost,
        tome_ratio=float(tome), decoder=config.decoder or "")
