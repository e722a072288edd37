"""CVPO: the E-step dual against brute force, and convergence on a constrained bandit."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from policy_helpers import one_thread, small_sim

from meg.policy.agents import rollout
from meg.policy.cvpo import CVPOConfig, _dual, solve_estep_dual, train_cvpo

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _random_problem(seed: int, n: int = 6, a: int = 5) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q_r = rng.normal(0, 2, (n, a))
    q_c = rng.uniform(0, 2, (n, a, 2))
    logits = rng.normal(0, 1, (n, a))
    log_prior = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    budgets = np.array([0.9, 1.1])
    return q_r, q_c, log_prior, budgets


@pytest.mark.parametrize("seed", [0, 1])
def test_dual_minimum_matches_brute_force(seed: int) -> None:
    q_r, q_c, log_prior, budgets = _random_problem(seed)
    eps = 0.05
    sol = solve_estep_dual(q_r, q_c, log_prior, budgets, epsilon=eps)

    def g(x: np.ndarray) -> float:
        return _dual(np.clip(x, 1e-6, 20.0), q_r, q_c, log_prior, budgets, eps)[0]

    # brute force: a log grid over the box, then derivative-free refinement from its best point
    grid = np.exp(np.linspace(np.log(1e-3), np.log(20), 16))
    lam_grid = np.concatenate([[1e-6], grid])
    best_value, best_x = min((g(np.array([e, l1, l2])), (e, l1, l2)) for e in grid for l1 in lam_grid for l2 in lam_grid)
    refined = scipy.optimize.minimize(g, np.array(best_x), method="Powell", bounds=[(1e-6, 20)] * 3,
                                      options={"xtol": 1e-10, "ftol": 1e-13, "maxiter": 100000})
    assert sol.value <= best_value + 1e-12
    assert sol.value == pytest.approx(refined.fun, abs=1e-6)
    np.testing.assert_allclose([sol.eta, *sol.lambdas], refined.x, rtol=2e-3, atol=2e-4)


def test_dual_gradient_is_exact() -> None:
    q_r, q_c, log_prior, budgets = _random_problem(3)
    x = np.array([0.7, 0.3, 1.2])
    _, grad, _ = _dual(x, q_r, q_c, log_prior, budgets, 0.05)
    numeric = scipy.optimize.approx_fprime(x, lambda v: _dual(v, q_r, q_c, log_prior, budgets, 0.05)[0], 1e-7)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


def test_dual_solution_solves_the_primal() -> None:
    """The target q from the dual is the primal optimum: max E_q[Q_r] s.t. KL(q‖π) ≤ ε and
    E_q[Q_c] ≤ budget, checked for one state against SLSQP on the simplex."""
    q_r, q_c, log_prior, _ = _random_problem(4, n=1, a=6)
    prior = np.exp(log_prior[0])
    budgets = np.array([float(prior @ q_c[0, :, 0]) * 0.9, 10.0])  # latency binds, energy does not
    eps = 0.3
    sol = solve_estep_dual(q_r, q_c, log_prior, budgets, epsilon=eps)
    assert 1e-6 < sol.eta < 20.0 and 1e-6 < sol.lambdas[0] < 20.0  # interior: the dual is exact
    q = sol.weights[0]
    cons = [{"type": "eq", "fun": lambda p: p.sum() - 1},
            {"type": "ineq", "fun": lambda p: eps - np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(prior)))},
            {"type": "ineq", "fun": lambda p: budgets[0] - p @ q_c[0, :, 0]}]
    primal = scipy.optimize.minimize(lambda p: -(p @ q_r[0]), prior, constraints=cons, bounds=[(1e-12, 1)] * 6,
                                     method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert primal.success
    assert q @ q_r[0] == pytest.approx(-primal.fun, abs=1e-6)
    np.testing.assert_allclose(q, primal.x, atol=1e-4)
    assert q @ q_c[0, :, 0] <= budgets[0] + 1e-6
    assert np.sum(q * np.log(q / prior)) == pytest.approx(eps, abs=1e-6)  # the KL bound is active
    assert sol.lambdas[1] < 1e-4  # the slack constraint has a zero multiplier


def test_cvpo_converges_to_the_constrained_bandit_optimum() -> None:
    # one state (no fading, fixed distance): a constrained bandit over 12 plans
    sim = small_sim(fading="awgn", distance_min_m=250.0, distance_max_m=250.0, latency_limit_s=1.0,
                    energy_limit_j=80.0)
    cfg = CVPOConfig(epochs=14, episodes_per_epoch=4, updates_per_epoch=24, batch_size=64, warmup_epochs=1,
                     cost_margin=0.05, gamma=0.5, hidden=(32, 32), critic_hidden=(32, 32), old_policy_period=8,
                     kl_categorical=0.2, seed=0)
    sim.reset(1, seed=0)
    space = sim.space
    reward, latency_s, energy_j, _ = sim.outcome(space.split[None], space.steps[None], space.merge_ratio[None])
    ok = (latency_s[0] <= 0.95 * 1.0) & (energy_j[0] <= 0.95 * 80.0)
    optimum = int(np.argmax(np.where(ok, reward[0], -np.inf)))
    assert int(np.argmax(reward[0])) != optimum, "the limits must bind for this test to mean anything"
    runner_up = np.sort(np.where(ok, reward[0], -np.inf))[-2]
    assert reward[0, optimum] - runner_up > 0.1
    agent, history = train_cvpo(sim.config, cfg, simulator=sim)
    plan, _ = agent.act(sim, sim.reset(1, seed=99), deterministic=True, generator=torch.Generator())
    assert int(plan[0]) == optimum, (space.describe(int(plan[0])), space.describe(optimum))
    _, stats = rollout(agent, sim, batch=4, seed=7, deterministic=True, generator=torch.Generator())
    assert not stats.latency_violation.any() and not stats.energy_violation.any()
    assert history[0]["latency_violation_rate"] > 0  # the uniform warm-up did violate


def test_cvpo_continuous_head_trains_and_acts() -> None:
    sim = small_sim(merge_head="continuous", episode_length=4)
    cfg = CVPOConfig(epochs=2, episodes_per_epoch=2, updates_per_epoch=3, batch_size=16, warmup_epochs=1,
                     action_samples=8, hidden=(16, 16), critic_hidden=(16, 16))
    agent, history = train_cvpo(sim.config, cfg, simulator=sim)
    assert len(history) == 2 and np.isfinite(history[-1]["eta"])
    _, stats = rollout(agent, sim, batch=3, seed=5, deterministic=True, generator=torch.Generator())
    assert np.isfinite(stats.reward).all()
    plan, merge = agent.act(sim, sim.reset(8, seed=1), deterministic=False, generator=torch.Generator().manual_seed(0))
    assert ((merge >= 0) & (merge <= sim.config.max_merge_ratio)).all() and len(set(merge.round(6))) > 1
