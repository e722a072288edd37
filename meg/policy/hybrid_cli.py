"""`meg hybrid ...`: Hybrid SR's measured table and controller from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from meg.policy.hybrid_profile import HybridProfileConfig

__all__ = ["hybrid"]

_D = HybridProfileConfig()


@click.group()
def hybrid() -> None:
    """Hybrid SR controller: measure its table (`profile`), decide a batch (`decide`)."""


@hybrid.command("profile")
@click.option("--model", default=_D.model, show_default=True, help="Model family to measure.")
@click.option("--prompts", "n_prompts", type=int, default=_D.n_prompts, show_default=True,
              help="Held-out prompts per (D, R) for the judge's fidelity g.")
@click.option("--scenes", "n_detail", type=int, default=_D.n_detail, show_default=True,
              help="Held-out scenes per (R̃, S) for the detail factor m.")
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Table path (default: meg/policy/tables/hybrid-sr-MODEL.json).")
def profile(model: str, n_prompts: int, n_detail: int, seed: int, out: Path | None) -> None:
    """Measure g(D, R), m(S, γ), the loads ξ1-ξ3 and the bytes η on one CPU thread (minutes)."""
    import torch

    from meg.policy.hybrid_profile import packaged_table, profile_hybrid

    torch.set_num_threads(1)
    config = HybridProfileConfig(model=model, n_prompts=n_prompts, n_detail=n_detail, seed=seed)
    table = profile_hybrid(config, log=lambda line: click.echo(line, err=True))
    path = out or packaged_table(model)
    path.write_text(json.dumps(table, indent=1) + "\n")
    click.echo(f"wrote {path} ({table['profile_s']} s)")


@hybrid.command("decide")
@click.option("--target", "targets", type=int, multiple=True, required=True, help="A user's target side R̃ (repeat).")
@click.option("--weight", "weights", type=float, multiple=True, help="That user's λ (repeat; default 0.5 each).")
@click.option("--method", type=click.Choice(["sa", "exact", "random", "wo-sr", "onetype", "cogview3"]), default="sa",
              show_default=True)
@click.option("--table", "table_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
def decide_command(targets: tuple[int, ...], weights: tuple[float, ...], method: str, table_path: Path | None) -> None:
    """One batch decision: (S, D) per user, its latency, quality and the total utility."""
    from meg.policy.hybrid_sr import HybridTable, UserRequest, decide

    if weights and len(weights) != len(targets):
        raise click.UsageError(f"{len(targets)} --target but {len(weights)} --weight")
    users = [UserRequest(t, w) for t, w in zip(targets, weights or (0.5,) * len(targets), strict=True)]
    d = decide(method, HybridTable.load(table_path), users)  # type: ignore[arg-type]
    for u, o in zip(users, d.options, strict=True):
        click.echo(f"R̃ {u.target_px:4d} λ {u.latency_weight:.2f}: S {o.sr_scale} D {o.steps:2d} ({o.unet}) "
                   f"Q {o.quality:.3f} T {o.latency_s:.3f} s")
    click.echo(f"utility {d.utility:.4f}, decided in {1e3 * d.decide_s:.1f} ms")
