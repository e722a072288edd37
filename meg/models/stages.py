"""The training stages of meg-tiny: data → vae → text → teacher → distill → small → decoder → judge.

Each stage reads what earlier stages wrote to the model folder, trains with `run_loop`
and writes its component there as a diffusers/transformers folder (fp16 safetensors).

- data: scenes + paraphrased captions (token ids, attribute labels), evaluation prompts.
- vae: AutoencoderKL on rendered scenes (MSE + L1 + tiny KL); sets `scaling_factor`.
- text: the CLIP text encoder learns to predict what a caption mentions (colour–shape,
  colour–place, shape–place, size and background pairs) from its token states.
- teacher: ε-prediction UNet on cached latents, 10% empty prompts (CFG), EMA weights.
- distill: consistency distillation on precomputed teacher PF-ODE trajectories (DDIM,
  CFG, on the 50-point LCM grid): the student maps any trajectory point to the
  trajectory's end, through LCM's boundary parameterisation and with CFG at the
  student's guidance scale inside the loss, so `LCMScheduler` sampling at 1/2/4/8 steps
  follows the teacher. An auxiliary term keeps the unconditional branch at the teacher's.
- small: the same distillation into the device UNet, from scratch.
- decoder: the merge-aware decoder (MEG §1 offline distillation): latents go through
  `meg.codecs.merge` merge → analog noise → unmerge; target: the stock decoder's image of
  the clean latent.
- judge: the feature network of the judge's distribution distance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meg.models import judge as judge_lib
from meg.models.captions import PromptSpec, caption_scene
from meg.models.family import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from meg.models.training import CAPTION_STYLES, Session, check_decoder_loss, ema_state, run_loop
from meg.models.world import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scenes,
    WorldConfig,
    render,
    sample_scenes,
)

__all__ = ["DISTILL_TARGETS", "INDEPENDENT_SETS", "PROMPT_SETS", "STAGES", "caption_labels", "continue_decoder", "distil_decoder_paper", "continue_distill", "continue_teacher", "run_stage", "write_prompt_files"]

_COLOURS = list(OBJECT_COLOURS)
_BG = list(BACKGROUND_COLOURS)
# Offsets of the label groups in `caption_labels`.
_GROUPS = {
    "colour_shape": len(_COLOURS) * len(SHAPES),
    "colour_place": len(_COLOURS) * len(POSITIONS),
    "shape_place": len(SHAPES) * len(POSITIONS),
    "colour_size": len(_COLOURS) * len(SIZES),
    "shape_size": len(SHAPES) * len(SIZES),
    "texture": len(TEXTURES),
    "bg": len(_BG),
}
N_LABELS = sum(_GROUPS.values())


def caption_labels(spec: PromptSpec) -> np.ndarray:
    """Multi-hot [N_LABELS] of the attribute pairs a caption mentions (text-stage targets)."""
    out = np.zeros(N_LABELS, np.uint8)
    base = dict(zip(_GROUPS, np.cumsum([0, *_GROUPS.values()])[:-1], strict=True))
    for o in spec.objects:
        c = _COLOURS.index(o.colour) if o.colour else None
        s = SHAPES.index(o.shape) if o.shape else None
        p = POSITIONS.index(o.position) if o.position else None
        z = SIZES.index(o.size) if o.size else None
        if c is not None and s is not None:
            out[base["colour_shape"] + c * len(SHAPES) + s] = 1
        if c is not None and p is not None:
            out[base["colour_place"] + c * len(POSITIONS) + p] = 1
        if s is not None and p is not None:
            out[base["shape_place"] + s * len(POSITIONS) + p] = 1
        if c is not None and z is not None:
            out[base["colour_size"] + c * len(SIZES) + z] = 1
        if s is not None and z is not None:
            out[base["shape_size"] + s * len(SIZES) + z] = 1
    if spec.texture:
        out[base["texture"] + TEXTURES.index(spec.texture)] = 1
    if spec.bg_colour:
        out[base["bg"] + _BG.index(spec.bg_colour)] = 1
    return out


# --------------------------------------------------------------------------- helpers


def _save(module: Any, path: Path) -> None:
    """save_pretrained in fp16 safetensors (halves the shipped size), module left unchanged."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.to(torch.float16)
    module.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
    module.to(torch.float32)
    module.load_state_dict(state)


def _data(session: Session) -> dict[str, Any]:
    """Scenes, caption token ids [N,K,L], labels [N,K,N_LABELS] (computed once per session)."""
    if "data" in session.cache:
        return session.cache["data"]
    path = session.stage_dir("data") / "dataset.safetensors"
    tensors = load_file(path) if path.exists() else None
    if tensors is None or int(tensors["n_objects"].shape[0]) != session.train.n_scenes:
        run_stage(session, "data")
        tensors = load_file(path)
    scenes = Scenes.from_dict({k: v for k, v in tensors.items() if k != "tokens"})
    labels_path = path.with_name("labels.safetensors")
    labels = load_file(labels_path)["labels"] if labels_path.exists() else None
    session.cache["data"] = {"scenes": scenes, "tokens": tensors["tokens"].long(), "labels": labels}
    return session.cache["data"]


def _empty_tokens(session: Session) -> torch.Tensor:
    tok = build_tokenizer(session.family)
    return tok([""], padding="max_length", max_length=session.family.max_tokens, return_tensors="pt").input_ids[0]


