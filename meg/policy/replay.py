"""What the off-policy planners (CVPO, DDPG-Lagrangian) share: a replay buffer of n-step
transitions, n-step returns over whole episodes, and the soft target update."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Replay", "n_step_returns", "soft_update"]


class Replay:
    """Fixed-capacity ring buffer of named float32 arrays (first axis: transitions)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.data: dict[str, np.ndarray] = {}

    def add(self, **arrays: np.ndarray) -> None:
        n = len(next(iter(arrays.values())))
        if not self.data:
            self.data = {k: np.zeros((self.capacity, *v.shape[1:]), dtype=np.float32) for k, v in arrays.items()}
        idx = (self.pos + np.arange(n)) % self.capacity
        for k, v in arrays.items():
            self.data[k][idx] = v
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        idx = torch.randint(self.size, (batch,), generator=generator).numpy()
        return {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}


def n_step_returns(signals: np.ndarray, next_obs: np.ndarray, *, n_step: int, gamma: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n-step returns of [T, B, C] per-step signals over episodes of length T whose ends are
    truncations (the critics bootstrap there).

    Returns (return [T, B, C], bootstrap discount γ^m [T, B], bootstrap observation
    [T, B, ...] = next_obs of the m-th step), m = min(n_step, T − t).
    """
    t_len = signals.shape[0]
    ret, disc, boot = np.zeros_like(signals), np.zeros(signals.shape[:2]), np.zeros_like(next_obs)
    for t in range(t_len):
        m = min(n_step, t_len - t)
        ret[t] = sum(gamma**k * signals[t + k] for k in range(m))
        disc[t] = gamma**m
        boot[t] = next_obs[t + m - 1]
    return ret, disc, boot


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target ← (1 − τ)·target + τ·source, parameter by parameter."""
    with torch.no_grad():
        for tp, p in zip(target.parameters(), source.parameters(), strict=True):
            tp.mul_(1.0 - tau).add_(p, alpha=tau)
