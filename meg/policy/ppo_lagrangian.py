"""PPO-Lagrangian with a PID-controlled multiplier (the MEG authors' on-policy baseline).

Reads top to bottom:

1. Collect episodes with the current stochastic policy (plan categorical, and for the
   continuous merge head a Gaussian over u, merge = max·sigmoid(u)).
2. GAE advantages for the reward and for each cost (costs divided by their limits).
3. Multipliers: λ_i = max(0, Kp·e_i + Ki·Σe_i + Kd·Δe_i), e_i = episode-average
   normalised cost − (1 − margin) (Stooke et al., 2020, "PID Lagrangian").
4. PPO clipped-surrogate updates on A_r − Σ λ_i A_ci (scaled by 1/(1 + Σ λ_i)) and value
   regression for all three heads.

With `lagrangian="none"` the multipliers stay 0: the unconstrained (reward-only) agent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from meg.policy.agents import EpisodeStats
from meg.policy.checkpoint import Checkpoint, save_checkpoint
from meg.policy.env import OBS_DIM, EnvConfig, PlanSimulator
from meg.policy.nets import MLP, PlanActor, merge_from_u

__all__ = ["PPOAgent", "PPOLagrangianConfig", "train_ppo_lagrangian"]


@dataclass(frozen=True)
class PPOLagrangianConfig:
    """Hyper-parameters of PPO-Lagrangian."""

    epochs: int = 150
    """Training epochs (collect, then update)."""
    episodes_per_epoch: int = 16
    """Episodes collected per epoch (stepped together)."""
    gamma: float = 0.97
    """Discount."""
    gae_lambda: float = 0.95
    """GAE λ."""
    hidden: tuple[int, ...] = (128, 128)
    """Actor and value hidden layers."""
    lr: float = 3e-4
    """Adam learning rate of actor and values."""
    update_epochs: int = 4
    """Passes over each batch."""
    minibatch_size: int = 256
    """Transitions per gradient step."""
    clip: float = 0.2
    """PPO ratio clip."""
    entropy_coef: float = 0.01
    """Entropy bonus of the plan head."""
    lagrangian: Literal["pid", "none"] = "pid"
    """"pid": PID Lagrangian multipliers; "none": reward only (unconstrained)."""
    pid_kp: float = 1.0
    """Proportional gain on the normalised constraint error."""
    pid_ki: float = 0.1
    """Integral gain."""
    pid_kd: float = 0.0
    """Derivative gain."""
    cost_margin: float | tuple[float, float] = 0.0
    """Fraction of each limit kept free (one for both, or (latency, energy)): target per-step
    cost = (1 − margin) × limit (as CVPO; 0: the paper's limit itself)."""
    seed: int = 0
    """Seed of networks, exploration and training episodes."""


class PPOAgent:
    """Actor, value heads (reward, latency, energy) and the multipliers."""

    def __init__(self, env_config: EnvConfig, config: PPOLagrangianConfig, n_plans: int, name: str = "ppo-lagrangian") -> None:
        self.env_config, self.config, self.name = env_config, config, name
        self.actor = PlanActor(OBS_DIM, n_plans, config.hidden)
        self.value = MLP(OBS_DIM, config.hidden, 3)
        self.lambdas = np.zeros(2)
        self.integral = np.zeros(2)

    def policy(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, mean, std = self.actor(feats)
        return torch.log_softmax(logits, -1), mean, std

    def log_prob(self, feats: Tensor, plan: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """log π(plan, u | s) (u counts only for the continuous head) and the plan entropy."""
        logp, mean, std = self.policy(feats)
        lp = logp.gather(-1, plan[..., None])[..., 0]
        if self.env_config.merge_head == "continuous":
            lp = lp + torch.distributions.Normal(mean, std).log_prob(u)
        return lp, -(logp.exp() * logp).sum(-1)

    @torch.no_grad()
    def sample(self, feats: Tensor, *, deterministic: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        logp, mean, std = self.policy(feats)
        if deterministic:
            return logp.argmax(-1), mean
        plan = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        return plan, mean + std * torch.randn(mean.shape, generator=generator)

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        plan, u = self.sample(torch.from_numpy(sim.features(obs)), deterministic=deterministic, generator=generator)
        if self.env_config.merge_head == "continuous":
            return plan.numpy(), merge_from_u(u, self.env_config.max_merge_ratio).double().numpy()
        return plan.numpy(), sim.space.merge_ratio[plan.numpy()]

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(path, algo=self.name, modules={"actor": self.actor, "value": self.value},
                               duals={"lambda": [float(x) for x in self.lambdas],
                                      "lambda_integral": [float(x) for x in self.integral]},
                               config=self.config, env_config=self.env_config, extra=extra)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> PPOAgent:
        cfg = dict(ckpt.config)
        cfg["hidden"] = tuple(cfg["hidden"])
        if isinstance(cfg.get("cost_margin"), list):
            cfg["cost_margin"] = tuple(cfg["cost_margin"])
        n_plans = ckpt.state_dict("actor")["logits.weight"].shape[0]
        agent = cls(ckpt.env_config, PPOLagrangianConfig(**cfg), n_plans, name=ckpt.algo)
        agent.actor.load_state_dict(ckpt.state_dict("actor"))
        agent.value.load_state_dict(ckpt.state_dict("value"))
        agent.lambdas = np.asarray(ckpt.duals["lambda"])
        agent.integral = np.asarray(ckpt.duals["lambda_integral"])
        return agent


def _gae(signal: np.ndarray, values: np.ndarray, last_value: np.ndarray, gamma: float, lam: float) -> np.ndarray:
    """GAE over [T, B] with bootstrap at truncation; returns advantages [T, B]."""
    adv = np.zeros_like(signal)
    running = np.zeros(signal.shape[1])
    for t in reversed(range(signal.shape[0])):
        next_v = values[t + 1] if t + 1 < signal.shape[0] else last_value
        delta = signal[t] + gamma * next_v - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def train_ppo_lagrangian(env_config: EnvConfig = EnvConfig(), config: PPOLagrangianConfig = PPOLagrangianConfig(), *,
                         simulator: PlanSimulator | None = None, name: str = "ppo-lagrangian",
                         on_epoch: Callable[[int, dict[str, float]], None] | None = None
                         ) -> tuple[PPOAgent, list[dict[str, float]]]:
    """Train PPO-Lagrangian (or reward-only PPO); returns the agent and per-epoch metrics."""
    torch.manual_seed(config.seed)
    sim = simulator if simulator is not None else PlanSimulator(env_config)
    agent = PPOAgent(env_config, config, sim.space.size, name=name)
    params = [*agent.actor.parameters(), *agent.value.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    target = 1.0 - np.broadcast_to(np.asarray(config.cost_margin, dtype=np.float64), (2,))
    previous_error = np.zeros(2)
    history: list[dict[str, float]] = []
    space = sim.space
    for epoch in range(config.epochs):
        start = time.perf_counter()
        # 1. collect
        obs = sim.reset(config.episodes_per_epoch, config.seed * 100_003 + epoch)
        feats_l, plan_l, u_l, sig_l, mse_l = [], [], [], [], []
        for _ in range(env_config.episode_length):
            feats = torch.from_numpy(sim.features(obs))
            plan, u = agent.sample(feats, deterministic=False, generator=gen)
            p = plan.numpy()
            merge = (merge_from_u(u, env_config.max_merge_ratio).double().numpy()
                     if env_config.merge_head == "continuous" else space.merge_ratio[p])
            r = sim.step(space.split[p], space.steps[p], np.where(space.merges[p], merge, 0.0))
            feats_l.append(feats)
            plan_l.append(plan)
            u_l.append(u)
            sig_l.append(np.stack([r.reward, r.latency_s / env_config.latency_limit_s,
                                   r.energy_j / env_config.energy_limit_j], -1))
            mse_l.append(r.mse)
            obs = r.obs
        feats_t, plan_t, u_t = torch.stack(feats_l), torch.stack(plan_l), torch.stack(u_l)  # [T, B, ...]
        signals = np.stack(sig_l)  # [T, B, 3]
        # 2. advantages per head
        with torch.no_grad():
            values = agent.value(feats_t).double().numpy()
            last = agent.value(torch.from_numpy(sim.features(obs))).double().numpy()
            old_lp, _ = agent.log_prob(feats_t, plan_t, u_t)
        adv = np.stack([_gae(signals[..., i], values[..., i], last[..., i], config.gamma, config.gae_lambda)
                        for i in range(3)], -1)
        returns = adv + values
        # 3. PID multipliers on the episode-average normalised costs
        ep_cost = signals[..., 1:].mean(0).mean(0)
        if config.lagrangian == "pid":
            error = ep_cost - target
            agent.integral = np.maximum(0.0, agent.integral + error)
            agent.lambdas = np.maximum(0.0, config.pid_kp * error + config.pid_ki * agent.integral
                                       + config.pid_kd * (error - previous_error))
            previous_error = error
        lam = agent.lambdas
        combined = (adv[..., 0] - adv[..., 1] * lam[0] - adv[..., 2] * lam[1]) / (1.0 + lam.sum())
        combined = (combined - combined.mean()) / (combined.std() + 1e-8)
        # 4. PPO updates
        n = combined.size
        f_feats, f_plan, f_u, f_old = (x.reshape(n, *x.shape[2:]) for x in (feats_t, plan_t, u_t, old_lp))
        f_adv = torch.from_numpy(combined.reshape(n)).float()
        f_ret = torch.from_numpy(returns.reshape(n, 3)).float()
        scale = torch.tensor([1.0, 1.0, 1.0]) / (1.0 - config.gamma)
        for _ in range(config.update_epochs):
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, config.minibatch_size):
                idx = order[lo:lo + config.minibatch_size]
                lp, entropy = agent.log_prob(f_feats[idx], f_plan[idx], f_u[idx])
                ratio = (lp - f_old[idx]).exp()
                pg = -torch.min(ratio * f_adv[idx], ratio.clamp(1 - config.clip, 1 + config.clip) * f_adv[idx]).mean()
                v_loss = (((agent.value(f_feats[idx]) - f_ret[idx]) / scale) ** 2).mean()
                loss = pg + 0.5 * v_loss - config.entropy_coef * entropy.mean()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.5)
                opt.step()
        lat = signals[..., 1].mean(0) * env_config.latency_limit_s
        en = signals[..., 2].mean(0) * env_config.energy_limit_j
        stats = EpisodeStats(signals[..., 0].mean(0), np.stack(mse_l).mean(0), lat, en,
                             env_config.latency_limit_s, env_config.energy_limit_j)
        row = {"epoch": float(epoch), **stats.summary(), "lambda_latency": float(lam[0]),
               "lambda_energy": float(lam[1]), "seconds": time.perf_counter() - start}
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
    return agent, history
