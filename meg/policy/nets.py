"""Small networks shared by the learned planners: an MLP, the plan actor and the Q-critic.

The actor has a categorical head over the plan set and, for the continuous merge head, a
Gaussian over u with merge ratio = max_ratio · sigmoid(u). The critic outputs one value
per plan, so a whole plan set is scored in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "PlanActor", "QCritic", "merge_from_u"]


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


class PlanActor(nn.Module):
    """π(plan, u | s): logits [B, A] and Gaussian (mean, std) [B] over u."""

    LOG_STD_MIN, LOG_STD_MAX = -5.0, 1.0

    def __init__(self, obs_dim: int, n_plans: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.body = MLP(obs_dim, hidden[:-1], hidden[-1]) if len(hidden) > 1 else nn.Linear(obs_dim, hidden[0])
        self.logits = nn.Linear(hidden[-1], n_plans)
        self.gauss = nn.Linear(hidden[-1], 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = torch.relu(self.body(obs))
        mean, log_std = self.gauss(h).unbind(-1)
        return self.logits(h), mean, log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp()


def merge_from_u(u: Tensor, max_ratio: float) -> Tensor:
    return max_ratio * torch.sigmoid(u)


class QCritic(nn.Module):
    """Q(s, plan, merge) for the reward and each cost.

    Three MLPs (reward, latency, energy) read [features(s), merge ratio] and output one
    value per plan, so a whole plan set is scored in one pass; the discrete head passes
    merge 0 (its plan index already names the merge bin). Outputs are multiplied by
    `scale` (the return horizon 1/(1−γ)), so the networks work at per-step magnitudes.
    """

    HEADS = ("reward", "latency", "energy")

    def __init__(self, obs_dim: int, n_plans: int, hidden: Sequence[int], scale: float) -> None:
        super().__init__()
        self.nets = nn.ModuleList([MLP(obs_dim + 1, hidden, n_plans) for _ in self.HEADS])
        self.scale = scale

    def forward(self, obs: Tensor, merge: Tensor) -> Tensor:
        """obs [..., obs_dim], merge [...] → Q [..., n_plans, 3] (reward, latency, energy)."""
        x = torch.cat([obs, merge[..., None].to(obs.dtype)], dim=-1)
        return torch.stack([net(x) for net in self.nets], dim=-1) * self.scale
