"""Refine strength for preview–refine (DiffusionX's noise-level predictor, PAPERS.md §3).

Profiling: for each prompt of a set with ground truth, the device previews it (the small
UNet, ``preview_steps``), the edge generates it from scratch (its UNet, ``refine_steps``),
and the edge refines the preview at every strength of a grid (img2img). The judge
(`meg.models.judge`) scores each image against the prompt; the per-request *oracle* is the
smallest strength whose refined fidelity reaches the from-scratch fidelity within
``tolerance`` (1.0 when none does).

The predictor maps what the device knows before it asks (the prompt's pooled text
embedding, the preview latent's per-channel mean and std) to a strength on the grid. It is
a seeded ridge regression on the oracle strength, rounded *up* to the grid (a too-low
strength costs quality, a too-high one only edge time), shipped as fp16 safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.flops import partition_flops

__all__ = [
    "StrengthPredictor",
    "StrengthProfileConfig",
    "features",
    "judge_fidelity",
    "measure_edits",
    "oracle_strength",
    "profile_strength",
]


@dataclass(frozen=True)
class StrengthProfileConfig:
    """How the strength profile is measured (defaults: meg-tiny's student and small UNet)."""

    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Strength grid; on a 4-step schedule each keeps 1, 2, 3, 4 steps (0.3 ≡ 0.25, 0.7 ≡ 0.5)."""
    refine_steps: int = 4
    """The edge's schedule (the few-step student's)."""
    preview_steps: int = 2
    tolerance: float = 0.05
    """Per-request fidelity the refine may lose against the edge's from-scratch image."""
    guidance_scale: float = 2.5
    seed: int = 0
    """Request i uses seed ``seed + i``."""


def features(engine: SplitEngine, inputs: GenerationInputs, preview_latent: torch.Tensor) -> np.ndarray:
    """Predictor input: the conditional prompt embedding mean-pooled over tokens [E], then the
    preview latent's per-channel mean and std [2C]; float32."""
    cond = engine.encode_text(replace(inputs, guidance_scale=1.0)).prompt_embeds[0]
    pooled = cond.mean(dim=0)
    lat = preview_latent[0].float()
    return torch.cat([pooled.float(), lat.mean(dim=(1, 2)), lat.std(dim=(1, 2))]).numpy().astype(np.float32)


