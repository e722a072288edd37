"""`meg bench sr`: the Hybrid SR models and building blocks, measured on held-out scenes.

Every image is a held-out scene (colour–shape pairs never seen in training) with its
ground truth rendered at the target R̃ = 512 px. The low-resolution input at R = R̃/S is
what the family's generator decodes for that scene: the render at R through the VAE
(encode → merge-aware decoder), pixel-aligned with the ground truth; the latent the
partitioner ranks is the VAE's latent of the same render. Rows name the method, the scale
and the measure:

- `psnr_db`, `ssim` (whole image vs the ground truth), `shape_iou` (object pixels found by
  the judge's saturation threshold at R̃ vs the true masks) and `judge_shape_acc` (the
  judge's shape of each object, read on the image area-downsampled to 128 px).
- `fg_psnr_db`, `fg_ssim`: the same on the foreground cells (γ = 0.25) only.
- `gflops` per image (`edge_gflops` / `device_gflops` for hybrid).
- `iou` of the top-γ latent cells vs the cells holding objects, `object_recall` (share
  of object pixels inside the chosen cells), `pixel_iou`.
- `seam_ratio`: border vs near-border gradient (`meg.split.regions.seam_ratio`), also
  for the ground truth itself.
- `onnx_max_abs_diff`: ONNX Runtime vs torch on the light model.
- `bicubic_clean_input`: bicubic from the area-downsampled ground truth instead of the
  generator's image: the ceiling the decoder's error leaves to any upscaler.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from meg.split import regions
from meg.split.image_quality import psnr_db, ssim

__all__ = ["bench_sr", "psnr_db", "run_sr_bench", "ssim"]

TARGET_PX = 512
GRID = 4
MARGIN_LR_PX = 4
OBJECT_CELL_COVERAGE = 0.02
"""A cell "holds an object" when object pixels cover at least this share of it."""


def _object_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool: saturated pixels (the judge's object/background threshold)."""
    from meg.models.judge import DetectorConfig

    hi, lo = images.amax(dim=1), images.amin(dim=1)
    return (hi - lo) / hi.clamp(min=1e-3) > DetectorConfig.min_saturation


def _judge_shapes(images: torch.Tensor, scenes: Any) -> tuple[int, int]:
    """(objects whose colour the judge finds with the right shape, objects) at 128 px."""
    from meg.models.judge import detect_objects

    small = F.interpolate(images, size=(128, 128), mode="area")
    hit = total = 0
    for i in range(len(small)):
        found = {o.colour: o.shape for o in detect_objects(small[i])}
        for obj in scenes.objects(i):
            total += 1
            hit += found.get(obj["colour"]) == obj["shape"]
    return hit, total


