"""Measurements of a trained family: prompt fidelity, distribution distance, decoder MSE.

Every measurement is seeded and runs on the device given (CPU or CUDA); results are
plain dicts ready for JSON.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meg.errors import InvalidInputError
from meg.models import judge
from meg.models.captions import PromptSpec, parse_prompt, unknown_words
from meg.models.world import render

__all__ = ["decoder_mse", "evaluate_fidelity", "generate", "ground_truth_fidelity", "read_prompt_set", "read_prompts", "student_latents"]


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a prompts file (lines starting with # are comments)."""
    if not path.exists():
        raise InvalidInputError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise InvalidInputError(f"prompts file {str(path)!r} holds no prompt")
    return prompts


def read_prompt_set(path: Path) -> tuple[list[str], list[PromptSpec]]:
    """(prompts, what each asks for): a `.jsonl` set carries its ground truth
    (`meg.models.prompt_writer`); for a text file it is the parse of each prompt."""
    if path.suffix == ".jsonl":
        from meg.models.prompt_writer import load_prompt_set

        return load_prompt_set(path)
    prompts = read_prompts(path)
    return prompts, [parse_prompt(p) for p in prompts]


def generate(pipe, prompts: list[str], *, steps: int, guidance_scale: float, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1] (float32, CPU); prompt i uses generator seed `seed + i`."""
    device = pipe.unet.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        latents = torch.stack([torch.randn((4, 16, 16), generator=g) for g in gens]).to(device, pipe.unet.dtype)
        with torch.no_grad():
            images = pipe(
                prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents, generator=gens,
                height=128, width=128, output_type="pt",
            ).images  # fmt: skip
        out.append(images.float().cpu())
    return torch.cat(out)


def _real_features(net: judge.FeatureNet, specs: list[PromptSpec], seed: int, device: torch.device) -> np.ndarray:
    rng = np.random.default_rng(seed)
    feats = []
    for start in range(0, len(specs), 64):
        scenes = [judge.scene_from_spec(s, rng) for s in specs[start : start + 64]]
        from meg.models.world import Scenes

        batch = Scenes(**{k: torch.cat([getattr(s, k) for s in scenes]) for k in Scenes.__dataclass_fields__})
        images, _ = render(batch, device=device)
        with torch.no_grad():
            feats.append(net.features(images).cpu().numpy())
    return np.concatenate(feats)


def ground_truth_fidelity(prompts: list[str], *, seed: int = 0, vae: Any = None, specs: list[PromptSpec] | None = None) -> judge.FidelityReport:
    """The judge on renders of scenes that satisfy each prompt (validates the judge).

    `specs`: what each prompt asks for (default: the parse of each prompt). With `vae` (an
    AutoencoderKL), the renders are first encoded and decoded: the best a latent model
    with that autoencoder can score.
    """
    rng = np.random.default_rng(seed)
    specs = [parse_prompt(p) for p in prompts] if specs is None else specs
    if len(specs) != len(prompts):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(specs)} specs")
    scenes = [judge.scene_from_spec(s, rng) for s in specs]
    from meg.models.world import Scenes

    batch = Scenes(**{k: torch.cat([getattr(s, k) for s in scenes]) for k in Scenes.__dataclass_fields__})
    images, _ = render(batch)
    if vae is not None:
        with torch.no_grad():
            chunks = [vae.decode(vae.encode(images[i : i + 64] * 2 - 1).latent_dist.mean).sample for i in range(0, len(images), 64)]
        images = ((torch.cat(chunks).clamp(-1, 1) + 1) / 2).float()
    return judge.score_prompts(specs, images)


def evaluate_fidelity(
    name: str,
    prompts: list[str],
    *,
    steps: int,
    unet: str = "student",
    guidance_scale: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    merge_decoder: bool = False,
    batch_size: int = 64,
    specs: list[PromptSpec] | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt and judge it: fidelity, attribute accuracy, FSD.

    `specs`: what each prompt asks for (default: the parse of each prompt)."""
    if specs is not None and len(specs) != len(prompts):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(specs)} specs")
    from meg.models import registry

    if unet not in ("student", "teacher", "small"):
        raise InvalidInputError(f"unet must be 'student', 'teacher' or 'small', got {unet!r}")
    pipe = registry.load_pipeline(name, unet="teacher" if unet == "teacher" else "student", merge_decoder=merge_decoder)
    if unet == "small":
        pipe.unet = registry.load_small_unet(name)
    pipe = pipe.to(device)
    guidance = registry.default_guidance(name, "teacher" if unet == "teacher" else "student") if guidance_scale is None else guidance_scale
    t0 = time.perf_counter()
    images = generate(pipe, prompts, steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch_size)
    gen_s = time.perf_counter() - t0
    specs = [parse_prompt(p) for p in prompts] if specs is None else specs
    report = judge.score_prompts(specs, images)
    result: dict[str, Any] = {
        "model": name, "unet": unet, "steps": steps, "guidance_scale": guidance, "seed": seed,
        **report.to_dict(), "generation_s": round(gen_s, 2), "device": str(device),
        "prompts_with_unknown_words": sum(bool(unknown_words(p)) for p in prompts),
    }  # fmt: skip
    judge_dir = registry.model_dir(name) / "judge"
    if (judge_dir / "feature_net.safetensors").exists() and len(prompts) >= 2:
        net = judge.FeatureNet.load(judge_dir).to(device)
        with torch.no_grad():
            fake = np.concatenate([net.features(images[i : i + 64].to(device)).cpu().numpy() for i in range(0, len(images), 64)])
        real = _real_features(net, specs, seed + 1, torch.device(device))
        real2 = _real_features(net, specs, seed + 2, torch.device(device))
        result["fsd"] = judge.frechet_distance(fake, real)
        result["fsd_real_vs_real"] = judge.frechet_distance(real2, real)
    result["_images"] = images
    return result


