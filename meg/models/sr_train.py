"""Training of the Hybrid SR models of meg-tiny: training pairs from the procedural world.

**Pairs.** The target is the ground-truth render of a scene at R̃ = S·R (`world.render`
renders any size; the geometry scales with it). The input is what the generator produces
at R, kept pixel-aligned with the target: the render at R is passed through the family's
VAE (encode → decode), so the input carries the decoder's artefacts (blur, colour
bleeding, ringing) while the layout stays the ground truth's. Half of the inputs are
decoded by the stock decoder and half by the merge-aware one (the pipeline's default).
Only the VAE is used — the SR models do not depend on the text encoder or the UNets.

Generation resolutions: ×4 learns 128 → 512 (the generator's native 128 px); ×2 learns
both 128 → 256 and 256 → 512 (a 512-px target generated at 256). Crops are centred on an
object with probability `object_crops` (objects cover a few percent of a scene, and the
foreground patches that diffusion SR sees are object regions).

**Light SR**: MSE loss, residual over bicubic with the last conv zero-initialised (with
L1 and a bilinear base the residual stayed at zero for 1,000s of steps on these pairs),
one model per scale.
**Diffusion SR**: x0 (residual) prediction, cosine schedule, uniform timesteps, one
model for both scales (class label = scale), sampled with DDIM.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meg.models.sr import (
    DiffusionUpscaler,
    LightSRConfig,
    SRVGGNetCompact,
    UpscalerConfig,
    build_sr_unet,
    save_light_sr,
    upsample_bicubic,
)
from meg.models.world import IMAGE_SIZE, Scenes, render, sample_scenes

__all__ = ["SRPairs", "SRTrainConfig", "make_pairs", "sample_batch", "train_diffusion_sr", "train_light_sr"]


@dataclass(frozen=True)
class SRTrainConfig:
    """Budget and settings of the SR training runs (the shipped models used the defaults)."""

    seed: int = 0
    n_scenes: int = 512
    """Scenes generated at 128 px (pairs for ×2 → 256 and ×4 → 512)."""
    n_scenes_256: int = 128
    """Further scenes generated at 256 px (pairs for ×2 → 512)."""
    object_crops: float = 0.7
    """Fraction of diffusion SR crops centred (jittered) on one of the scene's objects (it
    upscales the foreground)."""
    light_object_crops: float = 0.3
    """The same for light SR, which upscales mostly background."""
    light_steps: int = 3000
    light_batch: int = 16
    light_crop: int = 32
    """Light SR input crop side (low-resolution pixels)."""
    light_lr: float = 2e-3
    light_num_feat: int = 32
    light_num_conv: int = 8
    diffusion_steps: int = 2000
    diffusion_batch: int = 8
    diffusion_crop: int = 48
    """Diffusion SR target crop side (high-resolution pixels; a multiple of 4 and of each scale)."""
    diffusion_lr: float = 1e-3
    diffusion_channels: tuple[int, ...] = (32, 64, 64)
    residual_scale: float = 4.0
    sample_steps: int = 4
    warmup_steps: int = 100
    checkpoint_every: int = 250

    @classmethod
    def smoke(cls) -> SRTrainConfig:
        return cls(n_scenes=8, n_scenes_256=4, light_steps=3, light_batch=2, light_crop=16, diffusion_steps=3, diffusion_batch=2,
                   diffusion_crop=32, diffusion_channels=(8, 16, 16), light_num_feat=8, light_num_conv=2, warmup_steps=1,
                   checkpoint_every=2)  # fmt: skip


@dataclass
class SRPairs:
    """uint8 image pools [N,3,H,W]: inputs at 128 and 256 px, targets at 256 and 512 px.

    `lr128[i]` pairs with `hr256[i]` (×2) and `hr512[i]` (×4); `lr256[j]` with `hr512_b[j]` (×2).
    """

    scenes: Scenes
    lr128: torch.Tensor
    hr256: torch.Tensor
    hr512: torch.Tensor
    scenes_b: Scenes
    lr256: torch.Tensor
    hr512_b: torch.Tensor

    def choices(self, scale: int) -> list[tuple[Scenes, torch.Tensor, torch.Tensor]]:
        """(scenes, inputs, targets) pools of `scale`."""
        if scale == 4:
            return [(self.scenes, self.lr128, self.hr512)]
        return [(self.scenes, self.lr128, self.hr256), (self.scenes_b, self.lr256, self.hr512_b)]


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _roundtrip(images: torch.Tensor, encoder: Any, decoders: list[Any], chunk: int) -> torch.Tensor:
    """VAE encode (posterior mean) → decode, image i by decoders[i % len(decoders)]; uint8."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk].float() / 127.5 - 1
            z = encoder.encode(x).latent_dist.mean
            rec = torch.empty_like(x)
            for k, dec in enumerate(decoders):
                rows = torch.arange(len(x))[(torch.arange(len(x)) + start) % len(decoders) == k]
                if len(rows):
                    rec[rows] = dec.decode(z[rows]).sample
            out.append(_uint8((rec + 1) / 2))
    return torch.cat(out)


