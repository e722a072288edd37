"""MEG-CVPO: constrained variational policy optimisation (PAPERS.md §1; Liu et al., ICML 2022).

Reads top to bottom:

1. Collect episodes with the current policy into an n-step replay buffer.
2. Critics: Q_r, Q_latency, Q_energy, each fit by n-step TD to a soft-updated target
   (E over the next plan taken exactly over the plan set, or by K samples).
3. E-step: for a batch of states, minimise the convex dual
       g(η, λ) = η·ε + Σ_i λ_i·q̄_i + η·E_s log Σ_a π_old(a|s) exp((Q_r − Σ_i λ_i Q_ci)/η)
   over η, λ ∈ [dual_min, dual_max] (L-BFGS-B with the analytic gradient). The sum over
   a is exact over the discrete plan set; for the continuous merge head it is a mean over
   K actions sampled from π_old. The non-parametric target is
       q(a|s) ∝ π_old(a|s) exp((Q_r − Σ_i λ_i Q_ci)/η).
4. M-step: weighted maximum likelihood of q under a KL trust region to π_old: a
   categorical KL bound for the plan head; for the Gaussian merge head the decoupled
   bounds of MPO (mean KL with the old std, std KL with the old mean), each with its
   own Lagrange multiplier.

Costs enter the algorithm divided by their limits (and clipped at `cost_clip`), so one
unit of normalised cost per step is "exactly at the limit"; the budget q̄_i is
(1 − cost_margin)/(1 − γ), the discounted return of a per-step cost (1 − cost_margin).
The margin keeps episode averages, which fluctuate with the channel, inside the limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from meg.policy.agents import EpisodeStats, Rollout, rollout
from meg.policy.checkpoint import Checkpoint, save_checkpoint
from meg.policy.env import OBS_DIM, EnvConfig, PlanSimulator
from meg.policy.nets import PlanActor, QCritic, merge_from_u
from meg.policy.replay import Replay, n_step_returns, soft_update

__all__ = ["CVPOAgent", "CVPOConfig", "DualSolution", "solve_estep_dual", "train_cvpo"]


@dataclass(frozen=True)
class CVPOConfig:
    """Hyper-parameters of MEG-CVPO (defaults from PAPERS.md §1 where the paper gives them)."""

    epochs: int = 60
    """Training epochs (collect, then update)."""
    episodes_per_epoch: int = 8
    """Episodes collected per epoch (stepped together)."""
    updates_per_epoch: int = 64
    """Gradient updates (critic, E-step, M-step) per epoch."""
    warmup_epochs: int = 2
    """Epochs collected with uniformly random plans before the policy acts."""
    batch_size: int = 256
    """States per update (paper: 256)."""
    replay_size: int = 100_000
    """Transitions kept in the replay buffer."""
    gamma: float = 0.97
    """Discount (paper: 0.97). The channel evolves independently of the plans, so a request's
    plan changes only its own reward and costs (and the next state's previous-cost inputs):
    0 makes each critic an exact one-step model, which learns faster and steadier here (the
    extended environment's shipped checkpoint uses 0)."""
    n_step: int = 2
    """TD horizon of the critics (paper: 2-step)."""
    tau: float = 0.05
    """Soft target update rate (paper: 0.05)."""
    hidden: tuple[int, ...] = (128, 128)
    """Actor hidden layers (paper: 128, 128)."""
    critic_hidden: tuple[int, ...] = (128, 128)
    """Hidden layers of each critic (one output per plan)."""
    actor_lr: float = 5e-4
    """Actor learning rate (paper: 5e-4)."""
    critic_lr: float = 1e-3
    """Critic learning rate (paper: 1e-3)."""
    estep_kl: float = 0.02
    """E-step KL bound ε between q and π_old (paper: 0.02)."""
    dual_min: float = 1e-6
    """Lower bound of η and λ (paper: 1e-6)."""
    dual_max: float = 20.0
    """Upper bound of η and λ (paper: 20)."""
    action_samples: int = 32
    """K actions sampled per state for the continuous head (paper: 32)."""
    kl_categorical: float = 0.05
    """M-step KL bound of the plan head (the paper's head is Gaussian only)."""
    old_policy_period: int = 16
    """Updates between refreshes of π_old (the E-step prior and the trust-region centre)."""
    kl_mean: float = 0.005
    """M-step KL bound of the Gaussian mean (paper: 0.005)."""
    kl_std: float = 0.0005
    """M-step KL bound of the Gaussian std (paper: 0.0005)."""
    mstep_dual_lr: float = 0.01
    """Adam learning rate of the M-step trust-region multipliers (log-parametrised)."""
    cost_margin: float | tuple[float, float] = 0.0
    """Fraction of each limit kept free (one for both, or (latency, energy)): per-step budget =
    (1 − margin) × limit. 0 is the paper's budget (the limit itself); a policy that spends it
    exactly has about half its episodes above the limit, since episode averages spread around
    the policy's mean cost. A margin (an extension) keeps ≤ 5% of episodes above: the spread
    differs per cost (in the extended environment a trained policy's episode-average latency
    varies ~6× more than its energy: airtime in deep fades), and every unit of margin is
    budget not spent on steps. The extended environment's shipped checkpoint uses
    (0.15, 0.10) with `EnvConfig.reward_mse_offset` 1e-3 (≈ 1.0× the oracle's MSE, ≤ 5% over)."""
    cost_clip: float = 10.0
    """Largest normalised per-request cost (cost / limit) the critics are trained on."""
    seed: int = 0
    """Seed of networks, exploration and training episodes."""


# ---------------------------------------------------------------------------------------
# E-step: the convex dual
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DualSolution:
    eta: float
    lambdas: np.ndarray  # [C]
    weights: np.ndarray  # [N, A] target q(a|s), rows sum to 1
    value: float  # g(η, λ) at the solution


def _dual(x: np.ndarray, q_r: np.ndarray, q_c: np.ndarray, log_prior: np.ndarray,
          budgets: np.ndarray, epsilon: float) -> tuple[float, np.ndarray, np.ndarray]:
    """g(η, λ), its gradient, and the target weights; q_r [N,A], q_c [N,A,C], log_prior [N,A]."""
    eta, lam = x[0], x[1:]
    adv = (q_r - q_c @ lam) / eta  # [N, A]
    z = log_prior + adv
    zmax = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]  # [N]
    w = np.exp(z - lse[:, None])
    value = eta * epsilon + lam @ budgets + eta * lse.mean()
    d_eta = epsilon + lse.mean() - (w * adv).sum(axis=1).mean()
    d_lam = budgets - np.einsum("na,nac->c", w, q_c) / q_r.shape[0]
    return float(value), np.concatenate([[d_eta], d_lam]), w


def solve_estep_dual(q_reward: np.ndarray, q_costs: np.ndarray, log_prior: np.ndarray,
                     budgets: np.ndarray, *, epsilon: float, dual_min: float = 1e-6,
                     dual_max: float = 20.0, x0: np.ndarray | None = None) -> DualSolution:
    """Minimise CVPO's E-step dual g(η, λ) over the box [dual_min, dual_max]^(1+C).

    Args:
        q_reward: [N, A] Q_r of A candidate actions in N states.
        q_costs: [N, A, C] Q of each of C costs.
        log_prior: [N, A] log π_old(a|s) (discrete set) or log(1/K) (K samples).
        budgets: [C] cost budgets q̄_i.
        epsilon: KL bound ε.
    Returns:
        η, λ, the target weights q(a|s) ∝ π_old exp((Q_r − λ·Q_c)/η), and g at the optimum.
    """
    q_reward = np.asarray(q_reward, dtype=np.float64)
    q_costs = np.asarray(q_costs, dtype=np.float64)
    log_prior = np.asarray(log_prior, dtype=np.float64)
    budgets = np.asarray(budgets, dtype=np.float64)
    n_costs = budgets.shape[0]
    start = np.concatenate([[1.0], np.full(n_costs, 1.0)]) if x0 is None else np.clip(x0, dual_min, dual_max)
    result = scipy.optimize.minimize(
        lambda x: _dual(x, q_reward, q_costs, log_prior, budgets, epsilon)[:2],
        start, jac=True, method="L-BFGS-B", bounds=[(dual_min, dual_max)] * (1 + n_costs),
        options={"maxiter": 200, "ftol": 1e-12, "gtol": 1e-9})
    value, _, weights = _dual(result.x, q_reward, q_costs, log_prior, budgets, epsilon)
    return DualSolution(float(result.x[0]), result.x[1:].copy(), weights, value)


# ---------------------------------------------------------------------------------------
# The agent (what acts and what is saved)
# ---------------------------------------------------------------------------------------
class CVPOAgent:
    """Actor (+ critics while training) over a simulator's plan set."""

    name = "cvpo"

    def __init__(self, env_config: EnvConfig, config: CVPOConfig, n_plans: int) -> None:
        self.env_config, self.config = env_config, config
        self.actor = PlanActor(OBS_DIM, n_plans, config.hidden)
        self.critic = QCritic(OBS_DIM, n_plans, config.critic_hidden, scale=1.0 / (1.0 - config.gamma))
        self.log_alpha = torch.zeros(3)  # M-step multipliers: categorical, mean, std
        self.eta = 1.0
        self.lambdas = np.ones(2)

    def distribution(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, mean, std = self.actor(feats)
        return torch.log_softmax(logits, dim=-1), mean, std

    @torch.no_grad()
    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        feats = torch.from_numpy(sim.features(obs))
        logp, mean, std = self.distribution(feats)
        if deterministic:
            plan, u = logp.argmax(-1), mean
        else:
            plan = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            u = mean + std * torch.randn(mean.shape, generator=generator)
        if self.env_config.merge_head == "continuous":
            merge = merge_from_u(u, self.env_config.max_merge_ratio).double().numpy()
        else:
            merge = sim.space.merge_ratio[plan.numpy()]
        return plan.numpy(), merge

    def duals(self) -> dict[str, float | list[float]]:
        return {"eta": self.eta, "lambda": [float(x) for x in self.lambdas],
                "alpha": [float(x) for x in self.log_alpha.exp()]}

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(path, algo="cvpo", modules={"actor": self.actor, "critic": self.critic},
                               duals=self.duals(), config=self.config, env_config=self.env_config, extra=extra)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> CVPOAgent:
        cfg = dict(ckpt.config)
        cfg["hidden"], cfg["critic_hidden"] = tuple(cfg["hidden"]), tuple(cfg["critic_hidden"])
        if isinstance(cfg.get("cost_margin"), list):
            cfg["cost_margin"] = tuple(cfg["cost_margin"])
        config = CVPOConfig(**cfg)
        n_plans = ckpt.state_dict("actor")["logits.weight"].shape[0]
        agent = cls(ckpt.env_config, config, n_plans)
        agent.actor.load_state_dict(ckpt.state_dict("actor"))
        agent.critic.load_state_dict(ckpt.state_dict("critic"))
        agent.eta = float(ckpt.duals["eta"][0])
        agent.lambdas = np.asarray(ckpt.duals["lambda"])
        agent.log_alpha = torch.tensor(ckpt.duals["alpha"]).log()
        return agent


# ---------------------------------------------------------------------------------------
# Replay of n-step transitions
# ---------------------------------------------------------------------------------------
def _n_step(ro: Rollout, sim: PlanSimulator, cfg: CVPOConfig) -> dict[str, np.ndarray]:
    """n-step returns of reward and normalised costs; episode ends are truncations (bootstrap)."""
    env = sim.config
    # normalised costs, clipped at cost_clip: a plan 10× over a limit is as unacceptable as one
    # 1000× over (deep fades), and the unclipped tail would dominate the critics' squared error
    costs = np.minimum(np.stack([ro.latency_s / env.latency_limit_s, ro.energy_j / env.energy_limit_j], -1),
                       cfg.cost_clip)
    signals = np.concatenate([ro.reward[..., None], costs], -1)
    ret, disc, next_obs = n_step_returns(signals, ro.next_obs, n_step=cfg.n_step, gamma=cfg.gamma)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    return {"feats": flat(sim.features(ro.obs)), "plan": flat(ro.plan.astype(np.float32)),
            "merge": flat(ro.merge_ratio), "ret": flat(ret), "disc": flat(disc),
            "next_feats": flat(sim.features(next_obs))}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def _candidates(actor: PlanActor, critic: QCritic, feats: Tensor, k: int, generator: torch.Generator,
                continuous: bool, max_ratio: float, merges: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Candidate actions per state and their Q: (plan [N,A'], u [N,A'], log prior [N,A'], Q [N,A',3]).

    Discrete head: the whole plan set (A' = A) with prior π_old(a|s). Continuous head:
    K samples (plan, u) from π_old with prior 1/K; plans that do not merge (`merges` [A]
    False) are scored at merge 0, as the environment serves them.
    """
    logits, mean, std = actor(feats)
    logp = torch.log_softmax(logits, dim=-1)
    n, a = logp.shape
    if not continuous:
        return torch.arange(a).expand(n, a), torch.zeros(n, a), logp, critic(feats, torch.zeros(n))
    plan = torch.multinomial(logp.exp(), k, replacement=True, generator=generator)
    u = mean[:, None] + std[:, None] * torch.randn(n, k, generator=generator)
    merge = torch.where(merges[plan], merge_from_u(u, max_ratio), torch.zeros(()))
    q = critic(feats[:, None].expand(n, k, feats.shape[-1]), merge)  # [N,K,A,3]
    q = q.gather(2, plan[:, :, None, None].expand(n, k, 1, 3))[:, :, 0]
    return plan, u, torch.full((n, k), -math.log(k)), q


def train_cvpo(env_config: EnvConfig = EnvConfig(), config: CVPOConfig = CVPOConfig(), *,
               simulator: PlanSimulator | None = None,
               on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> tuple[CVPOAgent, list[dict[str, float]]]:
    """Train MEG-CVPO; returns the agent and one row of metrics per epoch."""
    # One BLAS thread: the E-step's small L-BFGS-B solves slow down many-fold when
    # OpenBLAS spins extra threads on a shared CPU.
    with threadpool_limits(1):
        return _train(env_config, config, simulator, on_epoch)


def _train(env_config: EnvConfig, config: CVPOConfig, simulator: PlanSimulator | None,
           on_epoch: Callable[[int, dict[str, float]], None] | None) -> tuple[CVPOAgent, list[dict[str, float]]]:
    torch.manual_seed(config.seed)
    sim = simulator if simulator is not None else PlanSimulator(env_config)
    space = sim.space
    continuous = env_config.merge_head == "continuous"
    agent = CVPOAgent(env_config, config, space.size)
    target = QCritic(OBS_DIM, space.size, config.critic_hidden, scale=agent.critic.scale)
    target.load_state_dict(agent.critic.state_dict())
    # π_old: the policy the episodes were collected with, frozen for the epoch's updates
    old_actor = PlanActor(OBS_DIM, space.size, config.hidden)
    actor_opt = torch.optim.Adam(agent.actor.parameters(), lr=config.actor_lr)
    critic_opt = torch.optim.Adam(agent.critic.parameters(), lr=config.critic_lr)
    agent.log_alpha.requires_grad_(True)
    alpha_opt = torch.optim.Adam([agent.log_alpha], lr=config.mstep_dual_lr)
    replay = Replay(config.replay_size)
    merges = torch.from_numpy(space.merges)
    budgets = (1.0 - np.broadcast_to(np.asarray(config.cost_margin, dtype=np.float64), (2,))) / (1.0 - config.gamma)
    kl_bounds = torch.tensor([config.kl_categorical, config.kl_mean, config.kl_std])
    gen = torch.Generator().manual_seed(config.seed)
    random_agent = _UniformAgent(space.size, env_config)
    history: list[dict[str, float]] = []
    x0: np.ndarray | None = None

    for epoch in range(config.epochs):
        start = time.perf_counter()
        # 1. collect
        actor = random_agent if epoch < config.warmup_epochs else agent
        ro, stats = rollout(actor, sim, batch=config.episodes_per_epoch, seed=config.seed * 100_003 + epoch,
                            deterministic=False, generator=gen)
        replay.add(**_n_step(ro, sim, config))
        kls = torch.zeros(3)
        for update in range(config.updates_per_epoch):
            if update % config.old_policy_period == 0:
                old_actor.load_state_dict(agent.actor.state_dict())
            b = replay.sample(config.batch_size, gen)
            plan = b["plan"].long()
            # 2. critics: n-step TD to the target critic under the current policy
            with torch.no_grad():
                _, _, nlogp, q_next = _candidates(agent.actor, target, b["next_feats"], config.action_samples,
                                                  gen, continuous, env_config.max_merge_ratio, merges)
                weight = nlogp.exp()  # π(a|s') over the plan set, or 1/K over samples
                v_next = (weight[..., None] * q_next).sum(1)
                y = b["ret"] + b["disc"][:, None] * v_next
            merge_in = b["merge"] if continuous else torch.zeros_like(b["merge"])
            q = agent.critic(b["feats"], merge_in).gather(1, plan[:, None, None].expand(-1, 1, 3))[:, 0]
            critic_loss = ((q - y) ** 2 / agent.critic.scale**2).mean()
            critic_opt.zero_grad()
            critic_loss.backward()
            critic_opt.step()
            # 3. E-step
            with torch.no_grad():
                cplan, cu, clogp, qc_t = _candidates(old_actor, target, b["feats"], config.action_samples,
                                                     gen, continuous, env_config.max_merge_ratio, merges)
                qc = qc_t.double().numpy()
                old_logits, old_mean, old_std = old_actor(b["feats"])
                old_logp = torch.log_softmax(old_logits, dim=-1)
            sol = solve_estep_dual(qc[..., 0], qc[..., 1:], clogp.double().numpy(), budgets,
                                   epsilon=config.estep_kl, dual_min=config.dual_min, dual_max=config.dual_max, x0=x0)
            x0 = np.concatenate([[sol.eta], sol.lambdas])
            agent.eta, agent.lambdas = sol.eta, sol.lambdas
            w = torch.from_numpy(sol.weights).float()
            # 4. M-step: weighted MLE under KL trust regions
            logp, mean, std = agent.distribution(b["feats"])
            kl_cat = (old_logp.exp() * (old_logp - logp)).sum(-1).mean()
            if continuous:
                nll_cat = -(w * logp.gather(1, cplan)).sum(1).mean()
                # the Gaussian learns only from samples whose plan merges (renormalised per state)
                wm = w * merges[cplan]
                wm = wm / wm.sum(1, keepdim=True).clamp_min(1e-12)
                log_n = lambda x, m, s: -0.5 * ((x - m) / s) ** 2 - torch.log(s)  # noqa: E731
                nll_mean = -(wm * log_n(cu, mean[:, None], old_std[:, None])).sum(1).mean()
                nll_std = -(wm * log_n(cu, old_mean[:, None], std[:, None])).sum(1).mean()
                kl_mean = (0.5 * ((mean - old_mean) / old_std) ** 2).mean()
                kl_std = (torch.log(std / old_std) + old_std**2 / (2 * std**2) - 0.5).mean()
                nll = nll_cat + nll_mean + nll_std
            else:
                nll = -(w * logp).sum(1).mean()
                kl_mean = kl_std = torch.zeros(())
            kls = torch.stack([kl_cat, kl_mean, kl_std])
            alpha = agent.log_alpha.exp()
            actor_loss = nll + (alpha.detach() * kls).sum()
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            alpha_loss = (agent.log_alpha.exp() * (kl_bounds - kls.detach())).sum()
            alpha_opt.zero_grad()
            alpha_loss.backward()
            alpha_opt.step()
            with torch.no_grad():
                agent.log_alpha.clamp_(-10.0, 10.0)
            soft_update(target, agent.critic, config.tau)
        row = _epoch_row(epoch, stats, agent, float(critic_loss.detach()), kls.detach(), time.perf_counter() - start)
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
    agent.log_alpha = agent.log_alpha.detach()
    return agent, history


def _epoch_row(epoch: int, stats: EpisodeStats, agent: CVPOAgent, critic_loss: float, kls: Tensor,
               seconds: float) -> dict[str, float]:
    row = {"epoch": float(epoch), **stats.summary(), "eta": agent.eta,
           "lambda_latency": float(agent.lambdas[0]), "lambda_energy": float(agent.lambdas[1]),
           "critic_loss": critic_loss, "kl_categorical": float(kls[0]), "seconds": seconds}
    return row


class _UniformAgent:
    """Warm-up exploration: uniform plans and merge ratios."""

    name = "uniform"

    def __init__(self, n_plans: int, env_config: EnvConfig) -> None:
        self.n_plans, self.env_config = n_plans, env_config

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        b = obs.shape[0]
        plan = torch.randint(self.n_plans, (b,), generator=generator).numpy()
        if self.env_config.merge_head == "continuous":
            merge = self.env_config.max_merge_ratio * torch.rand(b, generator=generator, dtype=torch.float64).numpy()
        else:
            merge = sim.space.merge_ratio[plan]
        return plan, merge

