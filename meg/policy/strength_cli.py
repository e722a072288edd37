"""`meg policy strength profile|train`: the preview-refine strength predictor's data and fit."""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["strength"]


@click.group("strength")
def strength() -> None:
    """Preview-refine's refine-strength predictor: profile, then train."""


@strength.command("profile")
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--prompts", "prompt_set", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A .jsonl prompt set with ground truth (or a text file).")
@click.option("-n", "n", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Request i uses seed SEED + i.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def profile(model: str, prompt_set: Path, n: int, seed: int, out: Path) -> None:
    """Judge preview, from-scratch and refine at every strength for N prompts; write OUT (JSON)."""
    import dataclasses

    import torch

    from meg.policy.preview_strength import StrengthProfileConfig, run_profile

    torch.set_num_threads(1)
    records = run_profile(model, prompt_set, n, out, dataclasses.replace(StrengthProfileConfig(), seed=seed))
    click.echo(f"profiled {len(records)} prompts; wrote {out}")


@strength.command("train")
@click.option("--profile", "profile_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for strength.safetensors (fp16) and strength.json.")
def train(profile_path: Path, out_dir: Path) -> None:
    """Fit the predictor on a profile (closed form, deterministic) and ship it as fp16."""
    import numpy as np

    from meg.policy.preview_strength import load_profile_records, train_strength, xy

    header, records = load_profile_records(profile_path)
    predictor = train_strength(records)
    predictor.save(out_dir)
    x, oracle = xy(records)
    within = float(np.mean(np.abs(predictor.predict(x) - oracle) <= 0.1 + 1e-9))
    meta = json.loads((out_dir / "strength.json").read_text())
    meta.update(trained_on=str(profile_path), n=len(records), train_within_0_1_of_oracle=round(within, 4),
                model=header.get("model"), previewer=header.get("previewer"))
    (out_dir / "strength.json").write_text(json.dumps(meta, indent=1) + "\n")
    click.echo(f"trained on {len(records)} requests (within 0.1 of the oracle on {within:.1%}, margin "
               f"{predictor.margin}); wrote {out_dir}")


@strength.command("edits")
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("-n", "n", type=int, default=100, show_default=True, help="Colour-edit pairs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=2, show_default=True, help="Preview steps.")
@click.option("--strengths", default="0.5,1.0", show_default=True, help="Edit strengths (comma-separated).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def edits(model: str, n: int, seed: int, steps: int, strengths: str, out: Path) -> None:
    """Edit rounds on the previewer: from scratch vs re-noising the previous preview."""
    import torch

    import meg.models  # noqa: F401
    from meg.policy.preview_strength import colour_edits, measure_edits
    from meg.recipes.preview_refine import preview_engine
    from meg.split.loading import load_pipeline

    torch.set_num_threads(1)
    engine, previewer = preview_engine(load_pipeline(model), model)
    grid = tuple(float(s) for s in strengths.split(","))
    rows = measure_edits(engine, colour_edits(n, seed), grid, steps=steps, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "previewer": previewer, "pairs": n, "seed": seed, "steps": steps,
                               "rows": rows}, indent=1) + "\n")
    for name, row in rows.items():
        click.echo(f"{name:<14} fidelity {row['fidelity']:.3f}  pixel change {row['pixel_change']:.4f}  "
                   f"steps {row['steps']:.0f}")
