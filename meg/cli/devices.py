"""`meg devices ...`: list and show device profiles, calibrate this machine."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from meg.devices.calibrate import CalibrationConfig
from meg.devices.profile import list_profiles, load_profile
from meg.errors import MegError

_DEFAULTS = CalibrationConfig()


@click.group()
def devices() -> None:
    """Device profiles (peak FLOP/s, efficiency, power, radio) and their calibration."""


@devices.command("list")
def list_command() -> None:
    """Table of the shipped profiles."""
    table = Table()
    table.add_column("name", no_wrap=True)
    for column in ("peak TFLOP/s", "efficiency", "overhead ms", "active W", "idle W", "tx dBm"):
        table.add_column(column, justify="right")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(
            p.name, f"{p.peak_flops / 1e12:.3g}", f"{p.efficiency:.3f}", f"{p.overhead_s * 1e3:.2f}",
            f"{p.power_active_w:g}", f"{p.power_idle_w:g}", f"{p.tx_power_dbm:g}",
        )
    Console().print(table)


@devices.command("show")
@click.argument("name")
def show_command(name: str) -> None:
    """Print one profile (a shipped NAME or a PATH.toml) as TOML."""
    try:
        profile = load_profile(name)
    except MegError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(profile.to_toml(), nl=False)


@devices.command("calibrate")
@click.option("--model", default="tiny-random", show_default=True, help="tiny-random, meg-tiny or a local diffusers folder.")
@click.option("--profile-out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="TOML file to write.")
@click.option("--name", default=_DEFAULTS.name, show_default=True, help="Profile name written into the file.")
@click.option("--latent-sizes", default=",".join(map(str, _DEFAULTS.latent_sizes)), show_default=True,
              help="Comma-separated latent side lengths of the timed stages.")
@click.option("--repeats", default=_DEFAULTS.repeats, show_default=True, help="Timed runs per stage (median).")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
def calibrate_command(model: str, profile_out: Path, name: str, latent_sizes: str, repeats: int, threads: int | None) -> None:
    """Time UNet steps and VAE decodes here, fit efficiency and overhead, write a profile."""
    import torch

    from meg.devices.calibrate import calibrate
    from meg.split.loading import load_pipeline

    if threads is not None:
        torch.set_num_threads(threads)
    try:
        sizes = tuple(int(s) for s in latent_sizes.split(",") if s.strip())
    except ValueError as exc:
        raise click.BadParameter(f"not a list of integers: {latent_sizes!r}", param_hint="--latent-sizes") from exc
    console = Console()
    try:
        config = CalibrationConfig(name=name, latent_sizes=sizes, repeats=repeats)
        pipeline = load_pipeline(model)
        with console.status("timing stages") as status:
            result = calibrate(
                pipeline.unet, pipeline.vae, config=config,
                on_stage=lambda t: status.update(f"timed {t.stage}: {t.latency_s * 1e3:.2f} ms"),
            )
    except MegError as exc:
        raise click.ClickException(str(exc)) from exc
    profile = result.profile
    table = Table("stage", "GFLOPs", "measured ms", "modelled ms", title=f"calibration of {profile.name} ({model})")
    for t in result.timings:
        table.add_row(t.stage, f"{t.flops / 1e9:.3f}", f"{t.latency_s * 1e3:.2f}", f"{profile.compute_latency_s(t.flops) * 1e3:.2f}")
    console.print(table)
    console.print(
        f"peak (matmul) {result.measured_peak_flops / 1e9:.1f} GFLOP/s, fitted {result.fitted_effective_flops / 1e9:.1f} "
        f"GFLOP/s → efficiency {profile.efficiency:.3f}, overhead {profile.overhead_s * 1e3:.2f} ms, "
        f"residual rms {result.residual_rms_s * 1e3:.2f} ms"
    )
    profile_out.parent.mkdir(parents=True, exist_ok=True)
    profile_out.write_text(profile.to_toml(f"Written by `meg devices calibrate --model {model}`."))
    console.print(f"wrote {profile_out}")
