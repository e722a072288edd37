"""Oracle: knows the current channel and the models, picks the best feasible plan per request.

For every request it evaluates every plan (and, for the continuous head, a fine merge
grid) at the request's true SNR and size, keeps those whose latency and energy are within
the limits, and takes the one with the lowest MSE. When nothing fits it takes the plan
whose worse cost, relative to its limit, is smallest. It is an upper bound on what a
policy that sees the channel can do per request; it does not trade costs across requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meg.policy.env import PlanSimulator

__all__ = ["OracleAgent", "OracleConfig"]


@dataclass(frozen=True)
class OracleConfig:
    merge_grid_points: int = 16
    """Merge ratios tried per decoder plan with the continuous head."""


class OracleAgent:
    name = "oracle"

    def __init__(self, config: OracleConfig = OracleConfig()) -> None:
        self.config = config

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        space, cfg = sim.space, sim.config
        if cfg.merge_head == "continuous":
            grid = np.linspace(0.0, cfg.max_merge_ratio, self.config.merge_grid_points)
            plans = np.repeat(np.arange(space.size), len(grid))
            merges = np.where(space.merges[plans], np.tile(grid, space.size), 0.0)
        else:
            plans, merges = np.arange(space.size), space.merge_ratio
        reward, latency_s, energy_j, _ = sim.outcome(space.split[plans][None], space.steps[plans][None], merges[None])
        excess = np.maximum(latency_s / cfg.latency_limit_s, energy_j / cfg.energy_limit_j)  # [B, C]
        feasible = excess <= 1.0
        score = np.where(feasible, reward, -np.inf)
        best_feasible = np.argmax(score, axis=1)
        least_excess = np.argmin(excess, axis=1)
        choice = np.where(feasible.any(axis=1), best_feasible, least_excess)
        return plans[choice], merges[choice]