def _load_text(session: Session) -> Any:
    from transformers import CLIPTextModel

    model: Any = CLIPTextModel.from_pretrained(session.model_dir / "text_encoder", torch_dtype=torch.float32)
    return model.to(session.device)


def _load_vae(session: Session, folder: str = "vae") -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(session.model_dir / folder, torch_dtype=torch.float32).to(session.device)


def _load_unet(session: Session, folder: str) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(session.model_dir / folder, torch_dtype=torch.float32).to(session.device)


def _images(session: Session) -> torch.Tensor:
    """Every training scene rendered once: uint8 [N,3,H,W] on the CPU (computed once per session)."""
    if "images" not in session.cache:
        scenes: Scenes = _data(session)["scenes"]  # type: ignore[assignment]
        t0 = time.perf_counter()
        chunks = []
        for start in tqdm(range(0, len(scenes), 256), desc="render scenes", disable=not session.progress):
            images, _ = render(scenes.select(slice(start, start + 256)))
            chunks.append((images * 255).round().to(torch.uint8))
        session.cache["images"] = torch.cat(chunks)
        session.record("render", n=len(scenes), time_s=round(time.perf_counter() - t0, 2))
    return session.cache["images"]


def _pixels(session: Session, images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [-1, 1] on the session's device."""
    return images.to(session.device).float() / 127.5 - 1


def _random_crops(x: torch.Tensor, side: int, gen: torch.Generator, *, align: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One random side×side crop per item of x [B,C,H,W] (corners on multiples of `align`): crops, corners [B,2]."""
    b, _, h, w = x.shape
    corners = torch.stack(
        [torch.randint(0, (h - side) // align + 1, (b,), generator=gen), torch.randint(0, (w - side) // align + 1, (b,), generator=gen)], dim=1
    ) * align
    return torch.stack([x[i, :, y : y + side, c : c + side] for i, (y, c) in enumerate(corners.tolist())]), corners


def _object_crops(images: torch.Tensor, scenes: Scenes, side: int, p_object: float, gen: torch.Generator) -> torch.Tensor:
    """side×side crops of images [B,3,H,W]; with probability `p_object` a crop holds one of
    the scene's objects (picked at random, jittered by up to side/4), else it is uniform.

    Objects cover a few percent of a scene: uniform crops would rarely show the colours and
    shapes the autoencoder must get right.
    """
    b, _, h, w = images.shape
    out = []
    for i in range(b):
        n = int(scenes.n_objects[i])
        if float(torch.rand((), generator=gen)) < p_object:
            j = int(torch.randint(0, n, (), generator=gen))
            jitter = (torch.rand(2, generator=gen) - 0.5) * (side / 2)
            y = int(float(scenes.cy_px[i, j]) - side / 2 + float(jitter[0]))
            x = int(float(scenes.cx_px[i, j]) - side / 2 + float(jitter[1]))
        else:
            y = int(torch.randint(0, h - side + 1, (), generator=gen))
            x = int(torch.randint(0, w - side + 1, (), generator=gen))
        y, x = min(max(y, 0), h - side), min(max(x, 0), w - side)
        out.append(images[i, :, y : y + side, x : x + side])
    return torch.stack(out)


def _object_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight 1 + weight·[saturated pixel] for images x in [-1, 1] ([B,1,H,W]).

    Object colours are saturated and backgrounds are not (`meg.models.world`), so this
    up-weights object pixels without needing their masks (the judge's saturation threshold).
    """
    rgb = (x + 1) / 2
    hi, lo = rgb.amax(dim=1, keepdim=True), rgb.amin(dim=1, keepdim=True)
    saturation = (hi - lo) / hi.clamp(min=1e-3)
    return 1 + weight * (saturation > judge_lib.DetectorConfig.min_saturation).float()


def _latents(session: Session) -> torch.Tensor:
    """Scaled posterior means of every training scene, [N,4,h,w] on the device."""
    if "latents" not in session.cache:
        images = _images(session)
        vae = _load_vae(session)
        chunks = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for start in tqdm(range(0, len(images), 256), desc="encode latents", disable=not session.progress):
                x = _pixels(session, images[start : start + 256])
                chunks.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        session.cache["latents"] = torch.cat(chunks)
        session.record("latents", n=len(images), time_s=round(time.perf_counter() - t0, 2))
    return session.cache["latents"]


def _alphas(session: Session) -> torch.Tensor:
    return build_scheduler("teacher", session.family).alphas_cumprod.to(session.device)


def _pick_tokens(data: dict[str, Any], idx: torch.Tensor, gen: torch.Generator, empty: torch.Tensor, dropout: float) -> torch.Tensor:
    tokens: torch.Tensor = data["tokens"]  # type: ignore[assignment]
    k = torch.randint(0, tokens.shape[1], (len(idx),), generator=gen)
    out = tokens[idx, k].clone()
    if dropout > 0:
        drop = torch.rand(len(idx), generator=gen) < dropout
        out[drop] = empty
    return out


# --------------------------------------------------------------------------- stages


def stage_data(session: Session) -> None:
    t0 = time.perf_counter()
    cfg = session.train
    tok = build_tokenizer(session.family)
    scenes = sample_scenes(cfg.n_scenes, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    texts, labels = [], []
    for i in tqdm(range(len(scenes)), desc="captions", disable=not session.progress):
        for _ in range(cfg.captions_per_scene):
            text, spec = caption_scene(scenes, i, rng)
            texts.append(text)
            labels.append(caption_labels(spec))
    ids = tok(texts, padding="max_length", max_length=session.family.max_tokens, truncation=True, return_tensors="pt").input_ids
    tensors = scenes.to_dict()
    tensors["tokens"] = ids.view(len(scenes), cfg.captions_per_scene, -1).to(torch.int16)
    folder = session.stage_dir("data")
    save_file(tensors, folder / "dataset.safetensors")
    # labels are only read by the text stage: a separate file keeps the dataset small
    save_file({"labels": torch.from_numpy(np.stack(labels)).view(len(scenes), cfg.captions_per_scene, -1)}, folder / "labels.safetensors")
    (folder / "captions_sample.txt").write_text("\n".join(texts[:200]) + "\n")
    write_prompt_files(session)
    tok.save_pretrained(session.model_dir / "tokenizer")
    _preview(scenes.select(slice(0, 16)), texts[:: cfg.captions_per_scene][:16], folder / "preview.png")
    for key in ("data", "images", "latents"):
        session.cache.pop(key, None)
    session.record("data", n_scenes=cfg.n_scenes, captions=len(texts), vocabulary=len(tok), time_s=round(time.perf_counter() - t0, 1))


PROMPT_SETS = {"heldout": (True, 101), "indist": (False, 202), "val": (True, 303)}
"""Evaluation prompt files: name → (held-out colour–shape pairs?, seed offset). "val" is
for choosing inference settings (guidance scales); results are reported on the others."""

INDEPENDENT_SETS = {"independent": 4242, "independent_val": 4343}
"""Prompt sets of the independent writer (`meg.models.prompt_writer`): name → seed (fixed,
not offset by the training seed, so every family is measured on the same prompts).
"independent_val" is for choosing settings; results are reported on "independent"."""


def write_prompt_files(session: Session) -> None:
    """model_dir/prompts/{heldout,indist,val}.txt, `n_eval_prompts` captions each, and the
    independent writer's {independent,independent_val}.jsonl (prompts with ground truth)."""
    from meg.models.prompt_writer import save_prompt_set, write_prompt_set

    cfg = session.train
    prompts = session.model_dir / "prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    for name, (heldout, offset) in PROMPT_SETS.items():
        ev = sample_scenes(cfg.n_eval_prompts, cfg.seed + offset, WorldConfig(heldout=heldout))
        ev_rng = np.random.default_rng(cfg.seed + offset)
        lines = [caption_scene(ev, i, ev_rng)[0] for i in range(len(ev))]
        (prompts / f"{name}.txt").write_text("\n".join(lines) + "\n")
    for name, seed in INDEPENDENT_SETS.items():
        save_prompt_set(write_prompt_set(cfg.n_eval_prompts, seed), prompts / f"{name}.jsonl")


def _preview(scenes: Scenes, captions: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, _ = render(scenes)
    n = len(scenes)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(2.2 * ((n + 1) // 2), 5))
    for ax, img, cap in zip(np.ravel(axes), images, captions, strict=False):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title("\n".join(cap[i : i + 28] for i in range(0, min(len(cap), 84), 28)), fontsize=5)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def stage_vae(session: Session) -> None:
    cfg = session.train
    torch.manual_seed(cfg.seed)
    images = _images(session)
    scenes: Scenes = _data(session)["scenes"]  # type: ignore[assignment]
    vae = build_vae(session.family).to(session.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = _pixels(session, _object_crops(images[idx], scenes.select(idx), cfg.vae_crop, cfg.vae_object_crops, gen))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(session.device)
        rec = vae.decode(z).sample
        weight = _object_weight(x, cfg.vae_object_weight)
        return {
            "mse": (weight * (rec - x) ** 2).mean() / weight.mean(),
            "l1": 0.5 * (weight * (rec - x).abs()).mean() / weight.mean(),
            "kl": cfg.vae_kl_weight * posterior.kl().mean(),
        }

    run_loop(session, "vae", {"vae": vae}, opt, cfg.vae_steps, step)
    with torch.no_grad():
        std = float(vae.encode(_pixels(session, images[:256])).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    _save(vae, session.model_dir / "vae")
    session.cache.pop("latents", None)
    session.record("vae", latent_std=std, scaling_factor=1.0 / std, reconstruction_mse=_vae_mse(session, vae, images))


def _vae_mse(session: Session, vae: Any, images: torch.Tensor) -> float:
    """Reconstruction MSE (images in [0, 1]) of the last 64 full-size training images."""
    with torch.no_grad():
        x = _pixels(session, images[-64:])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float(F.mse_loss((rec + 1) / 2, (x + 1) / 2))


class _TextProbe(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2 * width, N_LABELS)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        real = (ids > 0).float()[..., None]
        mean = (hidden * real).sum(1) / real.sum(1).clamp(min=1)
        eos = hidden[torch.arange(len(ids)), (ids == eos_id).int().argmax(1)]
        return self.head(torch.cat([mean, eos], dim=1))


def stage_text(session: Session) -> None:
    cfg = session.train
    torch.manual_seed(cfg.seed)
    data = _data(session)
    tok = build_tokenizer(session.family)
    text = build_text_encoder(session.family, len(tok)).to(session.device)
    probe = _TextProbe(session.family.text_width).to(session.device)
    opt = torch.optim.AdamW([*text.parameters(), *probe.parameters()], lr=cfg.text_lr, weight_decay=0.01)
    labels: torch.Tensor = data["labels"]  # type: ignore[assignment]
    n = labels.shape[0]
    empty = _empty_tokens(session)

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (cfg.text_batch,), generator=gen)
        k = torch.randint(0, labels.shape[1], (cfg.text_batch,), generator=gen)
        ids = data["tokens"][idx, k].clone()  # type: ignore[index]
        y = labels[idx, k].float()
        drop = torch.rand(cfg.text_batch, generator=gen) < cfg.cond_dropout
        ids[drop], y[drop] = empty, 0.0
        ids, y = ids.to(session.device), y.to(session.device)
        hidden = text(ids).last_hidden_state
        return {"bce": F.binary_cross_entropy_with_logits(probe(hidden, ids, 2), y)}

    run_loop(session, "text", {"text": text, "probe": probe}, opt, cfg.text_steps, step)
    with torch.no_grad():
        ids = data["tokens"][-256:, 0].to(session.device)  # type: ignore[index]
        pred = probe(text(ids).last_hidden_state, ids, 2) > 0
        exact = float((pred == labels[-256:, 0].to(session.device).bool()).all(1).float().mean())
    _save(text, session.model_dir / "text_encoder")
    session.record("text", caption_exact_match=exact)


def _train_teacher(session: Session, stage: str, unet: Any, data: dict[str, Any], latents: torch.Tensor, *, steps: int, batch: int,
                   lr: float, text_lr: float, min_snr: float, coverage: torch.Tensor | None = None,
                   object_weight: float = 0.0) -> None:  # fmt: skip
    """ε-prediction training of `unet` on `latents` with captions data["tokens"] (CFG dropout,
    EMA weights), the text encoder fine-tuned at `text_lr` (0 freezes it); writes the
    EMA weights to model_dir/teacher_unet (and text_encoder when it trained).

    With `coverage` ([N,1,h,w], the fraction of each latent pixel covered by objects) and
    `object_weight` > 0, each latent pixel's squared error is weighted by
    1 + object_weight·coverage (normalised per item): objects cover a few percent of a
    scene, so the plain loss is dominated by the background.
    """
    cfg = session.train
    text = _load_text(session)
    alphas = _alphas(session)
    empty = _empty_tokens(session)
    train_text = text_lr > 0
    groups = [{"params": unet.parameters(), "lr": lr}]
    if train_text:
        groups.append({"params": text.parameters(), "lr": text_lr})
    else:
        text.requires_grad_(False).eval()
    opt = torch.optim.AdamW(groups, weight_decay=0.01)

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        ids = _pick_tokens(data, idx, gen, empty, cfg.cond_dropout).to(session.device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(session.device)
        noise = torch.randn((batch, *latents.shape[1:]), generator=gen).to(session.device)
        x0 = latents[idx.to(session.device)]
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.set_grad_enabled(train_text):
            cond = text(ids).last_hidden_state
        pred = unet(xt, t, cond).sample
        if coverage is not None and object_weight > 0:
            weight = 1 + object_weight * coverage[idx.to(coverage.device)].to(session.device)
            per_item = ((pred - noise) ** 2 * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3))
        else:
            per_item = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        if min_snr > 0:
            snr = a.flatten() / (1 - a.flatten())
            per_item = per_item * snr.clamp(max=min_snr) / snr
        return {"eps_mse": per_item.mean()}

    modules = {"unet": unet, "text": text} if train_text else {"unet": unet}
    _, ema = run_loop(session, stage, modules, opt, steps, step, ema_decay=cfg.ema_decay)
    assert ema is not None
    for name, module in modules.items():
        module.load_state_dict(ema_state(ema, name))
    _save(unet, session.model_dir / "teacher_unet")
    if train_text:
        _save(text, session.model_dir / "text_encoder")


def stage_teacher(session: Session) -> None:
    cfg = session.train
    torch.manual_seed(cfg.seed)
    _train_teacher(session, "teacher", build_unet(session.family).to(session.device), _data(session), _latents(session),
                   steps=cfg.teacher_steps, batch=cfg.teacher_batch, lr=cfg.teacher_lr, text_lr=cfg.teacher_text_lr,
                   min_snr=cfg.teacher_min_snr)  # fmt: skip
    build_scheduler("teacher", session.family).save_pretrained(session.model_dir / "teacher_scheduler")
    _write_index(session)


def _write_index(session: Session) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "LCMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (session.model_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------ distillation


def lcm_boundary(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's (c_skip, c_out) for integer timesteps t: [B] → two [B,1,1,1]."""
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def lcm_grid(session: Session) -> torch.Tensor:
    """The teacher ODE grid [999, 979, ..., 19] (LCM's original 50-step schedule)."""
    n = session.family.lcm_origin_steps
    step = 1000 // n
    return torch.arange(n, 0, -1) * step - 1


def _trajectories(session: Session, record_as: str = "trajectories") -> dict[str, torch.Tensor]:
    """Teacher DDIM+CFG trajectories on the LCM grid: points [G,T,4,h,w] fp16, ends, token ids
    (computed once per session; their time is recorded under `record_as`)."""
    if "trajectories" in session.cache:
        return session.cache["trajectories"]
    cfg = session.train
    data = _data(session)
    teacher = _load_unet(session, "teacher_unet")
    text = _load_text(session)
    alphas = _alphas(session)
    grid = lcm_grid(session).to(session.device)
    empty = _empty_tokens(session).to(session.device)
    w = session.family.teacher_guidance
    n_scenes = data["tokens"].shape[0]  # type: ignore[union-attr]
    t0 = time.perf_counter()
    points, ends, all_ids = [], [], []
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    h = session.family.latent_size
    with torch.no_grad():
        for start in tqdm(range(0, cfg.n_trajectories, cfg.trajectory_batch), desc="teacher trajectories", disable=not session.progress):
            b = min(cfg.trajectory_batch, cfg.n_trajectories - start)
            idx = torch.randint(0, n_scenes, (b,), generator=gen)
            ids = _pick_tokens(data, idx, gen, empty.cpu(), 0.0).to(session.device)
            cond = text(ids).last_hidden_state
            uncond = text(empty[None].expand(b, -1)).last_hidden_state
            embeds = torch.cat([uncond, cond])
            x = torch.randn((b, 4, h, h), generator=gen).to(session.device)
            traj = []
            x0 = x
            for j, t in enumerate(grid):
                traj.append(x.half())
                eps_u, eps_c = teacher(torch.cat([x, x]), t.expand(2 * b), embeds).sample.chunk(2)
                eps = eps_u + w * (eps_c - eps_u)
                a = alphas[t]
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                a_next = alphas[grid[j + 1]] if j + 1 < len(grid) else torch.ones((), device=session.device)
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
            points.append(torch.stack(traj, dim=1))
            ends.append(x0.float())
            all_ids.append(ids)
    out = {"points": torch.cat(points), "ends": torch.cat(ends), "ids": torch.cat(all_ids), "grid": grid}
    session.cache["trajectories"] = out
    session.record(record_as, n=cfg.n_trajectories, time_s=round(time.perf_counter() - t0, 2))
    return out


def _student_timesteps(session: Session) -> torch.Tensor:
    sched = build_scheduler("student", session.family)
    ts: set[int] = set()
    for n in (1, 2, 4, 8):
        sched.set_timesteps(n)
        ts |= {int(t) for t in sched.timesteps}
    return torch.tensor(sorted(ts, reverse=True))


def _distill(session: Session, stage: str, student: Any, lr: float, steps: int) -> None:
    cfg = session.train
    traj = _trajectories(session)
    teacher = _load_unet(session, "teacher_unet")
    text = _load_text(session)
    alphas = _alphas(session)
    grid = traj["grid"].cpu()
    focus = torch.tensor([int((grid == t).nonzero()[0, 0]) for t in _student_timesteps(session)])
    empty = _empty_tokens(session).to(session.device)
    w = session.family.student_guidance
    with torch.no_grad():
        uncond_embed = text(empty[None]).last_hidden_state
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    n = traj["ends"].shape[0]

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        b = cfg.distill_batch
        idx = torch.randint(0, n, (b,), generator=gen)
        # half the batch on the timesteps the 1/2/4/8-step samplers visit, half anywhere on the grid
        on_focus = torch.rand(b, generator=gen) < 0.5
        j = torch.where(on_focus, focus[torch.randint(0, len(focus), (b,), generator=gen)], torch.randint(0, len(grid), (b,), generator=gen))
        d_idx, d_j = idx.to(session.device), j.to(session.device)
        xt = traj["points"][d_idx, d_j].float()
        t = traj["grid"][d_j]
        target = traj["ends"][d_idx]
        with torch.no_grad():
            cond = text(traj["ids"][d_idx]).last_hidden_state
            eps_u_teacher = teacher(xt, t, uncond_embed.expand(b, -1, -1)).sample
        embeds = torch.cat([uncond_embed.expand(b, -1, -1), cond])
        eps_u, eps_c = student(torch.cat([xt, xt]), torch.cat([t, t]), embeds).sample.chunk(2)
        eps = eps_u + w * (eps_c - eps_u)
        a = alphas[t][:, None, None, None]
        x0 = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = lcm_boundary(t)
        denoised = c_out * x0 + c_skip * xt
        return {
            "consistency_mse": F.mse_loss(denoised, target),
            "uncond_mse": cfg.distill_uncond_weight * F.mse_loss(eps_u, eps_u_teacher),
        }

    _, ema = run_loop(session, stage, {"unet": student}, opt, steps, step, ema_decay=cfg.ema_decay)
    assert ema is not None
    student.load_state_dict(ema_state(ema, "unet"))


def stage_distill(session: Session) -> None:
    torch.manual_seed(session.train.seed)
    student = _load_unet(session, "teacher_unet")
    _distill(session, "distill", student, session.train.distill_lr, session.train.distill_steps)
    _save(student, session.model_dir / "unet")
    build_scheduler("student", session.family).save_pretrained(session.model_dir / "scheduler")
    _write_index(session)


def stage_small(session: Session) -> None:
    torch.manual_seed(session.train.seed)
    small = build_unet(session.family, small=True).to(session.device)
    _distill(session, "small", small, session.train.small_lr, session.train.small_steps)
    _save(small, session.model_dir / "small_unet")


def _train_decoder(session: Session, stage: str, vae: Any, pool: torch.Tensor, *, steps: int, batch: int, crop: int, lr: float, loss: str) -> None:
    """Fine-tune vae's decoder on `pool` latents passed through the served feature path
    (`meg.split.features.merge_noise_unmerge`: merge at ratio U(0, decoder_max_ratio), the
    analog link at σ U(decoder_sigma), unmerge); target: the stock decoder's image of the
    clean latent. Writes model_dir/vae_merge."""
    from meg.split.features import merge_noise_unmerge

    cfg = session.train
    stock = _load_vae(session)
    sf = float(vae.config.scaling_factor)
    lo, hi = cfg.decoder_sigma
    relative = loss == "relative"

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        z = pool[torch.randint(0, len(pool), (batch,), generator=gen).to(session.device)]
        sigma = lo + (hi - lo) * torch.rand(batch, generator=gen)
        ratio = float(torch.rand((), generator=gen)) * cfg.decoder_max_ratio
        with torch.no_grad():
            # merge + noise + unmerge act on the whole latent; the decoders see the same crop of both
            noisy = merge_noise_unmerge(z, ratio, sigma, generator=gen)
            both, _ = _random_crops(torch.cat([z, noisy], dim=1), crop // 8, gen)
            z, noisy = both[:, :4], both[:, 4:]
            target = (stock.decode(z / sf).sample.clamp(-1, 1) + 1) / 2
            if relative:
                baseline = ((stock.decode(noisy / sf).sample.clamp(-1, 1) + 1) / 2 - target).pow(2).mean(dim=(1, 2, 3))
        image = (vae.decode(noisy / sf).sample + 1) / 2
        if not relative:
            return {"image_mse": F.mse_loss(image, target)}
        return {"relative_mse": ((image - target).pow(2).mean(dim=(1, 2, 3)) / baseline.clamp(min=1e-8)).mean()}

    _fit_decoder(session, stage, vae, lr=lr, steps=steps, step=step, out="vae_merge")


def _fit_decoder(session: Session, stage: str, vae: Any, *, lr: float, steps: int,
                 step: Any, out: str) -> None:
    """Train VAE's decoder and post_quant_conv (encoder frozen) with AdamW at LR by `run_loop`
    on STEP, and write the VAE to model_dir/OUT."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], lr=lr)
    run_loop(session, stage, {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}, opt, steps, step)
    _save(vae, session.model_dir / out)


def stage_decoder(session: Session) -> None:
    cfg = session.train
    torch.manual_seed(cfg.seed)
    latents = _latents(session)
    ends = _trajectories(session)["ends"]
    pool = torch.cat([latents[: len(ends)], ends])
    _train_decoder(session, "decoder", _load_vae(session), pool, steps=cfg.decoder_steps, batch=cfg.decoder_batch,
                   crop=cfg.decoder_crop, lr=cfg.decoder_lr, loss=cfg.decoder_loss)  # fmt: skip


def _fresh_latents(session: Session, n: int, seed: int) -> tuple[Scenes, torch.Tensor, torch.Tensor]:
    """`n` fresh training-distribution scenes (seeded), their scaled posterior means, and the
    fraction of each latent pixel covered by objects [n,1,h,w] (float16, CPU)."""
    scenes = sample_scenes(n, seed)
    vae = _load_vae(session)
    chunks, covers = [], []
    factor = session.family.image_size // session.family.latent_size
    with torch.no_grad():
        for start in tqdm(range(0, n, 256), desc="encode scenes", disable=not session.progress):
            images, masks = render(scenes.select(slice(start, start + 256)), device=session.device)
            chunks.append(vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
            covers.append(F.avg_pool2d(masks.any(dim=1, keepdim=True).float(), factor).half().cpu())
    return scenes, torch.cat(chunks), torch.cat(covers)


def continue_decoder(session: Session, *, steps: int, batch: int, crop: int, lr: float, loss: str, pool: int) -> float:
    """Continue training the family's merge-aware decoder (model_dir/vae_merge) on the CPU-sized
    budget given, recorded under "decoder_continue" in training.json; returns the wall time.

    The pool: `pool` fresh training-distribution scenes, encoded (real latents), and the
    student's samples of their captions (the latents MEG's device decodes). The family's
    recorded training config (`session.train`) is left as it was; the continuation's own
    settings are recorded.
    """
    from meg.models.evaluate import student_latents

    check_decoder_loss(loss)
    t0 = time.perf_counter()
    cfg = session.train
    torch.manual_seed(cfg.seed)
    scenes, real, _ = _fresh_latents(session, pool, cfg.seed + 404)
    rng = np.random.default_rng(cfg.seed + 404)
    captions = [caption_scene(scenes, i, rng)[0] for i in range(pool)]
    sampled = student_latents(str(session.model_dir.resolve()), captions, seed=cfg.seed + 404, device=session.device)
    latents = torch.cat([real, sampled.to(session.device)])
    _train_decoder(session, "decoder_continue", _load_vae(session, "vae_merge"), latents, steps=steps, batch=batch, crop=crop, lr=lr, loss=loss)
    elapsed = time.perf_counter() - t0
    session.record("decoder_continue", batch=batch, crop=crop, lr=lr, loss=loss, pool=2 * pool, wall_s=round(elapsed, 1))
    return elapsed


def _reference_pool(session: Session, *, prompts: int, step_range: tuple[int, int], reference_steps: int,
                    tome_ratio: float, seed: int) -> dict[str, torch.Tensor]:
    """Edge latents of `prompts` fresh training-distribution captions at every step count in
    `step_range` and at `reference_steps`, each prompt from one seed (the served edge path:
    `SplitEngine.run_edge` at the decoder split, ToMe at `tome_ratio`). Cached in the stage's
    work folder. Returns {"latents": [P, S, 4, h, w] fp16 for steps lo..hi, "reference": [P, 4, h, w]}."""
    from meg.split import GenerationInputs, SplitEngine, SplitPoint, load_pipeline

    lo, hi = step_range
    path = session.stage_dir("decoder_paper") / f"pool-{prompts}-{lo}-{hi}-{reference_steps}-{tome_ratio:g}-{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    scenes = sample_scenes(prompts, seed)
    rng = np.random.default_rng(seed)
    captions = [caption_scene(scenes, i, rng)[0] for i in range(prompts)]
    engine = SplitEngine(load_pipeline(str(session.model_dir.resolve())))
    split = SplitPoint.parse("decoder")
    size = session.family.image_size
    guidance = session.family.student_guidance
    latents, references = [], []
    with torch.inference_mode():
        for i, caption in enumerate(tqdm(captions, desc="edge latents", disable=not session.progress)):
            def run(steps: int, caption: str = caption, i: int = i) -> torch.Tensor:
                inputs = GenerationInputs(prompt=caption, seed=seed + i, height=size, width=size, steps=steps, guidance_scale=guidance)
                return engine.run_edge(inputs, split, tome_ratio=tome_ratio)["latents"][0].half()

            latents.append(torch.stack([run(n) for n in range(lo, hi + 1)]))
            references.append(run(reference_steps))
    pool = {"latents": torch.stack(latents), "reference": torch.stack(references)}
    torch.save(pool, path)
    return pool


def distil_decoder_paper(session: Session, *, steps: int, batch: int, crop: int, lr: float, prompts: int,
                         step_range: tuple[int, int] = (4, 11), reference_steps: int = 12, ratio_high: float = 1.0,
                         sigma: tuple[float, float] = (0.05, 0.32), tome_ratio: float = 0.5, seed: int = 909,
                         init: str = "vae", out: str = "vae_merge_paper") -> float:  # fmt: skip
    """MEG's offline decoder distillation as the paper does it (PAPERS.md §1): per sample a
    step count L ~ U{step_range}, merge ratio ~ U(0, ratio_high) clipped to the merge's 0.75,
    channel noise σ ~ U(sigma) on the merged tokens; input: the L-step edge latent through the
    served feature path (`merge_noise_unmerge`); target: the stock decoder's image of the same
    prompt's `reference_steps`-step latent. AdamW at `lr` with linear warm-up and cosine decay,
    from the `init` folder's decoder; writes model_dir/`out`; recorded under "decoder_paper"
    (or `out`) in training.json. `ratio_high=0` trains on noise alone (no merging). Returns the
    wall time."""
    from meg.codecs.merge import MAX_MERGE_RATIO
    from meg.split.features import merge_noise_unmerge

    t0 = time.perf_counter()
    torch.manual_seed(session.train.seed)
    pool = _reference_pool(session, prompts=prompts, step_range=step_range, reference_steps=reference_steps,
                           tome_ratio=tome_ratio, seed=session.train.seed + seed)  # fmt: skip
    latents, reference = pool["latents"].to(session.device), pool["reference"].to(session.device)
    stock = _load_vae(session)
    vae = _load_vae(session, init)
    sf = float(vae.config.scaling_factor)
    lo_sigma, hi_sigma = sigma
    n_steps = latents.shape[1]

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        which = torch.randint(0, n_steps, (batch,), generator=gen)
        ratios = (torch.rand(batch, generator=gen) * ratio_high).clamp(max=MAX_MERGE_RATIO)
        sigmas = lo_sigma + (hi_sigma - lo_sigma) * torch.rand(batch, generator=gen)
        with torch.no_grad():
            z = latents[idx.to(session.device), which.to(session.device)].float()
            noisy = merge_noise_unmerge(z, ratios, sigmas, generator=gen)
            both, _ = _random_crops(torch.cat([reference[idx.to(session.device)].float(), noisy], dim=1), crop // 8, gen)
            target = (stock.decode(both[:, :4] / sf).sample.clamp(-1, 1) + 1) / 2
        image = (vae.decode(both[:, 4:] / sf).sample + 1) / 2
        return {"image_mse": F.mse_loss(image, target)}

    _fit_decoder(session, out, vae, lr=lr, steps=steps, step=step, out=out)
    elapsed = time.perf_counter() - t0
    session.record(out, batch=batch, crop=crop, lr=lr, prompts=prompts, step_range=list(step_range), reference_steps=reference_steps,
                   ratio_high=ratio_high, sigma=list(sigma), tome_ratio=tome_ratio, seed=seed, init=init, wall_s=round(elapsed, 1))  # fmt: skip
    return elapsed


def continue_teacher(session: Session, *, steps: int, batch: int, lr: float, min_snr: float, scenes: int, captions: str = "templates",
                     captions_per_scene: int | None = None, object_weight: float = 0.0, scene_seed: int = 505) -> float:  # fmt: skip
    """Continue training the family's teacher (model_dir/teacher_unet, text encoder frozen) on
    `scenes` fresh training-distribution scenes (seed `train.seed + scene_seed`) with
    `captions_per_scene` captions each (default: the training config's) in `captions` style, loss
    weighted towards objects by `object_weight`; recorded under "teacher_continue"; returns
    the wall time. The recorded training config is left as it was."""
    from transformers import PreTrainedTokenizerFast

    from meg.models.paraphrase import paraphrase_scene

    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions must be one of {', '.join(map(repr, CAPTION_STYLES))}, got {captions!r}")
    if object_weight < 0:
        raise ValueError(f"object_weight must be >= 0, got {object_weight}")
    t0 = time.perf_counter()
    cfg = session.train
    per_scene = captions_per_scene or cfg.captions_per_scene
    torch.manual_seed(cfg.seed)
    fresh, latents, coverage = _fresh_latents(session, scenes, cfg.seed + scene_seed)
    rng = np.random.default_rng(cfg.seed + scene_seed)
    write = paraphrase_scene if captions == "augmented" else caption_scene
    texts = [write(fresh, i, rng)[0] for i in range(scenes) for _ in range(per_scene)]
    (session.stage_dir("teacher_continue") / "captions_sample.txt").write_text("\n".join(texts[:200]) + "\n")
    tok = PreTrainedTokenizerFast.from_pretrained(session.model_dir / "tokenizer")  # the family's own vocabulary
    ids = tok(texts, padding="max_length", max_length=session.family.max_tokens, truncation=True, return_tensors="pt").input_ids
    data = {"tokens": ids.view(scenes, per_scene, -1)}
    _train_teacher(session, "teacher_continue", _load_unet(session, "teacher_unet"), data, latents, steps=steps, batch=batch, lr=lr,
                   text_lr=0.0, min_snr=min_snr, coverage=coverage, object_weight=object_weight)  # fmt: skip
    elapsed = time.perf_counter() - t0
    session.record("teacher_continue", batch=batch, lr=lr, min_snr=min_snr, scenes=scenes, captions=captions,
                   captions_per_scene=per_scene, object_weight=object_weight, scene_seed=scene_seed, wall_s=round(elapsed, 1))  # fmt: skip
    return elapsed


DISTILL_TARGETS = {"unet": "distill", "small_unet": "small"}
"""Student folders `continue_distill` can continue, and the stage that first trained each."""


def continue_distill(session: Session, *, targets: tuple[str, ...], steps: int, batch: int, lr: float, trajectories: int,
                     captions: str = "augmented", scene_seed: int = 707) -> float:  # fmt: skip
    """Continue distilling the family's students (`targets`: "unet", "small_unet") from its
    current teacher, on `trajectories` fresh teacher PF-ODE trajectories (DDIM + CFG on the
    LCM grid) of captions in `captions` style of fresh scenes (seed `train.seed + scene_seed`);
    each target trains `steps` steps from its shipped weights and is recorded under
    "{stage}_continue" (distill_continue, small_continue); returns the wall time.

    Both targets share one set of trajectories, so the teacher runs once. The recorded
    training config is left as it was.
    """
    from dataclasses import replace

    from transformers import PreTrainedTokenizerFast

    from meg.models.paraphrase import paraphrase_scene

    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions must be one of {', '.join(map(repr, CAPTION_STYLES))}, got {captions!r}")
    unknown = [t for t in targets if t not in DISTILL_TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets must be among {', '.join(map(repr, DISTILL_TARGETS))}, got {targets!r}")
    t0 = time.perf_counter()
    cfg = session.train
    torch.manual_seed(cfg.seed)
    # the trajectories only need captions: one per fresh scene
    fresh = sample_scenes(trajectories, cfg.seed + scene_seed)
    rng = np.random.default_rng(cfg.seed + scene_seed)
    write = paraphrase_scene if captions == "augmented" else caption_scene
    texts = [write(fresh, i, rng)[0] for i in range(trajectories)]
    tok = PreTrainedTokenizerFast.from_pretrained(session.model_dir / "tokenizer")
    ids = tok(texts, padding="max_length", max_length=session.family.max_tokens, truncation=True, return_tensors="pt").input_ids
    session.cache["data"] = {"tokens": ids[:, None]}
    session.cache.pop("trajectories", None)
    session.train = replace(cfg, n_trajectories=trajectories, trajectory_batch=min(cfg.trajectory_batch, 64), distill_batch=batch)
    try:
        _trajectories(session, record_as="trajectories_continue")
        for target in targets:
            stage = f"{DISTILL_TARGETS[target]}_continue"
            t_stage = time.perf_counter()
            student = _load_unet(session, target)
            _distill(session, stage, student, lr, steps)
            _save(student, session.model_dir / target)
            session.record(stage, batch=batch, lr=lr, trajectories=trajectories, captions=captions, scene_seed=scene_seed,
                           wall_s=round(time.perf_counter() - t_stage, 1))  # fmt: skip
    finally:
        session.train = cfg
        session.cache.pop("data", None)
        session.cache.pop("trajectories", None)
    return time.perf_counter() - t0


def stage_judge(session: Session) -> None:
    cfg = session.train
    torch.manual_seed(cfg.seed)
    scenes: Scenes = _data(session)["scenes"]  # type: ignore[assignment]
    images = _images(session)
    net = judge_lib.FeatureNet().to(session.device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.judge_lr, weight_decay=0.01)

    def step(i: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, len(scenes), (cfg.judge_batch,), generator=gen)
        y = judge_lib.scene_targets(scenes.select(idx)).to(session.device)
        return {"bce": F.binary_cross_entropy_with_logits(net(images[idx].to(session.device).float() / 255), y)}

    run_loop(session, "judge", {"net": net}, opt, cfg.judge_steps, step)
    net.save(session.model_dir / "judge")


STAGES = {
    "data": stage_data,
    "vae": stage_vae,
    "text": stage_text,
    "teacher": stage_teacher,
    "distill": stage_distill,
    "small": stage_small,
    "decoder": stage_decoder,
    "judge": stage_judge,
}


def run_stage(session: Session, name: str) -> float:
    """Run one stage; returns its wall time in seconds."""
    t0 = time.perf_counter()
    STAGES[name](session)
    elapsed = time.perf_counter() - t0
    session.record(name, wall_s=round(elapsed, 1))
    return elapsed
