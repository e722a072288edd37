"""`meg train sr-light` and `meg train sr-diffusion`: the Hybrid SR models of meg-tiny."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from meg.models.registry import MODELS_ROOT

__all__ = ["sr_diffusion", "sr_light"]


def _options(fn):
    fn = click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/meg-tiny/sr"), show_default=True,
                      help="Training pairs, checkpoints and loss curves.")(fn)  # fmt: skip
    fn = click.option("--model-dir", type=click.Path(path_type=Path), default=MODELS_ROOT / "meg-tiny", show_default=True,
                      help="The family: its VAE makes the inputs; the SR components are written here.")(fn)  # fmt: skip
    fn = click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")(fn)
    fn = click.option("--steps", type=int, default=None, help="Training steps (default: SRTrainConfig's).")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True)(fn)
    fn = click.option("--tiny", "smoke", is_flag=True, help="Miniature models and a few steps (smoke test).")(fn)
    return fn


def _config(smoke: bool, seed: int, steps: int | None, field: str):
    from dataclasses import replace

    from meg.models.sr_train import SRTrainConfig

    config = SRTrainConfig.smoke() if smoke else SRTrainConfig()
    config = replace(config, seed=seed)
    overrides: dict[str, Any] = {field: steps} if steps else {}
    return replace(config, **overrides)


def _check_family(model_dir: Path) -> None:
    if not (model_dir / "vae" / "config.json").exists():
        raise click.BadParameter(f"{str(model_dir)!r} holds no family VAE (train the family first)", param_hint="--model-dir")


@click.command(name="sr-light")
@_options
@click.option("--scale", "scales", type=click.Choice(["2", "4"]), multiple=True, default=("2", "4"), show_default=True)
def sr_light(work_dir: Path, model_dir: Path, threads: int, steps: int | None, seed: int, smoke: bool, scales: tuple[str, ...]) -> None:
    """Train the device's light SR models (SRVGGNetCompact, ×2 and ×4) on world pairs."""
    import torch

    from meg.models.sr_train import train_light_sr

    _check_family(model_dir)
    torch.set_num_threads(threads)
    runs = train_light_sr(model_dir, work_dir, _config(smoke, seed, steps, "light_steps"), scales=tuple(int(s) for s in scales))
    for scale, run in runs.items():
        click.echo(f"sr-light x{scale}: {run['time_s']:.0f} s, final loss (MSE) {run['final_loss']:.4f}; wrote {model_dir / f'sr_light_x{scale}'}")


@click.command(name="sr-diffusion")
@_options
@click.option("--lr", type=float, default=None, help="Learning rate (default: SRTrainConfig's).")
@click.option("--warm-start", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from the weights of an earlier run's checkpoint (work-dir/sr_diffusion.pt): a continuation.")  # fmt: skip
def sr_diffusion(work_dir: Path, model_dir: Path, threads: int, steps: int | None, seed: int, smoke: bool, lr: float | None,
                 warm_start: Path | None) -> None:  # fmt: skip
    """Train the edge's diffusion upscaler (UNet2DModel, ×2 and ×4) on world pairs."""
    import torch

    from meg.models.sr_train import train_diffusion_sr

    _check_family(model_dir)
    torch.set_num_threads(threads)
    from dataclasses import replace

    config = _config(smoke, seed, steps, "diffusion_steps")
    if lr is not None:
        config = replace(config, diffusion_lr=lr)
    run = train_diffusion_sr(model_dir, work_dir, config, warm_start=warm_start)
    click.echo(f"sr-diffusion: {run['time_s']:.0f} s, final loss {run['final_loss']:.4f}; wrote {model_dir / 'sr_unet'}")
