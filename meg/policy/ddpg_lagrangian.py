"""DDPG-Lagrangian: a deterministic actor over a continuous action (the MEG authors' off-policy baseline).

The actor maps the normalised state to a ∈ [0, 1]^k (a sigmoid output); `ActionMap` turns
a into a plan of the simulator's `PlanSpace` the way the paper's code does (PAPERS.md §1,
"Dynamic diffusion": L = int(8·a0) + 4). Reads top to bottom:

1. Collect episodes: uniformly random actions for the first `warmup_epochs`, then the
   actor's action plus Gaussian noise (std decaying per epoch), clipped to [0, 1].
2. n-step transitions into a replay buffer; the costs enter divided by their limits and
   clipped at `cost_clip` (as in CVPO), so one unit per step is "exactly at the limit".
3. Multipliers: projected gradient ascent on the collected episodes' constraint error,
       λ_i ← clip(λ_i + lambda_lr·(episode-average cost_i / limit_i − (1 − margin_i)), 0, λ_max)
   (the default margin 0 makes the error the plain cost/limit − 1).
4. Critics Q_r, Q_latency, Q_energy over (state, a), each fit by n-step TD to a
   soft-updated target critic evaluated at the target actor's action.
5. Actor: ascend Q_r − λ_lat·Q_lat − λ_en·Q_en at a = μ(s) (scaled by 1/(1 + Σλ), so the
   step size does not grow with the multipliers), with a small penalty on the pre-sigmoid
   outputs; soft-update both targets.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from meg.errors import InvalidInputError
from meg.policy.agents import EpisodeStats
from meg.policy.checkpoint import Checkpoint, save_checkpoint
from meg.policy.costs import SPLIT_CODES
from meg.policy.env import OBS_DIM, EnvConfig, PlanSimulator, PlanSpace
from meg.policy.nets import MLP
from meg.policy.replay import Replay, n_step_returns, soft_update

__all__ = ["ActionMap", "DDPGAgent", "DDPGLagrangianConfig", "exploration_std", "train_ddpg_lagrangian",
           "update_lambdas"]


@dataclass(frozen=True)
class DDPGLagrangianConfig:
    """Hyper-parameters of DDPG-Lagrangian (network sizes and rates as MEG-CVPO's, PAPERS.md §1)."""

    epochs: int = 60
    """Training epochs (collect, then update)."""
    episodes_per_epoch: int = 8
    """Episodes collected per epoch (stepped together)."""
    updates_per_epoch: int = 64
    """Gradient updates (critics, actor, targets) per epoch."""
    warmup_epochs: int = 2
    """Epochs collected with uniformly random actions a ~ U[0, 1]^k before the actor acts."""
    batch_size: int = 256
    """Transitions per update (paper: 256)."""
    replay_size: int = 100_000
    """Transitions kept in the replay buffer."""
    gamma: float = 0.97
    """Discount (paper: 0.97). The channel evolves independently of the plans, so an action
    changes only its own request's reward and costs: 0 makes each critic an exact one-step
    model, and with 0.97 the action's own step is ~3% of Q, so the critics' error blurs the
    actor's gradient (extended environment, 60 epochs, seed 0, margin (0.15, 0.10): 1.4× the
    MSE of gamma 0, as many episodes over the limits)."""
    n_step: int = 2
    """TD horizon of the critics (paper: 2-step; with gamma 0 the target is the step's own
    reward and costs, and the targets below do not enter)."""
    tau: float = 0.05
    """Soft target update rate of actor and critics (paper: 0.05)."""
    hidden: tuple[int, ...] = (128, 128)
    """Actor hidden layers (paper: 128, 128)."""
    critic_hidden: tuple[int, ...] = (128, 128)
    """Hidden layers of each of the three critics."""
    actor_lr: float = 5e-4
    """Actor learning rate (Adam)."""
    critic_lr: float = 1e-3
    """Critic learning rate (Adam)."""
    preactivation_l2: float = 1e-3
    """Weight of a penalty on the squared pre-sigmoid actor outputs. It keeps them off the
    sigmoid's flat tails, where the critics' gradient no longer moves a; without it a
    multiplier that is briefly large drives a component to ~0 for good."""
    noise_std: float = 0.2
    """Std of the Gaussian exploration noise added to a in the first epoch after warm-up."""
    noise_decay: float = 0.97
    """Factor applied to the noise std per epoch after warm-up."""
    noise_std_min: float = 0.02
    """Floor of the exploration noise std."""
    lambda_lr: float = 0.2
    """Step size of the multipliers' gradient ascent (per epoch, on the normalised error).
    Larger steps overshoot after the first epochs' expensive plans, and the multipliers then
    fall only as fast as the (small) slack allows: 1.0 left λ_latency ≈ 15 and the policy at
    the cheapest steps after 60 epochs on the extended environment (gamma 0, margin
    (0.15, 0.10)), where 0.2 came within 1.3× the oracle's MSE with ≤ 5% of episodes over (seeds 0–2)."""
    lambda_max: float = 20.0
    """Upper bound of each multiplier (CVPO's dual bound)."""
    cost_margin: float | tuple[float, float] = 0.0
    """Fraction of each limit kept free (one for both, or (latency, energy)): the multipliers
    rise while the episode-average cost exceeds (1 − margin) × limit. 0 is the paper's
    (cost / limit − 1); a margin keeps most episodes, whose averages spread around the
    policy's mean, inside the limit (as `CVPOConfig.cost_margin`)."""
    cost_clip: float = 10.0
    """Largest normalised per-request cost (cost / limit) the critics are trained on."""
    seed: int = 0
    """Seed of networks, exploration and training episodes."""


# ---------------------------------------------------------------------------------------
# Continuous action → plan
# ---------------------------------------------------------------------------------------
class ActionMap:
    """a ∈ [0, 1]^k → (plan index into `PlanSpace.from_config(config)`, merge ratio).

    With S = sorted step counts (n of them), M = `max_merge_ratio` and D the split points:

    - a0 → steps S[min(int((n − 1)·a0 + 1e-9), n − 1)]. For S = 4…12 this is the paper's
      L = int(8·a0) + 4: a0 = 0 → 4, 0.5 → 8, 1 → 12, so the last step count is chosen
      only at a0 = 1 exactly (noise clipped to [0, 1], or a saturated sigmoid). The 1e-9
      keeps a bin edge reached by rounding in its bin: a0 = 0.3/0.8 gives 8·a0 =
      2.9999999999999996, and 7 steps as for 3/8.
    - a1 → merge ratio min(a1, M) (the paper clips its U(0, 1) ratio at 0.75); with the
      discrete head, the nearest of `merge_ratios` (ties to the smaller). Only the split
      that merges ("decoder") uses it; the others report 0.
    - a2, present only when len(D) > 1 → D[min(int(len(D)·a2), len(D) − 1)] (equal bins,
      in `EnvConfig.splits` order).

    Components outside [0, 1] are clipped first.
    """

    STEPS_EPS = 1e-9

    def __init__(self, config: EnvConfig) -> None:
        self.config = config
        self.space = PlanSpace.from_config(config)
        self.steps = np.array(sorted(set(config.steps)))
        self.bins = np.asarray(config.merge_ratios, dtype=np.float64)
        self.splits = config.splits
        self.dim = 3 if len(config.splits) > 1 else 2
        discrete = config.merge_head == "discrete"
        # plan index per (split, steps, merge bin); splits that do not merge fill every bin
        lookup = np.full((len(self.splits), len(self.steps), len(self.bins) if discrete else 1), -1)
        for i in range(self.space.size):
            d = self.splits.index(SPLIT_CODES[self.space.split[i]])
            s = int(np.searchsorted(self.steps, self.space.steps[i]))
            if discrete and self.space.merges[i]:
                lookup[d, s, int(np.flatnonzero(self.bins == self.space.merge_ratio[i])[0])] = i
            else:
                lookup[d, s, :] = i
        self.lookup = lookup

    def __call__(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """action [B, k] → (plan [B] int, merge ratio [B] float64, 0 where the plan does not merge)."""
        a = np.clip(np.asarray(action, dtype=np.float64), 0.0, 1.0)
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise InvalidInputError(f"action must have shape [B, {self.dim}], got {list(a.shape)}")
        n = len(self.steps)
        step_index = np.minimum(((n - 1) * a[:, 0] + self.STEPS_EPS).astype(np.int64), n - 1)
        ratio = np.minimum(a[:, 1], self.config.max_merge_ratio)
        if self.config.merge_head == "discrete":
            bin_index = np.argmin(np.abs(ratio[:, None] - self.bins[None]), axis=1)  # first of ties
            merge = self.bins[bin_index]
        else:
            bin_index, merge = np.zeros(len(a), dtype=np.int64), ratio
        if self.dim == 3:
            d = len(self.splits)
            split_index = np.minimum((d * a[:, 2]).astype(np.int64), d - 1)
        else:
            split_index = np.zeros(len(a), dtype=np.int64)
        plan = self.lookup[split_index, step_index, bin_index]
        return plan, np.where(self.space.merges[plan], merge, 0.0)


# ---------------------------------------------------------------------------------------
# Networks and the agent
# ---------------------------------------------------------------------------------------
class DeterministicActor(nn.Module):
    """μ(s) = sigmoid(u(s)), u an MLP: features [..., obs_dim] → a [..., action_dim] in (0, 1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = MLP(obs_dim, hidden, action_dim)

    def preactivation(self, obs: Tensor) -> Tensor:
        return self.net(obs)  # type: ignore[no-any-return]

    def forward(self, obs: Tensor) -> Tensor:
        return torch.sigmoid(self.net(obs))


class ActionCritics(nn.Module):
    """Q(s, a) for the reward and each cost: three MLPs over [features(s), a].

    Outputs are multiplied by `scale` (the return horizon 1/(1 − γ)), so the networks work
    at per-step magnitudes.
    """

    HEADS = ("reward", "latency", "energy")

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int], scale: float) -> None:
        super().__init__()
        self.nets = nn.ModuleList([MLP(obs_dim + action_dim, hidden, 1) for _ in self.HEADS])
        self.scale = scale

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        """obs [..., obs_dim], action [..., action_dim] → Q [..., 3] (reward, latency, energy)."""
        x = torch.cat([obs, action.to(obs.dtype)], dim=-1)
        return torch.cat([net(x) for net in self.nets], dim=-1) * self.scale


def exploration_std(config: DDPGLagrangianConfig, epoch: int) -> float:
    """Noise std of EPOCH: noise_std · noise_decay^(epochs after warm-up), floored at noise_std_min."""
    decayed = config.noise_std * config.noise_decay ** max(0, epoch - config.warmup_epochs)
    return max(config.noise_std_min, decayed)


class DDPGAgent:
    """Deterministic actor, critics and multipliers over an environment's plan set."""

    name = "ddpg-lagrangian"

    def __init__(self, env_config: EnvConfig, config: DDPGLagrangianConfig) -> None:
        self.env_config, self.config = env_config, config
        self.action_map = ActionMap(env_config)
        dim = self.action_map.dim
        self.actor = DeterministicActor(OBS_DIM, dim, config.hidden)
        self.critic = ActionCritics(OBS_DIM, dim, config.critic_hidden, scale=1.0 / (1.0 - config.gamma))
        self.lambdas = np.zeros(2)
        # the std act(deterministic=False) explores with: the last training epoch's
        self.noise_std = exploration_std(config, config.epochs - 1)

    @torch.no_grad()
    def action(self, feats: Tensor, *, noise_std: float, generator: torch.Generator) -> Tensor:
        """a = clip(μ(s) + N(0, noise_std²), 0, 1): features [B, obs_dim] → [B, k]."""
        a = self.actor(feats)
        if noise_std > 0:
            a = (a + noise_std * torch.randn(a.shape, generator=generator)).clamp(0.0, 1.0)
        return a

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        if sim.space.size != self.action_map.space.size:
            raise InvalidInputError(f"the simulator has {sim.space.size} plans; the agent was built for "
                                    f"{self.action_map.space.size}")
        a = self.action(torch.from_numpy(sim.features(obs)), noise_std=0.0 if deterministic else self.noise_std,
                        generator=generator)
        return self.action_map(a.numpy())

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(path, algo=self.name, modules={"actor": self.actor, "critic": self.critic},
                               duals={"lambda": [float(x) for x in self.lambdas]},
                               config=self.config, env_config=self.env_config, extra=extra)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> DDPGAgent:
        cfg = dict(ckpt.config)
        cfg["hidden"], cfg["critic_hidden"] = tuple(cfg["hidden"]), tuple(cfg["critic_hidden"])
        if isinstance(cfg.get("cost_margin"), list):
            cfg["cost_margin"] = tuple(cfg["cost_margin"])
        agent = cls(ckpt.env_config, DDPGLagrangianConfig(**cfg))
        agent.actor.load_state_dict(ckpt.state_dict("actor"))
        agent.critic.load_state_dict(ckpt.state_dict("critic"))
        agent.lambdas = np.asarray(ckpt.duals["lambda"], dtype=np.float64)
        return agent


def update_lambdas(lambdas: np.ndarray, episode_cost_ratio: np.ndarray, config: DDPGLagrangianConfig) -> np.ndarray:
    """One projected ascent step: λ [2], episode-average cost / limit [2] (latency, energy) → λ [2]."""
    target = 1.0 - np.broadcast_to(np.asarray(config.cost_margin, dtype=np.float64), (2,))
    return np.clip(lambdas + config.lambda_lr * (np.asarray(episode_cost_ratio) - target), 0.0, config.lambda_max)


# ---------------------------------------------------------------------------------------
# Replay of n-step transitions
# ---------------------------------------------------------------------------------------
def _n_step(feats: np.ndarray, action: np.ndarray, signals: np.ndarray, next_feats: np.ndarray,
            config: DDPGLagrangianConfig) -> dict[str, np.ndarray]:
    """Flat n-step transitions from [T, B, ...] arrays; episode ends are truncations (bootstrap).

    signals [T, B, 3]: reward and the two normalised costs of each step.
    """
    ret, disc, boot = n_step_returns(signals, next_feats, n_step=config.n_step, gamma=config.gamma)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return {"feats": flat(feats), "action": flat(action), "ret": flat(ret), "disc": flat(disc),
            "next_feats": flat(boot)}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def train_ddpg_lagrangian(env_config: EnvConfig = EnvConfig(),
                          config: DDPGLagrangianConfig = DDPGLagrangianConfig(), *,
                          simulator: PlanSimulator | None = None,
                          on_epoch: Callable[[int, dict[str, float]], None] | None = None
                          ) -> tuple[DDPGAgent, list[dict[str, float]]]:
    """Train DDPG-Lagrangian; returns the agent and one row of metrics per epoch.

    The rows hold the collected (exploring) episodes' `EpisodeStats.summary()`, the
    multipliers after the epoch's ascent step, the last critic loss and the noise std.
    """
    torch.manual_seed(config.seed)
    sim = simulator if simulator is not None else PlanSimulator(env_config)
    env = sim.config
    agent = DDPGAgent(env, config)
    space, action_map = sim.space, agent.action_map
    if space.size != action_map.space.size:
        raise InvalidInputError(f"simulator has {space.size} plans, its config describes {action_map.space.size}")
    target_actor, target_critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    for p in (*target_actor.parameters(), *target_critic.parameters()):
        p.requires_grad_(False)
    actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=config.actor_lr)
    critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=config.critic_lr)
    replay = Replay(config.replay_size)
    gen = torch.Generator().manual_seed(config.seed)
    limits = np.array([env.latency_limit_s, env.energy_limit_j])
    history: list[dict[str, float]] = []
    critic_loss = torch.zeros(())

    for epoch in range(config.epochs):
        start = time.perf_counter()
        noise_std = exploration_std(config, epoch)
        # 1. collect
        obs = sim.reset(config.episodes_per_epoch, config.seed * 100_003 + epoch)
        feats_l, action_l, sig_l, cost_l, mse_l, next_l = [], [], [], [], [], []
        for _ in range(env.episode_length):
            feats = sim.features(obs)
            if epoch < config.warmup_epochs:
                a = torch.rand(len(obs), action_map.dim, generator=gen)
            else:
                a = agent.action(torch.from_numpy(feats), noise_std=noise_std, generator=gen)
            plan, merge = action_map(a.numpy())
            r = sim.step(space.split[plan], space.steps[plan], merge)
            cost = np.stack([r.latency_s, r.energy_j], -1)
            feats_l.append(feats)
            action_l.append(a.numpy())
            sig_l.append(np.concatenate([r.reward[:, None], np.minimum(cost / limits, config.cost_clip)], -1))
            cost_l.append(cost)
            mse_l.append(r.mse)
            next_l.append(sim.features(r.obs))
            obs = r.obs
        # 2. n-step transitions
        replay.add(**_n_step(np.stack(feats_l), np.stack(action_l), np.stack(sig_l), np.stack(next_l), config))
        # 3. multipliers from the episodes' average costs (unclipped: the constraint is on these);
        # warm-up episodes are random actions, whose costs say nothing about the actor's
        costs = np.stack(cost_l)  # [T, B, 2]
        if epoch >= config.warmup_epochs:
            agent.lambdas = update_lambdas(agent.lambdas, costs.mean((0, 1)) / limits, config)
        lam = torch.from_numpy(agent.lambdas).float()
        # 4-5. critics, actor, targets
        for _ in range(config.updates_per_epoch):
            b = replay.sample(config.batch_size, gen)
            with torch.no_grad():
                y = b["ret"] + b["disc"][:, None] * target_critic(b["next_feats"], target_actor(b["next_feats"]))
            q = agent.critic(b["feats"], b["action"])
            critic_loss = ((q - y) ** 2 / agent.critic.scale**2).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            u = agent.actor.preactivation(b["feats"])
            q_pi = agent.critic(b["feats"], torch.sigmoid(u)) / agent.critic.scale
            objective = q_pi[:, 0] - q_pi[:, 1:] @ lam
            actor_loss = -objective.mean() / (1.0 + lam.sum()) + config.preactivation_l2 * (u**2).mean()
            actor_opt.zero_grad()
            actor_loss.backward()  # the critics' gradients from here are cleared before their next step
            actor_opt.step()
            soft_update(target_critic, agent.critic, config.tau)
            soft_update(target_actor, agent.actor, config.tau)
        agent.noise_std = noise_std
        stats = EpisodeStats(np.stack(sig_l)[..., 0].mean(0), np.stack(mse_l).mean(0), costs[..., 0].mean(0),
                             costs[..., 1].mean(0), env.latency_limit_s, env.energy_limit_j)
        row = {"epoch": float(epoch), **stats.summary(), "lambda_latency": float(agent.lambdas[0]),
               "lambda_energy": float(agent.lambdas[1]), "critic_loss": float(critic_loss.detach()),
               "noise_std": noise_std, "seconds": time.perf_counter() - start}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
    return agent, history
