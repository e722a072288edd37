"""`meg policy ...`: profile distortion, train planners, evaluate them on identical episodes."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click

from meg.policy.env import ENV_PRESETS, EnvConfig
from meg.policy.measure_distortion import ProfileConfig

_ENV = EnvConfig()
_PROFILE = ProfileConfig()


def _env_options(fn: Any) -> Any:
    options = [
        click.option("--preset", default="paper", show_default=True, type=click.Choice(sorted(ENV_PRESETS)),
                     help="paper: MEG's MDP as published; extended: split-point action, two sizes, Rician "
                          "fading, σ from the SNR (the options below override either)."),
        click.option("--table", default=None, help=f"Distortion table: packaged model name or JSON path [paper: {_ENV.table}]."),
        click.option("--latency-limit-s", default=None, type=click.FloatRange(min=0, min_open=True),
                     help=f"Average latency limit per request (s) [paper: {_ENV.latency_limit_s:g}]."),
        click.option("--energy-limit-j", default=None, type=click.FloatRange(min=0, min_open=True),
                     help=f"Average energy limit per request (J) [paper: {_ENV.energy_limit_j:g}]."),
        click.option("--merge-head", default=None, type=click.Choice(["discrete", "continuous"]),
                     help=f"Merge ratio from bins or a Gaussian [paper: {_ENV.merge_head}]."),
        click.option("--episode-length", default=None, type=click.IntRange(min=1),
                     help=f"Requests per episode [paper: {_ENV.episode_length}]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _env_config(preset: str, **overrides: Any) -> EnvConfig:
    return EnvConfig.preset(preset, **{k: v for k, v in overrides.items() if v is not None})


@click.group()
def policy() -> None:
    """Constrained planning of split point, steps and merge ratio (MEG-CVPO and baselines)."""


@policy.command("profile")
@click.option("--model", default="tiny-random", show_default=True, help="Pipeline to profile.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Write the distortion table (JSON) here.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Prompts, one per line (default: the built-in set).")
@click.option("--prompts", type=int, default=None, help="Use only the first N prompts.")
@click.option("--height", default=_PROFILE.height, show_default=True, type=click.IntRange(min=8), help="Pixels.")
@click.option("--width", default=_PROFILE.width, show_default=True, type=click.IntRange(min=8), help="Pixels.")
@click.option("--seed", default=_PROFILE.seed, show_default=True, help="Base seed.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads.")
@click.option("--steps", "steps_grid", default=",".join(map(str, _PROFILE.steps)), show_default=True,
              help="Comma-separated total steps to measure.")
@click.option("--tome-ratio", default=_PROFILE.tome_ratio, show_default=True, type=click.FloatRange(0, 0.74),
              help="ToMe ratio inside the edge UNet (MEG: 0.5).")
@click.option("--decoder", default=None, help="VAE folder of the model the device decodes the merged latent with "
              "(vae: stock, vae_merge, vae_merge_paper, …); default: the pipeline's own.")
def profile_command(model: str, out_path: Path, prompt_file: Path | None, prompts: int | None, height: int,
                    width: int, seed: int, threads: int, steps_grid: str, tome_ratio: float, decoder: str | None) -> None:
    """Measure MSE vs the reference over (split, steps, merge ratio, channel noise σ)."""
    import torch
    from tqdm import tqdm

    from meg.policy.measure_distortion import profile_distortion

    torch.set_num_threads(threads)
    try:
        steps = tuple(sorted({int(s) for s in steps_grid.split(",") if s.strip()}))
    except ValueError as exc:
        raise click.BadParameter(f"steps {steps_grid!r} must be comma-separated integers", param_hint="--steps") from exc
    if not steps or steps[0] < 1:
        raise click.BadParameter(f"steps {steps_grid!r} must be positive", param_hint="--steps")
    config = ProfileConfig(model=model, seed=seed, height=height, width=width, steps=steps, tome_ratio=tome_ratio,
                           decoder=decoder)
    if prompt_file is not None:
        lines = tuple(line.strip() for line in prompt_file.read_text().splitlines() if line.strip())
        config = dataclasses.replace(config, prompts=lines)
    if prompts is not None:
        config = dataclasses.replace(config, prompts=config.prompts[:prompts])
    bar = tqdm(desc=f"profile {model}", unit="gen")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    start = time.perf_counter()
    table = profile_distortion(config, on_progress=progress)
    bar.close()
    table.save(out_path)
    click.echo(f"{len(table.points)} points in {time.perf_counter() - start:.0f} s -> {out_path}")


@policy.command("train")
@click.option("--algo", type=click.Choice(["cvpo", "ppo-lagrangian", "ddpg-lagrangian", "unconstrained"]), default="cvpo",
              show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Checkpoint folder (weights.safetensors, meta.json, history.json, curves.png).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the algorithm's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads.")
@_env_options
def train_command(algo: str, out_dir: Path, epochs: int | None, seed: int, threads: int, **env: Any) -> None:
    """Train a planner; writes a checkpoint and per-epoch curves (PNG)."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from meg.policy.evaluate import plot_curves

    torch.set_num_threads(threads)
    env_config = _env_config(**env)
    from meg.policy.evaluate import trainer_for

    config, trainer = trainer_for(algo, seed=seed, **({"epochs": epochs} if epochs is not None else {}))
    out_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task(f"train {algo}", total=config.epochs, info="")

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            history.append(row)
            plot_curves(history, out_dir / "curves.png", title=f"{algo} training",
                        latency_limit_s=env_config.latency_limit_s, energy_limit_j=env_config.energy_limit_j)
            progress.update(task, completed=epoch + 1, info=(
                f"reward {row['mean_reward']:.2f}  latency {row['mean_latency_s']:.2f} s  "
                f"energy {row['mean_energy_j']:.0f} J  viol {row['latency_violation_rate']:.2f}/"
                f"{row['energy_violation_rate']:.2f}"))

        agent, _ = trainer(env_config, config, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    agent.save(out_dir, extra={"train_seconds": seconds, "epochs": config.epochs})
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    click.echo(f"trained {algo} for {config.epochs} epochs in {seconds:.0f} s -> {out_dir}")


@policy.command("eval")
@click.option("--algo", "algos", required=True,
              help="Comma-separated algorithms: cvpo, ppo-lagrangian, ddpg-lagrangian, unconstrained, fixed-meg, "
                   "fixed-image, random, rule, oracle.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint folder of a learned algorithm (repeat for several).")
@click.option("--episodes", default=100, show_default=True, type=click.IntRange(min=1), help="Episodes per algorithm.")
@click.option("--seed", default=10_000, show_default=True, help="Episode seed (held out from training seeds).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the rows here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a comparison PNG here.")
@_env_options
def eval_command(algos: str, checkpoints: tuple[Path, ...], episodes: int, seed: int, json_path: Path | None,
                 plot_path: Path | None, **env: Any) -> None:
    """Evaluate planners on the same episodes; print a table, write JSON and a plot.

    With a learned algorithm, every planner runs in the environment its checkpoint was
    trained for (table, limits, head); the environment options apply otherwise.
    """
    from rich.console import Console
    from rich.table import Table

    from meg.errors import InvalidInputError
    from meg.policy.checkpoint import load_checkpoint
    from meg.policy.evaluate import LEARNED, evaluate, make_agent, plot_comparison

    names = [a.strip() for a in algos.split(",") if a.strip()]
    by_algo = {load_checkpoint(c).algo: c for c in checkpoints}
    env_config = _env_config(**env)
    trained_for = set()
    agents = {}
    for name in names:
        agent, agent_env = make_agent(name, by_algo.get(name) if name in LEARNED else None)
        if agent_env is not None:
            trained_for.add(json.dumps(dataclasses.asdict(agent_env), sort_keys=True))
            env_config = agent_env
        agents[name] = agent
    if len(trained_for) > 1:
        raise InvalidInputError("the checkpoints were trained for different environments; evaluate them separately")
    rows = evaluate(agents, env_config, episodes=episodes, seed=seed)
    table = Table(title=f"{episodes} episodes × {env_config.episode_length} requests, seed {seed}; limits "
                        f"{env_config.latency_limit_s:g} s, {env_config.energy_limit_j:g} J")
    for col in ("algo", "reward", "MSE", "latency s", "energy J", "lat. viol.", "energy viol."):
        table.add_column(col, justify="left" if col == "algo" else "right")
    for r in rows:
        table.add_row(r["algo"], f"{r['mean_reward']:.3f}", f"{r['mean_mse']:.5f}", f"{r['mean_latency_s']:.3f}",
                      f"{r['mean_energy_j']:.1f}", f"{r['latency_violation_rate']:.3f}", f"{r['energy_violation_rate']:.3f}")
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"env_config": dataclasses.asdict(env_config), "rows": rows}, indent=1) + "\n")
    if plot_path is not None:
        plot_comparison(rows, plot_path, title=f"planners on {episodes} held-out episodes (seed {seed})")


# light (click only): the preview-refine strength predictor's profile and train commands
from meg.policy.strength_cli import strength  # noqa: E402

policy.add_command(strength)
