"""Plans that do not learn: a fixed plan (MEG's default, conventional edge generation) and random."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meg.errors import InvalidInputError
from meg.policy.costs import SPLIT_CODES
from meg.policy.env import PlanSimulator

__all__ = ["FIXED_PLANS", "FixedPlanAgent", "FixedPlanConfig", "RandomAgent"]


@dataclass(frozen=True)
class FixedPlanConfig:
    """One plan used for every request."""

    split: str = "decoder"
    """Split point ("decoder": MEG, "image": conventional edge generation)."""
    steps: int = 8
    """Total denoising steps."""
    merge_ratio: float = 0.5
    """Token-merge ratio of the crossing latent (decoder split only)."""


# Named fixed plans: MEG's default (decoder split, mid-range steps, merge 0.5 as the
# paper's ToMe ratio) and conventional edge generation (CEG: the edge sends the image).
FIXED_PLANS = {
    "fixed-meg": FixedPlanConfig("decoder", 8, 0.5),
    "fixed-image": FixedPlanConfig("image", 8, 0.0),
}


class FixedPlanAgent:
    """Always the same plan (the nearest one in the simulator's plan set)."""

    def __init__(self, config: FixedPlanConfig = FixedPlanConfig(), name: str = "fixed") -> None:
        self.config = config
        self.name = name

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        space, c = sim.space, self.config
        if c.split not in SPLIT_CODES:
            raise InvalidInputError(f"fixed plan split {c.split!r} is not one of {SPLIT_CODES}")
        code = SPLIT_CODES.index(c.split)
        candidates = np.flatnonzero(space.split == code)
        if candidates.size == 0:
            raise InvalidInputError(f"split {c.split!r} is not in the environment's plan set")
        # nearest steps, then nearest merge bin (the continuous head uses the exact ratio)
        distance = np.abs(space.steps[candidates] - c.steps) * 10 + np.abs(space.merge_ratio[candidates] - c.merge_ratio)
        plan = int(candidates[np.argmin(distance)])
        merge = c.merge_ratio if sim.config.merge_head == "continuous" else float(space.merge_ratio[plan])
        b = obs.shape[0]
        return np.full(b, plan), np.full(b, merge)


class RandomAgent:
    """A uniformly random plan (and, for the continuous head, a uniform merge ratio)."""

    name = "random"

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        b, space = obs.shape[0], sim.space
        plan = torch.randint(space.size, (b,), generator=generator).numpy()
        if sim.config.merge_head == "continuous":
            merge = sim.config.max_merge_ratio * torch.rand(b, generator=generator, dtype=torch.float64).numpy()
        else:
            merge = space.merge_ratio[plan]
        return plan, merge
