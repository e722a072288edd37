"""Unconstrained baseline: PPO on the reward (−log MSE) alone, limits ignored.

It shows what the constraints cost: the best quality any learned plan reaches when
latency and energy are free. Same algorithm and networks as `ppo_lagrangian`, with the
multipliers held at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meg.policy.env import EnvConfig, PlanSimulator
from meg.policy.ppo_lagrangian import PPOAgent, PPOLagrangianConfig, train_ppo_lagrangian

__all__ = ["UnconstrainedConfig", "train_unconstrained"]


@dataclass(frozen=True)
class UnconstrainedConfig(PPOLagrangianConfig):
    """PPO hyper-parameters with the Lagrangian switched off."""

    lagrangian: str = "none"  # type: ignore[assignment]
    """Reward only: the multipliers stay 0."""


def train_unconstrained(env_config: EnvConfig = EnvConfig(), config: UnconstrainedConfig = UnconstrainedConfig(), *,
                        simulator: PlanSimulator | None = None,
                        on_epoch: Callable[[int, dict[str, float]], None] | None = None
                        ) -> tuple[PPOAgent, list[dict[str, float]]]:
    """Train reward-only PPO; returns the agent and per-epoch metrics."""
    return train_ppo_lagrangian(env_config, config, simulator=simulator, name="unconstrained", on_epoch=on_epoch)
