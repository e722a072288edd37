"""Evaluate planners on identical episodes, and plot training curves and comparisons."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meg.errors import InvalidInputError
from meg.policy.agents import Agent, rollout
from meg.policy.env import EnvConfig, PlanSimulator

__all__ = ["ALGOS", "LEARNED", "evaluate", "make_agent", "plot_comparison", "plot_curves", "trainer_for"]

LEARNED = ("cvpo", "ppo-lagrangian", "ddpg-lagrangian", "unconstrained")
ALGOS = (*LEARNED, "fixed-meg", "fixed-image", "random", "rule", "oracle")


def trainer_for(algo: str, **overrides: Any) -> tuple[Any, Any]:
    """(hyper-parameters at their defaults with OVERRIDES, train function) of a learned algorithm;
    the function is called as ``train(env_config, config, on_epoch=…)`` → (agent, history)."""
    if algo == "cvpo":
        from meg.policy.cvpo import CVPOConfig, train_cvpo

        config: Any = CVPOConfig()
        trainer: Any = train_cvpo
    elif algo == "ppo-lagrangian":
        from meg.policy.ppo_lagrangian import PPOLagrangianConfig, train_ppo_lagrangian

        config, trainer = PPOLagrangianConfig(), train_ppo_lagrangian
    elif algo == "ddpg-lagrangian":
        from meg.policy.ddpg_lagrangian import DDPGLagrangianConfig, train_ddpg_lagrangian

        config, trainer = DDPGLagrangianConfig(), train_ddpg_lagrangian
    elif algo == "unconstrained":
        from meg.policy.unconstrained import UnconstrainedConfig, train_unconstrained

        config, trainer = UnconstrainedConfig(), train_unconstrained
    else:
        raise InvalidInputError(f"unknown learned algorithm {algo!r}; known: {', '.join(LEARNED)}")
    return dataclasses.replace(config, **overrides), trainer


def make_agent(algo: str, checkpoint: str | Path | None = None) -> tuple[Agent, EnvConfig | None]:
    """An agent by name; learned ones need a checkpoint (returns its training environment too)."""
    if algo in LEARNED:
        if checkpoint is None:
            raise InvalidInputError(f"algorithm {algo!r} needs --checkpoint")
        from meg.policy.checkpoint import load_checkpoint
        from meg.policy.cvpo import CVPOAgent
        from meg.policy.ddpg_lagrangian import DDPGAgent
        from meg.policy.ppo_lagrangian import PPOAgent

        ckpt = load_checkpoint(checkpoint)
        if ckpt.algo != algo:
            raise InvalidInputError(f"checkpoint {str(checkpoint)!r} holds {ckpt.algo!r}, not {algo!r}")
        agent: Agent
        if algo == "cvpo":
            agent = CVPOAgent.from_checkpoint(ckpt)
        elif algo == "ddpg-lagrangian":
            agent = DDPGAgent.from_checkpoint(ckpt)
        else:
            agent = PPOAgent.from_checkpoint(ckpt)
        return agent, ckpt.env_config
    if algo.startswith("fixed"):
        from meg.policy.baselines import FIXED_PLANS, FixedPlanAgent

        if algo not in FIXED_PLANS:
            raise InvalidInputError(f"unknown fixed plan {algo!r}; known: {sorted(FIXED_PLANS)}")
        return FixedPlanAgent(FIXED_PLANS[algo], name=algo), None
    if algo == "random":
        from meg.policy.baselines import RandomAgent

        return RandomAgent(), None
    if algo == "rule":
        from meg.policy.rule import RuleAgent

        return RuleAgent(), None
    if algo == "oracle":
        from meg.policy.oracle import OracleAgent

        return OracleAgent(), None
    raise InvalidInputError(f"unknown algorithm {algo!r}; known: {', '.join(ALGOS)}")


def evaluate(agents: dict[str, Agent], env_config: EnvConfig, *, episodes: int, seed: int,
             simulator: PlanSimulator | None = None) -> list[dict[str, Any]]:
    """One row per agent, all on the same `episodes` channel realisations (seeded by SEED)."""
    if episodes < 1:
        raise InvalidInputError(f"episodes must be >= 1, got {episodes!r}")
    sim = simulator if simulator is not None else PlanSimulator(env_config)
    rows = []
    for name, agent in agents.items():
        _, stats = rollout(agent, sim, batch=episodes, seed=seed, deterministic=True,
                           generator=torch.Generator().manual_seed(seed))
        rows.append({"algo": name, **stats.summary(), "episodes": episodes, "seed": seed,
                     "latency_limit_s": env_config.latency_limit_s, "energy_limit_j": env_config.energy_limit_j})
    return rows


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, float]], path: Path, *, title: str, latency_limit_s: float,
                energy_limit_j: float) -> None:
    """Training curves: reward, each cost (with its limit) and violation rates per epoch."""
    plt = _plt()
    epoch = np.array([h["epoch"] for h in history])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].plot(epoch, [h["mean_reward"] for h in history])
    axes[0].set_title("reward (−log MSE)")
    for ax, key, limit, label in ((axes[1], "mean_latency_s", latency_limit_s, "latency (s)"),
                                  (axes[2], "mean_energy_j", energy_limit_j, "energy (J)")):
        ax.plot(epoch, [h[key] for h in history])
        ax.axhline(limit, color="red", linestyle="--", label="limit")
        ax.set_title(label)
        ax.set_yscale("log")
        ax.legend()
    axes[3].plot(epoch, [h["latency_violation_rate"] for h in history], label="latency")
    axes[3].plot(epoch, [h["energy_violation_rate"] for h in history], label="energy")
    axes[3].set_title("violation rate (episodes)")
    axes[3].set_ylim(-0.02, 1.02)
    axes[3].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_comparison(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Bars per algorithm: mean MSE, latency and energy (limits dashed), violation rates."""
    plt = _plt()
    names = [r["algo"] for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = (("mean_mse", "mean MSE (lower is better)", None),
              ("mean_latency_s", "mean latency (s)", "latency_limit_s"),
              ("mean_energy_j", "mean energy (J)", "energy_limit_j"))
    for ax, (key, label, limit) in zip(axes[:3], panels, strict=True):
        ax.bar(x, [r[key] for r in rows], color="tab:blue")
        if limit:
            ax.axhline(rows[0][limit], color="red", linestyle="--", label="limit")
            ax.legend()
        ax.set_title(label)
    width = 0.4
    axes[3].bar(x - width / 2, [r["latency_violation_rate"] for r in rows], width, label="latency")
    axes[3].bar(x + width / 2, [r["energy_violation_rate"] for r in rows], width, label="energy")
    axes[3].axhline(0.05, color="red", linestyle="--", label="5%")
    axes[3].set_title("episode violation rate")
    axes[3].legend()
    for ax in axes:
        ax.set_xticks(x, names, rotation=35, ha="right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
