"""Shared machinery of the meg-tiny training stages: sessions, checkpoints, loss curves.

A `Session` holds the configs, the working folder (checkpoints, loss logs, plots) and the
model folder (the shipped diffusers components), and caches the expensive shared inputs
(scenes, tokenised captions, cached latents, teacher trajectories) so that `meg train all`
computes each once. `run_loop` is the one training loop every stage uses: fixed per-step
seeds (a resumed run draws the same batches as an uninterrupted one), a checkpoint every
`checkpoint_every` steps, a progress bar, and a loss-curve PNG at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meg.models.family import FamilyConfig

__all__ = ["CAPTION_STYLES", "DECODER_LOSSES", "Session", "TrainConfig", "check_decoder_loss", "run_loop", "seeded"]


CAPTION_STYLES = ("templates", "augmented")
"""Training captions of the teacher continuation: `meg.models.captions.caption_scene`'s
templates, or `meg.models.paraphrase.paraphrase_scene`'s many more phrasings."""

DECODER_LOSSES = ("relative", "absolute")
"""Objectives of the merge-aware decoder (see `TrainConfig.decoder_loss`)."""


def check_decoder_loss(value: str, name: str = "loss") -> None:
    """ValueError naming `value` unless it is one of DECODER_LOSSES."""
    if value not in DECODER_LOSSES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, DECODER_LOSSES))}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Training budget of every stage (the shipped family used the defaults)."""

    seed: int = 0
    n_scenes: int = 12_000
    """Training scenes (each with `captions_per_scene` paraphrases), rendered once."""
    captions_per_scene: int = 4
    n_eval_prompts: int = 200
    """Prompts per evaluation file (held-out and in-distribution)."""
    vae_steps: int = 2400
    vae_batch: int = 16
    vae_crop: int = 64
    """The (fully convolutional) VAE trains on random crops of this side, in pixels."""
    vae_object_crops: float = 0.8
    """Fraction of VAE crops centred (with jitter) on one of the scene's objects."""
    vae_object_weight: float = 4.0
    """Extra reconstruction-loss weight of object (saturated) pixels."""
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6
    text_steps: int = 600
    text_batch: int = 64
    text_lr: float = 1e-3
    teacher_steps: int = 5000
    teacher_batch: int = 32
    teacher_lr: float = 5e-4
    teacher_text_lr: float = 5e-5
    """The text encoder is fine-tuned with the teacher at this smaller rate; 0 freezes it
    (no text backward pass)."""
    teacher_min_snr: float = 5.0
    """Min-SNR-γ loss weighting of the teacher (Hang et al. 2023); 0 turns it off."""
    cond_dropout: float = 0.1
    """Probability of training on the empty prompt (classifier-free guidance)."""
    ema_decay: float = 0.999
    n_trajectories: int = 2048
    """Teacher ODE trajectories the students are distilled on."""
    trajectory_batch: int = 256
    distill_steps: int = 500
    distill_batch: int = 32
    distill_lr: float = 1e-4
    distill_uncond_weight: float = 0.25
    """Weight of the term that keeps the student's unconditional prediction at the teacher's."""
    small_steps: int = 400
    small_lr: float = 5e-4
    decoder_steps: int = 600
    decoder_batch: int = 16
    decoder_crop: int = 64
    """The merge-aware decoder trains on latent crops decoding to this side, in pixels."""
    decoder_lr: float = 3e-4
    decoder_max_ratio: float = 0.75
    decoder_sigma: tuple[float, float] = (0.05, 0.3)
    decoder_loss: str = "relative"
    """"relative": each crop's image MSE divided by the stock decoder's MSE on the same
    noisy input (so every ratio and σ counts alike, and the objective is the reported
    reduction); "absolute": plain image MSE (dominated by the noisiest inputs)."""
    judge_steps: int = 300
    judge_batch: int = 32
    judge_lr: float = 2e-3
    checkpoint_every: int = 250
    warmup_steps: int = 200

    def __post_init__(self) -> None:
        check_decoder_loss(self.decoder_loss, "decoder_loss")

    @classmethod
    def gpu(cls) -> TrainConfig:
        """The budget of the shipped weights (one GPU, ~13 min): full images, large batches."""
        return replace(
            cls(), n_scenes=60_000, vae_steps=3000, vae_batch=64, vae_crop=128, vae_object_crops=0.0, vae_object_weight=0.0,
            vae_lr=5e-4, text_steps=1500, text_batch=256, teacher_steps=2000, teacher_batch=512, teacher_lr=4e-4,
            teacher_min_snr=0.0, n_trajectories=16_384, trajectory_batch=2048, distill_steps=1000, distill_batch=256,
            small_steps=600, small_lr=4e-4, decoder_steps=1500, decoder_batch=64, decoder_crop=128, decoder_loss="absolute", judge_steps=600,
            judge_batch=128,
        )  # fmt: skip

    @classmethod
    def smoke(cls) -> TrainConfig:
        """A few steps of everything: checks the whole pipeline end to end on a CPU."""
        return replace(
            cls(), n_scenes=48, captions_per_scene=2, n_eval_prompts=6, vae_steps=3, vae_batch=4, vae_crop=32, text_steps=3,
            text_batch=8, teacher_steps=4, teacher_batch=8, ema_decay=0.5, n_trajectories=8, trajectory_batch=8,
            distill_steps=3, distill_batch=4, small_steps=3, decoder_steps=3, decoder_batch=4, decoder_crop=32, judge_steps=3,
            judge_batch=8, checkpoint_every=2, warmup_steps=1,
        )  # fmt: skip