class _Models:
    def __init__(self, model: str, steps: int | None) -> None:
        from diffusers import AutoencoderKL

        from meg.models.registry import model_dir
        from meg.models.sr import load_diffusion_sr, load_light_sr

        folder = model_dir(model)
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        decoder = folder / "vae_merge" if (folder / "vae_merge").exists() else folder / "vae"
        self.decoder = AutoencoderKL.from_pretrained(decoder).eval()
        self.light = {s: load_light_sr(folder, scale=s) for s in (2, 4)}
        self.diffusion = load_diffusion_sr(folder)
        self.steps = steps or self.diffusion.config.steps

    @torch.no_grad()
    def generator_view(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoded image in [0, 1], latent) of renders [B, 3, R, R]."""
        z = self.vae.encode(images * 2 - 1).latent_dist.mean
        return ((self.decoder.decode(z).sample + 1) / 2).clamp(0, 1), z * self.vae.config.scaling_factor


def _hybrid(models: _Models, lr: torch.Tensor, cells: list[int], scale: int, seed: int) -> torch.Tensor:
    light = models.light[scale]

    def fg(pixels: torch.Tensor, cell: int) -> torch.Tensor:
        return models.diffusion(pixels, scale, steps=models.steps, generator=torch.Generator().manual_seed(seed * 100 + cell))

    def bg(pixels: torch.Tensor, cell: int) -> torch.Tensor:
        with torch.no_grad():
            return light(pixels).clamp(0, 1)

    return regions.upscale_patches(lr, cells, scale, foreground=fg, background=bg, grid=GRID, margin=MARGIN_LR_PX)


def _patch_gflops(models: _Models, lr_px: int, cells: list[int], scale: int, kind: str) -> float:
    total = 0
    from meg.models.sr import light_sr_flops

    for p in regions.grid_patches(lr_px, lr_px, grid=GRID, margin=MARGIN_LR_PX):
        if p.cell in cells:
            if kind == "light":
                total += light_sr_flops(models.light[scale], p.padded.height, p.padded.width)
            else:
                total += models.diffusion.flops(p.padded.height, p.padded.width, scale, steps=models.steps)
    return total / 1e9


def run_sr_bench(*, model: str = "meg-tiny", n_images: int = 12, n_everywhere: int = 4, seed: int = 0, steps: int | None = None,
                 figures: Path | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Measure everything; returns {"rows": [...], "config": {...}}."""
    from meg.models.sr import light_sr_flops, upsample_bicubic
    from meg.models.sr_onnx import LightSROnnx, export_light_sr
    from meg.models.world import WorldConfig, render, sample_scenes

    models = _Models(model, steps)
    scenes = sample_scenes(n_images, 90_001 + seed, WorldConfig(heldout=True))
    hr, hr_masks = render(scenes, size=TARGET_PX)
    objects_hr = hr_masks.any(dim=1)
    rows: list[dict[str, Any]] = []

    def row(method: str, scale: int, measure: str, value: float, n: int) -> None:
        rows.append({"method": method, "scale": scale, "measure": measure, "value": round(float(value), 5), "n": n})

    figure_data: dict[str, Any] = {}
    for scale in (2, 4):
        lr_px = TARGET_PX // scale
        lr, latents = models.generator_view(render(scenes, size=lr_px)[0])
        light = models.light[scale]
        t0 = time.perf_counter()
        with torch.no_grad():
            out_light = light(lr).clamp(0, 1)
        outputs = {"bicubic": upsample_bicubic(lr, scale), "light": out_light}
        # the same upscaling of a clean input (the render area-downsampled): what the
        # generator's decoder costs before any SR runs
        clean = upsample_bicubic(F.interpolate(hr, scale_factor=1 / scale, mode="area"), scale)
        row("bicubic_clean_input", scale, "psnr_db", psnr_db(clean, hr), n_images)
        row("bicubic_clean_input", scale, "ssim", ssim(clean, hr), n_images)
        # ONNX Runtime equals torch
        with tempfile.TemporaryDirectory() as tmp:
            runner = LightSROnnx(export_light_sr(light, Path(tmp) / "light.onnx"))
            row("light", scale, "onnx_max_abs_diff", float((runner(lr[:2]) - light(lr[:2]).detach()).abs().max()), 2)
        # partition of the latent, and the hybrid at γ = 0.25
        part = regions.partition_latent(latents, grid=GRID, foreground_fraction=0.25)
        hybrid, diff_fg_patches, light_fg_patches, gt_fg_patches = [], [], [], []
        for i in range(n_images):
            cells = part.foreground_cells(i)
            hybrid.append(_hybrid(models, lr[i : i + 1], cells, scale, seed=i))
            for p in regions.grid_patches(TARGET_PX, TARGET_PX, grid=GRID):
                if p.cell in cells:
                    diff_fg_patches.append(regions.crop(hybrid[-1], p.core))
                    light_fg_patches.append(regions.crop(out_light[i : i + 1], p.core))
                    gt_fg_patches.append(regions.crop(hr[i : i + 1], p.core))
            if progress:
                click.echo(f"x{scale}: hybrid {i + 1}/{n_images} ({time.perf_counter() - t0:.0f} s)", err=True)
        outputs["hybrid"] = torch.cat(hybrid)
        # diffusion everywhere (γ = 1) on the first n_everywhere images
        m = min(n_everywhere, n_images)
        everywhere = torch.cat([_hybrid(models, lr[i : i + 1], list(range(GRID * GRID)), scale, seed=i) for i in range(m)])
        for method, out in outputs.items():
            row(method, scale, "psnr_db", psnr_db(out, hr), n_images)
            row(method, scale, "ssim", ssim(out, hr), n_images)
            row(method, scale, "shape_iou", float(regions.mask_iou(_object_pixels(out), objects_hr).mean()), n_images)
            hit, total = _judge_shapes(out, scenes)
            row(method, scale, "judge_shape_acc", hit / total, total)
        row("gt", scale, "judge_shape_acc", _judge_shapes(hr, scenes)[0] / _judge_shapes(hr, scenes)[1], n_images)
        subset = {"light": outputs["light"][:m], "hybrid": outputs["hybrid"][:m], "diffusion": everywhere}
        for measure, fn in (("psnr_db", psnr_db), ("ssim", ssim)):
            values = {method: fn(out, hr[:m]) for method, out in subset.items()}
            for method, value in values.items():
                row(method, scale, f"{measure}_subset", value, m)
            # Hybrid's share of diffusion-everywhere's gain over light-everywhere (the paper's premise)
            gain = values["diffusion"] - values["light"]
            row("hybrid", scale, f"{measure}_gain_fraction", (values["hybrid"] - values["light"]) / gain if gain else float("nan"), m)
        fg_d, fg_l, fg_gt = torch.cat(diff_fg_patches), torch.cat(light_fg_patches), torch.cat(gt_fg_patches)
        for method, patches in (("diffusion", fg_d), ("light", fg_l)):
            row(method, scale, "fg_psnr_db", psnr_db(patches, fg_gt), len(fg_gt))
            row(method, scale, "fg_ssim", ssim(patches, fg_gt), len(fg_gt))
        # FLOPs per image
        row("light", scale, "gflops", light_sr_flops(light, lr_px, lr_px) / 1e9, 1)
        row("light_patches", scale, "gflops", _patch_gflops(models, lr_px, list(range(GRID * GRID)), scale, "light"), 1)
        cells0 = part.foreground_cells(0)
        edge = _patch_gflops(models, lr_px, cells0, scale, "diffusion")
        device = _patch_gflops(models, lr_px, [c for c in range(GRID * GRID) if c not in cells0], scale, "light")
        row("hybrid", scale, "edge_gflops", edge, 1)
        row("hybrid", scale, "device_gflops", device, 1)
        everywhere_gflops = _patch_gflops(models, lr_px, list(range(GRID * GRID)), scale, "diffusion")
        row("diffusion", scale, "gflops", everywhere_gflops, 1)
        row("hybrid", scale, "edge_cost_fraction", edge / everywhere_gflops, 1)
        # seams
        row("hybrid", scale, "seam_ratio", regions.seam_ratio(outputs["hybrid"]), n_images)
        row("light", scale, "seam_ratio", regions.seam_ratio(outputs["light"]), n_images)
        row("gt", scale, "seam_ratio", regions.seam_ratio(hr), n_images)
        if scale == 4:
            figure_data = {"lr": lr, "outputs": outputs, "everywhere": everywhere, "hr": hr, "part": part}
    # partitioner: top-γ latent cells vs the cells that hold objects
    lr128, latents128 = models.generator_view(render(scenes, size=128)[0])
    _, masks128 = render(scenes, size=128)
    objects128 = masks128.any(dim=1)
    coverage = F.avg_pool2d(objects128[:, None].float(), 128 // GRID)[:, 0]  # [B, G, G]
    truth = coverage >= OBJECT_CELL_COVERAGE
    for gamma in (0.25, 0.5):
        part = regions.partition_latent(latents128, grid=GRID, foreground_fraction=gamma)
        chosen = part.foreground
        inter = (chosen & truth).flatten(1).sum(1).float()
        union = (chosen | truth).flatten(1).sum(1).float()
        row(f"partition_g{gamma:g}", 4, "iou", float((inter / union.clamp(min=1)).mean()), n_images)
        pix = regions.cell_mask(chosen, 128, 128)
        row(f"partition_g{gamma:g}", 4, "object_recall", float((pix & objects128).sum() / objects128.sum()), n_images)
        row(f"partition_g{gamma:g}", 4, "pixel_iou", float(regions.mask_iou(pix, objects128).mean()), n_images)
        # the best any choice of as many cells can do: the cells with the most object pixels
        k = regions.foreground_count(gamma, GRID * GRID)
        best = torch.zeros_like(truth.flatten(1))
        best.scatter_(1, torch.sort(-coverage.flatten(1), dim=1, stable=True).indices[:, :k], True)
        best_iou = (best & truth.flatten(1)).sum(1).float() / (best | truth.flatten(1)).sum(1).float().clamp(min=1)
        row(f"oracle_g{gamma:g}", 4, "iou", float(best_iou.mean()), n_images)
    row("partition_truth", 4, "object_cells_mean", float(truth.flatten(1).sum(1).float().mean()), n_images)
    if figures is not None:
        _figure_3(figure_data, figures / "sr_fig3.png")
        _figure_4(lr128, latents128, objects128, figures / "sr_fig4.png")
    config = {"model": model, "n_images": n_images, "n_everywhere": n_everywhere, "seed": seed, "target_px": TARGET_PX,
              "grid": GRID, "margin_lr_px": MARGIN_LR_PX, "diffusion_steps": models.steps, "threads": torch.get_num_threads(),
              "object_cell_coverage": OBJECT_CELL_COVERAGE}  # fmt: skip
    return {"benchmark": "sr", "config": config, "machine": {"platform": platform.platform(), "cpu_count": torch.get_num_threads()}, "rows": rows}


def _figure_3(data: dict[str, Any], path: Path) -> None:
    """Fig. 3 of the paper: the same crop by each method, with its PSNR/SSIM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hr, lr = data["hr"][:1], data["lr"][:1]
    cell = data["part"].foreground_cells(0)[0]
    p = regions.grid_patches(TARGET_PX, TARGET_PX, grid=GRID)[cell].core
    panels = [("input ×4 (nearest)", F.interpolate(lr, scale_factor=4, mode="nearest")),
              ("bicubic", data["outputs"]["bicubic"][:1]), ("light SR", data["outputs"]["light"][:1]),
              ("diffusion SR", data["everywhere"][:1]), ("hybrid SR γ=0.25", data["outputs"]["hybrid"][:1]), ("ground truth", hr)]  # fmt: skip
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.6))
    for k, (name, img) in enumerate(panels):
        score = "" if name == "ground truth" else f"\n{psnr_db(img, hr):.2f} dB, SSIM {ssim(img, hr):.3f}"
        axes[0, k].imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, k].set_title(name + score, fontsize=8)
        axes[1, k].imshow(regions.crop(img, p)[0].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[1, k].set_title(f"foreground cell {cell}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("Hybrid SR on a held-out scene, 128 → 512 px (×4)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _figure_4(images: torch.Tensor, latents: torch.Tensor, objects: torch.Tensor, path: Path) -> None:
    """Fig. 4 of the paper: partition (red: high variance, green: low; γ = 0.5) beside the true object mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(3, len(images))
    part = regions.partition_latent(latents[:n], grid=GRID, foreground_fraction=0.5)
    fig, axes = plt.subplots(n, 2, figsize=(5, 2.6 * n), squeeze=False)
    size = images.shape[-1]
    for i in range(n):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
        for p in regions.grid_patches(size, size, grid=GRID):
            row_, col = divmod(p.cell, GRID)
            fg = bool(part.foreground[i, row_, col])
            axes[i, 0].add_patch(Rectangle((p.core.left, p.core.top), p.core.width - 1, p.core.height - 1, fill=True,
                                           facecolor=(1, 0, 0, 0.25) if fg else (0, 1, 0, 0.2), edgecolor="red" if fg else "green"))  # fmt: skip
        axes[i, 0].set_title(f"case {i + 1}: latent cells", fontsize=8)
        axes[i, 1].imshow(objects[i].numpy(), cmap="gray")
        axes[i, 1].set_title(f"case {i + 1}: object mask", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


@click.command("sr")
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--n", "n_images", type=click.IntRange(min=1), default=12, show_default=True, help="Held-out scenes.")
@click.option("--n-everywhere", type=click.IntRange(min=1), default=4, show_default=True,
              help="Scenes also upscaled by diffusion SR everywhere (the costly reference).")  # fmt: skip
@click.option("--steps", type=int, default=None, help="Diffusion SR steps (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
def bench_sr(model: str, n_images: int, n_everywhere: int, steps: int | None, seed: int, figures: Path, json_path: Path | None) -> None:
    """Light SR vs bicubic, diffusion SR vs light SR, the partitioner and the stitch."""
    result = run_sr_bench(model=model, n_images=n_images, n_everywhere=n_everywhere, seed=seed, steps=steps, figures=figures)
    table = Table(title=f"Hybrid SR on {n_images} held-out scenes (target {TARGET_PX} px)")
    for name in ("method", "scale", "measure", "value", "n"):
        table.add_column(name, justify="right" if name in ("value", "n", "scale") else "left")
    for r in result["rows"]:
        table.add_row(r["method"], f"x{r['scale']}", r["measure"], f"{r['value']:.4g}", str(r["n"]))
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)) + "\n")