def _render_uint8(scenes: Scenes, size: int, chunk: int = 32) -> torch.Tensor:
    return torch.cat([_uint8(render(scenes.select(slice(s, s + chunk)), size=size)[0]) for s in range(0, len(scenes), chunk)])


def make_pairs(model_dir: Path, config: SRTrainConfig, *, progress: bool = True) -> SRPairs:
    """Render the training scenes and pass the inputs through the family's VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    decoders = [vae]
    if (model_dir / "vae_merge").exists():
        decoders.append(AutoencoderKL.from_pretrained(model_dir / "vae_merge").eval())
    scenes = sample_scenes(config.n_scenes, config.seed + 7001)
    scenes_b = sample_scenes(config.n_scenes_256, config.seed + 7002)
    steps = tqdm(total=6, desc="SR pairs", disable=not progress)
    hr128 = _render_uint8(scenes, IMAGE_SIZE)
    hr256, hr512 = _render_uint8(scenes, 256), _render_uint8(scenes, 512)
    steps.update(3)
    lr128 = _roundtrip(hr128, vae, decoders, 32)
    steps.update(1)
    b256 = _render_uint8(scenes_b, 256)
    lr256 = _roundtrip(b256, vae, decoders, 8)
    hr512_b = _render_uint8(scenes_b, 512)
    steps.update(2)
    steps.close()
    return SRPairs(scenes, lr128, hr256, hr512, scenes_b, lr256, hr512_b)


def _pairs_cached(work_dir: Path, model_dir: Path, config: SRTrainConfig, progress: bool) -> SRPairs:
    path = work_dir / "pairs.safetensors"
    key = f"{config.seed}-{config.n_scenes}-{config.n_scenes_256}"
    if path.exists():
        tensors = load_file(path)
        if bytes(tensors["key"].tolist()).decode() == key:
            return SRPairs(
                sample_scenes(config.n_scenes, config.seed + 7001), tensors["lr128"], tensors["hr256"], tensors["hr512"],
                sample_scenes(config.n_scenes_256, config.seed + 7002), tensors["lr256"], tensors["hr512_b"],
            )  # fmt: skip
    pairs = make_pairs(model_dir, config, progress=progress)
    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(pairs, k).contiguous() for k in ("lr128", "hr256", "hr512", "lr256", "hr512_b")}
    tensors["key"] = torch.tensor(list(key.encode()), dtype=torch.uint8)
    # written whole, then renamed: a concurrent run never reads a half-written file
    save_file(tensors, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return pairs


def sample_batch(pairs: SRPairs, scale: int, batch: int, lr_crop: int, p_object: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Aligned crops: inputs [B,3,c,c] and targets [B,3,S·c,S·c], float in [0, 1]."""
    pools = pairs.choices(scale)
    pool = pools[int(torch.randint(0, len(pools), (), generator=gen))]
    scenes, inputs, targets = pool
    size = inputs.shape[-1]
    idx = torch.randint(0, len(inputs), (batch,), generator=gen)
    xs, ys = [], []
    for i in idx.tolist():
        if float(torch.rand((), generator=gen)) < p_object:
            j = int(torch.randint(0, int(scenes.n_objects[i]), (), generator=gen))
            jitter = (torch.rand(2, generator=gen) - 0.5) * (lr_crop / 2)
            f = size / IMAGE_SIZE
            top = int(float(scenes.cy_px[i, j]) * f - lr_crop / 2 + float(jitter[0]))
            left = int(float(scenes.cx_px[i, j]) * f - lr_crop / 2 + float(jitter[1]))
        else:
            top = int(torch.randint(0, size - lr_crop + 1, (), generator=gen))
            left = int(torch.randint(0, size - lr_crop + 1, (), generator=gen))
        top, left = min(max(top, 0), size - lr_crop), min(max(left, 0), size - lr_crop)
        xs.append(inputs[i, :, top : top + lr_crop, left : left + lr_crop])
        s = scale
        ys.append(targets[i, :, top * s : (top + lr_crop) * s, left * s : (left + lr_crop) * s])
    return torch.stack(xs).float() / 255, torch.stack(ys).float() / 255


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _loop(name: str, work_dir: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, config: SRTrainConfig,
          step_fn: Callable[[int, torch.Generator], torch.Tensor], progress: bool, *,
          warm_start: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Seeded training loop with checkpoints (a resumed run draws the same batches).

    `warm_start`: a finished checkpoint of an earlier run whose weights this run starts
    from (a fresh schedule and optimiser; the batches are drawn with seeds past its steps)."""
    ckpt = work_dir / f"{name}.pt"
    history: dict[str, list[float]] = {"step": [], "loss": []}
    start, elapsed, offset = 0, 0.0, 0
    extra: dict[str, Any] = {}
    if warm_start is not None:
        earlier = torch.load(warm_start, map_location="cpu", weights_only=True)
        module.load_state_dict(earlier["module"])
        offset = int(earlier["step"])
        extra = {"warm_start_steps": offset, "warm_start_time_s": round(float(earlier["elapsed_s"]), 1),
                 "warm_start_final_loss": earlier["history"]["loss"][-1]}  # fmt: skip
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["steps"] == steps and state.get("offset", 0) == offset:
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            history, start, elapsed = state["history"], state["step"], state["elapsed_s"]
    base = [g["lr"] for g in opt.param_groups]
    module.train()
    t0 = time.perf_counter()
    window: list[float] = []
    bar = tqdm(range(start, steps), desc=f"train {name}", disable=not progress, initial=start, total=steps, mininterval=30)
    for step in bar:
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * _lr_factor(step, steps, config.warmup_steps)
        loss = step_fn(step, torch.Generator().manual_seed(config.seed * 1_000_003 + offset + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        window.append(float(loss.detach()))
        if len(window) == 25 or step == steps - 1:
            history["step"].append(float(step))
            history["loss"].append(sum(window) / len(window))
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
            window = []
        if (step + 1) % config.checkpoint_every == 0 or step == steps - 1:
            state = {"module": module.state_dict(), "optimizer": opt.state_dict(), "history": history, "step": step + 1,
                     "steps": steps, "offset": offset, "elapsed_s": elapsed + time.perf_counter() - t0}  # fmt: skip
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
    module.eval()
    from meg.models.training import plot_losses

    plot_losses(history, work_dir / f"{name}-loss.png", title=f"meg-tiny {name}")
    return {"steps": steps, "time_s": round(elapsed + time.perf_counter() - t0, 1),
            "final_loss": history["loss"][-1] if history["loss"] else None, **extra}  # fmt: skip


def _record(folder: Path, name: str, config: SRTrainConfig, run: dict[str, Any], extra: dict[str, Any]) -> None:
    """folder/training.json: the settings and the run (wall time, final loss, machine)."""
    data = {"component": name, "train": asdict(config), "run": run, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), **extra}  # fmt: skip
    (folder / "training.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def train_light_sr(model_dir: Path, work_dir: Path, config: SRTrainConfig = SRTrainConfig(), *, scales: tuple[int, ...] = (2, 4),
                   progress: bool = True) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Train one light SR model per scale; writes model_dir/sr_light_x{S}/ (fp16)."""
    pairs = _pairs_cached(work_dir, model_dir, config, progress)
    runs = {}
    for scale in scales:
        torch.manual_seed(config.seed + scale)
        model = SRVGGNetCompact(LightSRConfig(scale=scale, num_feat=config.light_num_feat, num_conv=config.light_num_conv))
        # a zero residual is the bicubic baseline: training starts there instead of at noise
        last = model.body[-1]
        assert isinstance(last, torch.nn.Conv2d)
        torch.nn.init.zeros_(last.weight)
        if last.bias is not None:
            torch.nn.init.zeros_(last.bias)
        opt = torch.optim.Adam(model.parameters(), lr=config.light_lr)

        def step(i: int, gen: torch.Generator, model: SRVGGNetCompact = model, scale: int = scale) -> torch.Tensor:
            x, y = sample_batch(pairs, scale, config.light_batch, config.light_crop, config.light_object_crops, gen)
            return F.mse_loss(model(x), y)

        run = _loop(f"sr_light_x{scale}", work_dir, model, opt, config.light_steps, config, step, progress)
        folder = model_dir / f"sr_light_x{scale}"
        save_light_sr(model, folder)
        _record(folder, f"sr_light_x{scale}", config, run, {"parameters": sum(p.numel() for p in model.parameters())})
        runs[scale] = run
    return runs


def train_diffusion_sr(model_dir: Path, work_dir: Path, config: SRTrainConfig = SRTrainConfig(), *,
                       progress: bool = True, warm_start: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Train the diffusion upscaler (×2 and ×4); writes model_dir/sr_unet/ and sr_scheduler/.

    `warm_start`: continue from the weights of an earlier run's checkpoint (see `_loop`)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    pairs = _pairs_cached(work_dir, model_dir, config, progress)
    torch.manual_seed(config.seed)
    up_config = UpscalerConfig(residual_scale=config.residual_scale, steps=config.sample_steps, channels=config.diffusion_channels)
    unet = build_sr_unet(up_config, groups=8)
    train_sched: Any = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False)
    alphas = train_sched.alphas_cumprod
    upscaler = DiffusionUpscaler(unet, DDIMScheduler.from_config(train_sched.config, timestep_spacing="trailing"), up_config)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.diffusion_lr, weight_decay=0.0)

    def step(i: int, gen: torch.Generator) -> torch.Tensor:
        scale = up_config.scales[i % len(up_config.scales)]
        x, y = sample_batch(pairs, scale, config.diffusion_batch, config.diffusion_crop // scale, config.object_crops, gen)
        base = upsample_bicubic(x, scale)
        x0 = (y - base) * config.residual_scale
        t = torch.randint(0, 1000, (len(x),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(upscaler.denoise(noisy, base * 2 - 1, t, scale), x0)

    name = "sr_diffusion" if warm_start is None else "sr_diffusion_continued"
    run = _loop(name, work_dir, unet, opt, config.diffusion_steps, config, step, progress, warm_start=warm_start)
    upscaler.save(model_dir, unet_name="sr_unet", scheduler_name="sr_scheduler")
    _record(model_dir / "sr_unet", "sr_unet", config, run, {"parameters": sum(p.numel() for p in unet.parameters())})
    return run
