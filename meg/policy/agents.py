"""What every planning algorithm exposes, and running one over batched episodes.

An agent maps observations to plans: an index into the simulator's `PlanSpace` and a
merge ratio per request. Learned agents only read the observation; the oracle also reads
the simulator's current (true) channel, which is what makes it an oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from meg.policy.env import PlanSimulator

__all__ = ["Agent", "EpisodeStats", "Rollout", "rollout"]


class Agent(Protocol):
    name: str

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Plans for a batch: (plan index [B] int, merge ratio [B] float)."""
        ...


@dataclass(frozen=True)
class Rollout:
    """Transitions of B episodes of length T (time-major arrays)."""

    obs: np.ndarray  # [T, B, 4] physical observations
    plan: np.ndarray  # [T, B] plan index
    merge_ratio: np.ndarray  # [T, B]
    reward: np.ndarray  # [T, B]
    latency_s: np.ndarray  # [T, B]
    energy_j: np.ndarray  # [T, B]
    mse: np.ndarray  # [T, B]
    next_obs: np.ndarray  # [T, B, 4]


@dataclass(frozen=True)
class EpisodeStats:
    """Per-episode averages ([B] arrays) and the limits they are judged against."""

    reward: np.ndarray
    mse: np.ndarray
    latency_s: np.ndarray
    energy_j: np.ndarray
    latency_limit_s: float
    energy_limit_j: float

    @property
    def latency_violation(self) -> np.ndarray:
        return self.latency_s > self.latency_limit_s

    @property
    def energy_violation(self) -> np.ndarray:
        return self.energy_j > self.energy_limit_j

    def summary(self) -> dict[str, float]:
        return {
            "mean_reward": float(self.reward.mean()),
            "mean_mse": float(self.mse.mean()),
            "mean_latency_s": float(self.latency_s.mean()),
            "mean_energy_j": float(self.energy_j.mean()),
            "latency_violation_rate": float(self.latency_violation.mean()),
            "energy_violation_rate": float(self.energy_violation.mean()),
        }


def rollout(agent: Agent, sim: PlanSimulator, *, batch: int, seed: int, deterministic: bool,
            generator: torch.Generator) -> tuple[Rollout, EpisodeStats]:
    """Run B full episodes (channel seeded by SEED) and return the transitions and averages."""
    obs = sim.reset(batch, seed)
    space = sim.space
    keys = ("obs", "plan", "merge_ratio", "reward", "latency_s", "energy_j", "mse", "next_obs")
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _ in range(sim.config.episode_length):
        plan, merge = agent.act(sim, obs, deterministic=deterministic, generator=generator)
        merge = np.where(space.merges[plan], merge, 0.0)
        result = sim.step(space.split[plan], space.steps[plan], merge)
        for k, v in zip(keys, (obs, plan, merge, result.reward, result.latency_s, result.energy_j,
                                result.mse, result.obs), strict=True):
            out[k].append(v)
        obs = result.obs
    ro = Rollout(**{k: np.stack(v) for k, v in out.items()})
    stats = EpisodeStats(ro.reward.mean(0), ro.mse.mean(0), ro.latency_s.mean(0), ro.energy_j.mean(0),
                         sim.config.latency_limit_s, sim.config.energy_limit_j)
    return ro, stats
