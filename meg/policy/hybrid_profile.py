"""`meg hybrid profile`: the measured models of the Hybrid SR controller (PAPERS.md §2, eqs. 1–7).

For one model family (meg-tiny by default) it measures, seeded, on one CPU thread:

- **g(D, R)** (eq. 1, the paper's CLIPScore): the judge's prompt fidelity (`meg.models.judge`,
  mean fraction of requested attributes met, read on the image resized to the judge's 128 px)
  of images generated at R with D steps, student (LCM) and teacher (DDIM) UNets, on held-out
  prompts with ground truth (`prompts/independent_val.jsonl`);
- **m(S, γ)** (eq. 2, the paper's MUSIQ; here a full-reference detail measure): SSIM against
  the ground-truth render at R̃ of the Hybrid SR output (the render seen through the
  family's VAE at R = R̃/S, top-γ latent cells by diffusion SR, the rest by light SR, stitched),
  divided by the SSIM of the same VAE view generated directly at R̃ (S = 1). m = 1 at S = 1;
  m < 1 measures what the upscaling loses, rising with γ. (The paper's m(γ) > 1 is the gain
  over light SR alone; ours is normalised to direct generation instead, so Q = g·m compares
  every S on one scale.);
- **ξ1(D, R)**: FLOPs of generation at R (text encoder, D UNet calls, VAE decode;
  `SplitEngine.flops`); **ξ2(R, γ)**, **ξ3(R, γ)**: FLOPs of the diffusion SR of ⌈16γ⌉
  foreground cells and of the light SR of the remaining cells (the real models' counters,
  per padded patch, mean cell);
- **η**: bytes of the real encodings (the recipe's codec chain) of the upscaled foreground
  cells (T4), the low-resolution background cells (T5), and the whole image at R̃ for S = 1.

Latency (eqs. 3–7) is not stored: the controller computes it from these loads with the
device profiles and link rate it is given. Without a ×4 light SR model in the family the
×2 model runs twice (recorded in the table).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["HybridProfileConfig", "packaged_table", "profile_hybrid"]


@dataclass(frozen=True)
class HybridProfileConfig:
    """What `meg hybrid profile` measures (defaults: a few CPU minutes on one thread)."""

    model: str = "meg-tiny"
    """Model family (generator, VAE, judge, SR models)."""
    targets_px: tuple[int, ...] = (256, 384, 512)
    """Target resolutions R̃ (square sides)."""
    sr_scales: tuple[int, ...] = (1, 2, 4)
    """Candidate SR scales 𝒮."""
    student_steps: tuple[int, ...] = (1, 2, 4, 8)
    """Candidate steps of the few-step student (LCM)."""
    teacher_steps: tuple[int, ...] = (10,)
    """Candidate steps of the teacher (DDIM with guidance)."""
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Foreground fractions γ measured."""
    n_prompts: int = 12
    """Held-out prompts per (D, R) for g."""
    n_detail: int = 3
    """Held-out scenes per (R̃, S) for m."""
    codec_chain: str = "fp16,zstd:3"
    """Chain the patches are encoded with (the recipe's default)."""
    seed: int = 0
    """Seeds the prompts' generations and the scenes."""
    grid: int = 4
    margin_px: int = 4


def packaged_table(model: str = "meg-tiny") -> Path:
    """The shipped table of a family: meg/policy/tables/hybrid-sr-<model>.json."""
    return Path(__file__).parent / "tables" / f"hybrid-sr-{model}.json"


def _judge_view(images: torch.Tensor) -> torch.Tensor:
    """Images resized to the judge's 128 px (area down, bicubic up)."""
    side = images.shape[-1]
    if side == 128:
        return images
    mode = "area" if side > 128 else "bicubic"
    return F.interpolate(images, size=(128, 128), mode=mode).clamp(0, 1)