def student_latents(name: str, prompts: list[str], *, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Scaled latents [N,4,16,16] (float32) of the family's student samples of `prompts` at its
    default steps and guidance; batch k starts from generator seed `seed + k·batch_size`."""
    from meg.models import registry

    pipe = registry.load_pipeline(name, merge_decoder=False).to(device)
    latents = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        g = torch.Generator().manual_seed(seed + start)
        with torch.no_grad():
            out = pipe(prompt=chunk, num_inference_steps=registry.default_steps(name), guidance_scale=registry.default_guidance(name),
                       latents=torch.randn((len(chunk), 4, 16, 16), generator=g).to(device), generator=g, output_type="latent", height=128, width=128)  # fmt: skip
        latents.append(out.images.float())
    return torch.cat(latents)


def decoder_mse(name: str, *, ratio: float = 0.5, sigma: float = 0.1, n: int = 128, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Image MSE vs the clean reference after merge(ratio) + noise(σ) + unmerge, stock vs merge-aware decoder.

    Latents are student samples (4 steps) of the family's in-distribution prompts; the
    reference is the stock decoder's image of the clean latent.
    """
    from diffusers import AutoencoderKL

    from meg.models import registry
    from meg.split.features import merge_noise_unmerge

    folder = registry.model_dir(name)
    stock = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device)
    merged = AutoencoderKL.from_pretrained(folder / "vae_merge", torch_dtype=torch.float32).to(device)
    z = student_latents(name, read_prompts(folder / "prompts" / "indist.txt")[:n], seed=seed, device=device)
    sf = float(stock.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference = ((stock.decode(z / sf).sample.clamp(-1, 1) + 1) / 2)
        noisy = merge_noise_unmerge(z, ratio, torch.full((len(z),), sigma), generator=gen)
        out = {}
        for label, vae in (("stock", stock), ("merge_aware", merged)):
            image = (vae.decode(noisy / sf).sample.clamp(-1, 1) + 1) / 2
            out[f"mse_{label}"] = float(((image - reference) ** 2).mean())
            clean = (vae.decode(z / sf).sample.clamp(-1, 1) + 1) / 2
            out[f"mse_clean_input_{label}"] = float(((clean - reference) ** 2).mean())
    out["reduction"] = 1 - out["mse_merge_aware"] / out["mse_stock"]
    out.update(ratio=ratio, sigma=sigma, n=len(z))
    return out