def seeded(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step (draws are moved to the device afterwards)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class Session:
    """One training run: where things go and what has been computed so far."""

    work_dir: Path
    model_dir: Path
    family: FamilyConfig = field(default_factory=FamilyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    cache: dict[str, Any] = field(default_factory=dict)
    record_configs: bool = True
    """Whether `record` writes `family` and `train` into training.json (off when continuing a
    trained family, whose recorded configs must stay as they were)."""

    def stage_dir(self, stage: str) -> Path:
        path = self.work_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record(self, stage: str, **values: Any) -> None:
        """Merge `values` into model_dir/training.json under `stage` (read by the model cards)."""
        path = self.model_dir / "training.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        entry = data.setdefault(stage, {})
        entry.update(values)
        if self.record_configs:
            data["family"] = asdict(self.family)
            data["train"] = asdict(self.train)
        path.write_text(json.dumps(data, indent=1, default=str))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _ema_pairs(ema: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA tensors, live tensors) in matching order; state_dict tensors share the live storage."""
    live = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items() if v.dtype.is_floating_point}
    keys = sorted(ema)
    return [ema[k] for k in keys], [live[k] for k in keys]


def ema_state(ema: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The EMA weights of module `name` as a state dict."""
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}


def run_loop(
    session: Session,
    stage: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    steps: int,
    step_fn: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
    *,
    ema_decay: float | None = None,
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor] | None]:
    """Train `modules` for `steps` steps, resuming from the stage's checkpoint if present.

    `step_fn(step, generator)` returns the named losses of one batch; their sum is
    minimised. Returns the loss history and, with `ema_decay`, the EMA weights
    (keys "module.param").
    """
    folder = session.stage_dir(stage)
    ckpt_path = folder / "checkpoint.pt"
    history: dict[str, list[float]] = {}
    ema: dict[str, torch.Tensor] | None = None
    if ema_decay is not None:
        ema = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items() if v.dtype.is_floating_point}
    start, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=session.device, weights_only=True)
        if state["steps"] == steps:
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
            history, start, elapsed = state["history"], state["step"], state["elapsed_s"]
            if ema is not None:
                ema = state["ema"]
    ema_lists = _ema_pairs(ema, modules) if ema is not None else None
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for m in modules.values():
        m.train()

    def save(step: int) -> None:
        state = {
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "history": history,
            "step": step,
            "steps": steps,
            "elapsed_s": elapsed + time.perf_counter() - t0,
            "ema": ema,
        }
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    t0 = time.perf_counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = tqdm(range(start, steps), desc=f"train {stage}", disable=not session.progress, initial=start, total=steps)
    for step in bar:
        factor = _lr_factor(step, steps, session.train.warmup_steps)
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * factor
        losses = step_fn(step, seeded(session.train.seed, step))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema_lists is not None and ema_decay is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema_lists[0], ema_lists[1], 1 - min(ema_decay, (1 + step) / (10 + step)))
        # reading a loss synchronises with the device: only every 10th step
        if step % 10 == 0 or step == steps - 1:
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                history.setdefault(k, []).append(v)
            history.setdefault("step", []).append(float(step))
            bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()})
        if (step + 1) % session.train.checkpoint_every == 0 or step == steps - 1:
            save(step + 1)
    for m in modules.values():
        m.eval()
    total_s = elapsed + time.perf_counter() - t0
    plot_losses(history, folder / "loss.png", title=f"{session.family.name} {stage}")
    final = {k: v[-1] for k, v in history.items() if k != "step" and v}
    session.record(stage, steps=steps, time_s=round(total_s, 1), final_losses=final, device=str(session.device))
    return history, ema


def plot_losses(history: dict[str, list[float]], path: Path, *, title: str) -> None:
    """Loss curves (log scale) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = history.get("step", [])
    for name, values in history.items():
        if name != "step" and values:
            ax.plot(steps[: len(values)], values, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