class _LightChain:
    """The light SR at scale S: the family's ×S model, else its ×2 model applied log2(S) times."""

    def __init__(self, family: Path, scale: int) -> None:
        from meg.models.sr import load_light_sr

        try:
            self.models = [load_light_sr(family, scale=scale)]
            self.note = f"x{scale}"
        except Exception:  # noqa: BLE001 (missing component: compose the ×2 model)
            self.models = [load_light_sr(family, scale=2)] * int(round(math.log2(scale)))
            self.note = f"x2 applied {len(self.models)} times"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.models:
            x = m(x).clamp(0, 1)
        return x

    def flops(self, h: int, w: int) -> float:
        from meg.models.sr import light_sr_flops

        total = 0.0
        for m in self.models:
            total += light_sr_flops(m, h, w)
            h, w = h * m.scale, w * m.scale
        return total


def _measure_generation(config: HybridProfileConfig, resolutions: list[int], log: Any) -> list[dict[str, Any]]:
    from meg.models.evaluate import read_prompt_set
    from meg.models.judge import score_prompts
    from meg.models.registry import default_guidance, load_pipeline, model_dir
    from meg.split.engine import GenerationInputs, SplitEngine
    from meg.split.flops import partition_flops
    from meg.split.points import SplitPoint

    prompts, specs = read_prompt_set(model_dir(config.model) / "prompts" / "independent_val.jsonl")
    prompts, specs = prompts[: config.n_prompts], specs[: config.n_prompts]
    rows = []
    for unet, steps_set in (("student", config.student_steps), ("teacher", config.teacher_steps)):
        engine = SplitEngine(load_pipeline(config.model, unet=unet))  # type: ignore[arg-type]
        guidance = default_guidance(config.model, unet=unet)  # type: ignore[arg-type]
        for r in resolutions:
            for d in steps_set:
                started = time.perf_counter()
                images = []
                for i, p in enumerate(prompts):
                    inputs = GenerationInputs(prompt=p, seed=config.seed * 1000 + i, height=r, width=r, steps=d,
                                              guidance_scale=guidance)
                    with torch.no_grad():
                        images.append(engine.run_full(inputs))
                report = score_prompts(specs, _judge_view(torch.cat(images)))
                inputs = GenerationInputs(prompt=prompts[0], height=r, width=r, steps=d, guidance_scale=guidance)
                flops = float(partition_flops(engine, SplitPoint("image"), inputs).edge_flops)
                cpu_s = (time.perf_counter() - started) / len(prompts)
                rows.append({"unet": unet, "steps": d, "r_px": r, "fidelity": round(report.fidelity, 4),
                             "gflops": round(flops / 1e9, 4), "cpu_s_per_image": round(cpu_s, 3)})
                log(f"g: {unet} D={d} R={r}: fidelity {report.fidelity:.3f}, {flops / 1e9:.1f} GFLOPs, {cpu_s:.2f} s/image")
    return rows