def judge_fidelity(spec: Any, image: torch.Tensor) -> float:
    """The judge's fidelity of one [1, 3, H, W] image to ``spec`` (resized to the judge's 128 px)."""
    from meg.models.judge import IMAGE_SIZE, detect_objects, score_prompt

    if image.shape[-1] != IMAGE_SIZE:
        image = torch.nn.functional.interpolate(image, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
    return float(score_prompt(spec, detect_objects(image[0]))["fidelity"])


def oracle_strength(refine_fidelity: dict[float, float], scratch_fidelity: float, tolerance: float) -> float:
    """Smallest strength whose refined fidelity ≥ scratch − tolerance (the largest if none)."""
    for s in sorted(refine_fidelity):
        if refine_fidelity[s] >= scratch_fidelity - tolerance:
            return s
    return max(refine_fidelity)


@torch.no_grad()
def profile_strength(engine: SplitEngine, preview: SplitEngine, prompts: list[str], specs: list[Any],
                     config: StrengthProfileConfig = StrengthProfileConfig()) -> list[dict[str, Any]]:
    """One record per prompt: fidelities (preview, scratch, refine per strength), the oracle,
    the predictor features and the edge/device FLOPs of each path.

    ``engine``'s UNet is the edge's refiner; ``preview.device_unet`` the device's previewer."""
    from meg.split.points import SplitPoint

    def fidelity(spec: Any, latent: torch.Tensor) -> float:
        return judge_fidelity(spec, engine.decode(engine.vae, latent))

    size = engine.native_size_px
    records = []
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        base = GenerationInputs(prompt=prompt, seed=config.seed + i, height=size, width=size,
                                guidance_scale=config.guidance_scale, steps=config.refine_steps)
        small = replace(base, steps=config.preview_steps)
        preview_latent = preview.generate_latents(small, unet=preview.device_unet)
        scratch = engine.generate_latents(base)
        refine = {s: fidelity(spec, engine.run_img2img(base, preview_latent, s)) for s in config.strengths}
        scratch_fid = fidelity(spec, scratch)
        records.append({
            "prompt": prompt, "seed": base.seed,
            "preview_fidelity": fidelity(spec, preview_latent),
            "scratch_fidelity": scratch_fid,
            "refine_fidelity": {str(s): f for s, f in refine.items()},
            "oracle": oracle_strength(refine, scratch_fid, config.tolerance),
            "features": features(engine, base, preview_latent).tolist(),
        })
    flops = {
        "preview_device": partition_flops(preview, SplitPoint("device"), small).device_flops,  # text encode, steps, decode
        "scratch_edge": partition_flops(engine, SplitPoint("decoder"), base).edge_flops,
        "decode_device": partition_flops(engine, SplitPoint("decoder"), base).device_flops,
        **{f"refine_edge:{s}": partition_flops(engine, SplitPoint("decoder"),
                                            replace(base, steps=SplitEngine.img2img_steps(config.refine_steps, s))).edge_flops
           for s in config.strengths},
    }
    for r in records:
        r["flops"] = flops
    return records


@dataclass
class StrengthPredictor:
    """Ridge regression from `features` to the oracle strength, rounded up to ``grid``."""

    weight: np.ndarray
    """[F] float32."""
    bias: float
    mean: np.ndarray
    std: np.ndarray
    grid: tuple[float, ...]
    margin: float = 0.0
    """Added before rounding up (chosen on the training data; trades time for quality)."""

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, grid: tuple[float, ...], *, ridge: float = 1.0,
            margin: float = 0.0) -> StrengthPredictor:
        """Closed-form ridge fit on standardised features (deterministic: no seed needed)."""
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - mean) / std
        a = z.T @ z + ridge * np.eye(z.shape[1])
        w = np.linalg.solve(a, z.T @ (y - y.mean()))
        return cls(w.astype(np.float32), float(y.mean()), mean.astype(np.float32), std.astype(np.float32),
                   tuple(sorted(grid)), margin)

    def raw(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Strengths on the grid, [N]: the smallest grid value ≥ the regression + margin."""
        grid = np.asarray(self.grid)
        value = self.raw(np.atleast_2d(x)) + self.margin
        index = np.searchsorted(grid, value - 1e-9).clip(0, len(grid) - 1)
        return grid[index]  # type: ignore[no-any-return]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.from_numpy(np.asarray(v, np.float32)).half() for k, v in
                   (("weight", self.weight), ("mean", self.mean), ("std", self.std))}
        save_file(tensors, str(folder / "strength.safetensors"))
        (folder / "strength.json").write_text(json.dumps({"bias": self.bias, "grid": list(self.grid),
                                                          "margin": self.margin}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> StrengthPredictor:
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "strength.safetensors"))
        meta = json.loads((folder / "strength.json").read_text())
        return cls(tensors["weight"].float().numpy(), float(meta["bias"]), tensors["mean"].float().numpy(),
                   tensors["std"].float().numpy(), tuple(meta["grid"]), float(meta["margin"]))


def config_dict(config: StrengthProfileConfig) -> dict[str, Any]:
    return asdict(config)


def run_profile(model: str, prompt_set: Path, n: int, out: Path, config: StrengthProfileConfig = StrengthProfileConfig()) -> list[dict[str, Any]]:
    """Profile the first ``n`` prompts of ``prompt_set`` on family ``model``; write ``out`` (JSON)."""
    import time

    import meg.models  # noqa: F401  (registers the family as a model source)
    from meg.models.evaluate import read_prompt_set
    from meg.recipes.preview_refine import preview_engine
    from meg.split.loading import load_pipeline

    prompts, specs = read_prompt_set(prompt_set)
    pipeline = load_pipeline(model)
    engine = SplitEngine(pipeline)
    preview, previewer = preview_engine(pipeline, model)
    started = time.perf_counter()
    records = profile_strength(engine, preview, prompts[:n], specs[:n], config)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "previewer": previewer, "prompt_set": str(prompt_set), "n": len(records),
                               "config": config_dict(config), "wall_s": round(time.perf_counter() - started, 1),
                               "records": records}) + "\n")
    return records


def load_profile_records(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records) of a `run_profile` JSON."""
    data = json.loads(Path(path).read_text())
    return {k: v for k, v in data.items() if k != "records"}, data["records"]


def xy(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, F] and oracle strengths [N] of profile records."""
    return (np.asarray([r["features"] for r in records], np.float32), np.asarray([r["oracle"] for r in records], np.float64))


def refined_fidelity(records: list[dict[str, Any]], strengths: np.ndarray) -> np.ndarray:
    """Per record, the profiled refine fidelity at its strength."""
    return np.asarray([r["refine_fidelity"][str(float(s))] for r, s in zip(records, strengths, strict=True)])


def train_strength(records: list[dict[str, Any]], *, ridge: float = 10.0, margins: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
                   quality_slack: float = 0.01) -> StrengthPredictor:
    """Fit on ``records``; the margin is the smallest of ``margins`` whose mean refined fidelity
    on these records is within ``quality_slack`` of the mean from-scratch fidelity (else the
    largest). Deterministic (closed form)."""
    x, y = xy(records)
    grid = tuple(sorted(float(s) for s in records[0]["refine_fidelity"]))
    scratch = float(np.mean([r["scratch_fidelity"] for r in records]))
    fitted = StrengthPredictor.fit(x, y, grid, ridge=ridge)
    for margin in margins:
        fitted.margin = margin
        if refined_fidelity(records, fitted.predict(x)).mean() >= scratch - quality_slack:
            break
    return fitted


EDIT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
EDIT_SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
EDIT_PLACES = ("top left", "top right", "bottom left", "bottom right", "center")


def colour_edits(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, edited prompt) pairs from the caption words: one object, its colour
    changed ("a red circle at the top left" → "a blue circle at the top left")."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.choice(len(EDIT_COLOURS), size=2, replace=False)
        shape, place = EDIT_SHAPES[rng.integers(len(EDIT_SHAPES))], EDIT_PLACES[rng.integers(len(EDIT_PLACES))]
        pairs.append((f"a {EDIT_COLOURS[a]} {shape} at the {place}", f"a {EDIT_COLOURS[b]} {shape} at the {place}"))
    return pairs


@torch.no_grad()
def measure_edits(preview: SplitEngine, pairs: list[tuple[str, str]], strengths: tuple[float, ...], *,
                  steps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Edit rounds on the previewer: the edited prompt previewed from scratch vs re-noised
    from the previous round's preview at each strength. Per method: mean judge fidelity of
    the edited preview, mean absolute pixel change from the previous preview (layout
    consistency; lower is steadier) and denoising steps."""
    from meg.models.captions import parse_prompt

    size = preview.native_size_px
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, fid: float, change: float, n_steps: int) -> None:
        row = rows.setdefault(name, {"fidelity": [], "pixel_change": [], "steps": []})
        row["fidelity"].append(fid)
        row["pixel_change"].append(change)
        row["steps"].append(n_steps)

    for i, (before, after) in enumerate(pairs):
        first = GenerationInputs(prompt=before, seed=seed + i, steps=steps, height=size, width=size)
        edited = replace(first, prompt=after)
        spec = parse_prompt(after)
        previous = preview.generate_latents(first, unet=preview.device_unet)
        previous_image = preview.decode(preview.device_vae, previous)
        candidates = {"from scratch": (preview.generate_latents(edited, unet=preview.device_unet), steps)}
        for s in strengths:
            candidates[f"edit s={s}"] = (preview.run_img2img(edited, previous, s, unet=preview.device_unet),
                                         SplitEngine.img2img_steps(steps, s))
        for name, (latent, n_steps) in candidates.items():
            image = preview.decode(preview.device_vae, latent)
            fid = judge_fidelity(spec, image)
            add(name, fid, float((image - previous_image).abs().mean()), n_steps)
    return {name: {k: float(np.mean(v)) for k, v in row.items()} for name, row in rows.items()}