def _measure_sr(config: HybridProfileConfig, log: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from diffusers import AutoencoderKL

    from meg.codecs.chain import encode
    from meg.models.registry import model_dir
    from meg.models.sr import load_diffusion_sr
    from meg.models.world import WorldConfig, render, sample_scenes
    from meg.split import regions
    from meg.split.image_quality import psnr_db, ssim

    folder = model_dir(config.model)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    decoder = AutoencoderKL.from_pretrained(folder / "vae_merge" if (folder / "vae_merge").exists() else folder / "vae").eval()
    diffusion = load_diffusion_sr(folder)
    scenes = sample_scenes(config.n_detail, 91_000 + config.seed, WorldConfig(heldout=True))
    n_cells = config.grid * config.grid

    @torch.no_grad()
    def view(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = vae.encode(render(scenes, size=size)[0] * 2 - 1).latent_dist.mean
        return ((decoder.decode(z).sample + 1) / 2).clamp(0, 1), z

    def nbytes(x: torch.Tensor) -> int:
        return encode(x.contiguous(), config.codec_chain).bits_on_wire // 8

    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    for target in config.targets_px:
        gt = render(scenes, size=target)[0]
        direct, _ = view(target)
        ssim_direct = ssim(direct, gt)
        image_bytes = float(np.mean([nbytes(direct[i : i + 1]) for i in range(len(direct))]))
        rows.append({"target_px": target, "sr_scale": 1, "gamma": 0.0, "ssim": round(ssim_direct, 5),
                     "psnr_db": round(psnr_db(direct, gt), 3), "m": 1.0, "edge_gflops": 0.0, "device_gflops": 0.0,
                     "fg_bytes": 0.0, "bg_bytes": 0.0, "image_bytes": image_bytes})
        for scale in [s for s in config.sr_scales if s > 1]:
            r = target // scale
            light = _LightChain(folder, scale)
            notes[f"light_x{scale}@{target}"] = light.note
            low, latents = view(r)
            patches = regions.grid_patches(r, r, grid=config.grid, margin=config.margin_px)
            started = time.perf_counter()
            # every cell both ways once; any γ picks per cell
            light_up, diff_up, fg_b, bg_b = [], [], [], []
            for i in range(len(low)):
                lu, du = [], []
                for p in patches:
                    px = regions.crop(low[i : i + 1], p.padded)
                    lu.append(light(px))
                    g = torch.Generator().manual_seed(config.seed * 100_003 + 97 * i + p.cell)
                    du.append(diffusion(px, scale, generator=g))
                    fg_b.append(nbytes(du[-1]))
                    bg_b.append(nbytes(px))
                light_up.append(lu)
                diff_up.append(du)
            cell_fg_bytes, cell_bg_bytes = float(np.mean(fg_b)), float(np.mean(bg_b))
            cell_diff_flops = float(np.mean([diffusion.flops(p.padded.height, p.padded.width, scale) for p in patches]))
            cell_light_flops = float(np.mean([light.flops(p.padded.height, p.padded.width) for p in patches]))
            ranking = regions.partition_latent(latents, grid=config.grid).ranking  # cells by latent variance
            for gamma in config.gammas:
                k = regions.foreground_count(gamma, n_cells)
                outs = []
                for i in range(len(low)):
                    chosen = {int(c) for c in ranking[i, :k]}
                    ups = [diff_up[i][c] if p.cell in chosen else light_up[i][c] for c, p in enumerate(patches)]
                    outs.append(regions.stitch(ups, [p.scaled(scale) for p in patches], target, target))
                out = torch.cat(outs)
                s = ssim(out, gt)
                rows.append({"target_px": target, "sr_scale": scale, "gamma": gamma, "ssim": round(s, 5),
                             "psnr_db": round(psnr_db(out, gt), 3), "m": round(s / ssim_direct, 5),
                             "edge_gflops": round(k * cell_diff_flops / 1e9, 5),
                             "device_gflops": round((n_cells - k) * cell_light_flops / 1e9, 5),
                             "fg_bytes": k * cell_fg_bytes, "bg_bytes": (n_cells - k) * cell_bg_bytes,
                             "image_bytes": 0.0})
            log(f"m: R̃={target} S={scale}: SSIM γ=0 {rows[-len(config.gammas)]['ssim']:.3f}, γ=1 {rows[-1]['ssim']:.3f} "
                f"(direct {ssim_direct:.3f}), {time.perf_counter() - started:.0f} s")
    return rows, notes


def _weights_digest(model: str) -> dict[str, str]:
    """sha256 (first 16 hex) of the SR and generator weights the table was measured with."""
    import hashlib

    from meg.models.registry import model_dir

    folder = model_dir(model)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.glob("*/*.safetensors")) if p.parent.name.startswith(("sr_", "unet", "teacher_unet", "vae"))}


def profile_hybrid(config: HybridProfileConfig = HybridProfileConfig(), *, log: Any = print) -> dict[str, Any]:
    """Measure the table (see the module docstring); returns it as a JSON-ready dict."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    resolutions = sorted({t // s for t in config.targets_px for s in config.sr_scales})
    sr_rows, notes = _measure_sr(config, log)
    generation = _measure_generation(config, resolutions, log)
    return {
        "table": "hybrid-sr",
        "weights_sha256": _weights_digest(config.model),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "quality": {"g": "judge prompt fidelity at 128 px (CLIPScore analogue)",
                    "m": "SSIM vs the ground-truth render at R̃, relative to direct generation at R̃ (MUSIQ analogue)"},
        "notes": notes,
        "generation": generation,
        "sr": sr_rows,
        "profile_s": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
