"""DDPG-Lagrangian: the action → plan map, the multipliers, checkpoints, and the constraint at work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from policy_helpers import one_thread, small_sim

from meg.errors import InvalidInputError
from meg.policy.agents import rollout
from meg.policy.baselines import FixedPlanAgent, FixedPlanConfig
from meg.policy.checkpoint import load_checkpoint
from meg.policy.costs import SPLIT_CODES
from meg.policy.ddpg_lagrangian import (
    ActionMap,
    DDPGAgent,
    DDPGLagrangianConfig,
    exploration_std,
    train_ddpg_lagrangian,
    update_lambdas,
)
from meg.policy.env import EnvConfig
from meg.policy.evaluate import LEARNED, make_agent

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

TINY = DDPGLagrangianConfig(epochs=4, episodes_per_epoch=2, updates_per_epoch=4, batch_size=16, warmup_epochs=1,
                            hidden=(16, 16), critic_hidden=(16, 16))
PAPER_STEPS = (4, 5, 6, 7, 8, 9, 10, 11, 12)


def _plan_env(**overrides: object) -> EnvConfig:
    """An environment fixing every field the plan set depends on (no table is loaded)."""
    fields: dict[str, object] = dict(splits=("decoder",), steps=PAPER_STEPS, merge_ratios=(0.0, 0.25, 0.5, 0.75),
                                     max_merge_ratio=0.75, merge_head="continuous")
    fields.update(overrides)
    return EnvConfig(**fields)  # type: ignore[arg-type]


def _decode(amap: ActionMap, *actions: tuple[float, ...]) -> list[tuple[str, int, float]]:
    plan, merge = amap(np.array(actions, dtype=np.float64))
    space = amap.space
    return [(SPLIT_CODES[space.split[p]], int(space.steps[p]), float(m)) for p, m in zip(plan, merge, strict=True)]


def test_steps_follow_the_papers_formula() -> None:
    amap = ActionMap(_plan_env())
    assert amap.dim == 2  # one split: (steps, merge) as in the paper
    assert [s for _, s, _ in _decode(amap, (0.0, 0.0), (0.5, 0.0), (1.0, 0.0))] == [4, 8, 12]
    # L = int(8·a0) + 4 over a grid holding every bin edge and random points between them
    a0 = np.concatenate([np.arange(65) / 64, np.random.default_rng(0).uniform(0, 1, 500)])
    plan, _ = amap(np.stack([a0, np.zeros_like(a0)], 1))
    np.testing.assert_array_equal(amap.space.steps[plan], (8 * a0).astype(int) + 4)
    assert (amap.space.steps[plan] == 12).sum() == 1  # only a0 = 1 reaches the reference's 12 steps
    # the same rule over another step set: (n − 1)·a0 bins, a0 = 1 the last
    coarse = ActionMap(_plan_env(steps=(4, 8, 12)))
    assert [s for _, s, _ in _decode(coarse, (0.0, 0), (0.49, 0), (0.5, 0), (0.99, 0), (1.0, 0))] == [4, 4, 8, 8, 12]
    assert [s for _, s, _ in _decode(coarse, (-0.3, 0), (1.7, 0))] == [4, 12]  # outside [0, 1]: clipped


def test_merge_ratio_is_clipped_and_binned() -> None:
    continuous = ActionMap(_plan_env())
    assert [m for _, _, m in _decode(continuous, (0.5, 0.0), (0.5, 0.3), (0.5, 0.75), (0.5, 0.9), (0.5, 1.0))] == \
        [0.0, 0.3, 0.75, 0.75, 0.75]
    smaller = ActionMap(_plan_env(max_merge_ratio=0.5, merge_ratios=(0.0, 0.5)))
    assert [m for _, _, m in _decode(smaller, (0.5, 0.4), (0.5, 0.9))] == [0.4, 0.5]
    # discrete head: min(a1, max), then the nearest bin (ties to the smaller); the plan is that bin's
    discrete = ActionMap(_plan_env(merge_head="discrete"))
    a1 = [0.0, 0.1, 0.125, 0.2, 0.4, 0.6, 0.74, 0.9, 1.0]
    plan, merge = discrete(np.stack([np.full(len(a1), 0.5), a1], 1))
    np.testing.assert_array_equal(merge, [0.0, 0.0, 0.0, 0.25, 0.5, 0.5, 0.75, 0.75, 0.75])
    np.testing.assert_array_equal(discrete.space.merge_ratio[plan], merge)
    assert (discrete.space.steps[plan] == 8).all()


def test_split_choice_and_every_plan_is_reachable() -> None:
    amap = ActionMap(_plan_env(splits=SPLIT_CODES, merge_head="discrete"))
    assert amap.dim == 3
    third = 1.0 / 3.0
    chosen = _decode(amap, (0, 0.6, 0.0), (0, 0.6, third - 1e-6), (0, 0.6, third + 1e-6), (0, 0.6, 0.6),
                     (0, 0.6, 0.7), (0, 0.6, 1.0))
    assert [s for s, _, _ in chosen] == ["device", "device", "decoder", "decoder", "image", "image"]
    assert [m for _, _, m in chosen] == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]  # only the decoder split merges
    # a grid over [0, 1]^3 reaches every plan, and each plan is what its components name
    g = np.linspace(0, 1, 25)
    actions = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    plan, merge = amap(actions)
    assert set(plan.tolist()) == set(range(amap.space.size))
    split_index = np.minimum((3 * actions[:, 2]).astype(int), 2)
    np.testing.assert_array_equal(amap.space.split[plan], split_index)  # splits in SPLIT_CODES order
    np.testing.assert_array_equal(amap.space.steps[plan], (8 * actions[:, 0] + 1e-9).astype(int) + 4)
    np.testing.assert_array_equal(merge, amap.space.merge_ratio[plan])
    with pytest.raises(InvalidInputError, match=r"\[B, 3\]"):
        amap(np.zeros((4, 2)))


def test_lambda_update_is_a_projected_ascent_step() -> None:
    cfg = DDPGLagrangianConfig(lambda_lr=0.5, lambda_max=3.0, cost_margin=(0.2, 0.1))
    np.testing.assert_allclose(update_lambdas(np.array([1.0, 1.0]), np.array([1.0, 0.5]), cfg), [1.1, 0.8])
    np.testing.assert_allclose(update_lambdas(np.array([0.1, 2.9]), np.array([0.1, 9.0]), cfg), [0.0, 3.0])
    plain = dataclasses.replace(cfg, cost_margin=0.0)  # (cost / limit − 1)
    np.testing.assert_allclose(update_lambdas(np.zeros(2), np.array([1.5, 0.9]), plain), [0.25, 0.0])


def test_lambda_rises_over_the_limit_and_stays_zero_far_below() -> None:
    # every plan is > 10× over this latency limit: λ_latency climbs by lr·(cost/limit − 0.85) per epoch
    over = small_sim(episode_length=4, latency_limit_s=0.05)
    cfg = dataclasses.replace(TINY, epochs=5, lambda_lr=0.01, lambda_max=1e6, cost_margin=0.15)
    _, history = train_ddpg_lagrangian(over.config, cfg, simulator=over)
    lam = [h["lambda_latency"] for h in history]
    assert lam[0] == 0.0  # warm-up episodes are random actions: no step
    expected = 0.0
    for h in history[1:]:
        expected += 0.01 * (h["mean_latency_s"] / 0.05 - 0.85)
        assert h["lambda_latency"] == pytest.approx(expected, rel=1e-9)
    assert all(b > a for a, b in zip(lam[1:], lam[2:], strict=False)) and lam[-1] > 0.5
    # limits far above every plan's cost: both multipliers stay exactly 0
    under = small_sim(episode_length=4, latency_limit_s=1e4, energy_limit_j=1e7)
    _, history = train_ddpg_lagrangian(under.config, dataclasses.replace(TINY, lambda_lr=10.0), simulator=under)
    assert all(h["lambda_latency"] == 0.0 and h["lambda_energy"] == 0.0 for h in history)
    assert all(h["latency_violation_rate"] == 0.0 for h in history)


def test_checkpoint_round_trips_through_make_agent(tmp_path) -> None:
    sim = small_sim(episode_length=4, latency_limit_s=0.8)
    agent, history = train_ddpg_lagrangian(sim.config, TINY, simulator=sim)
    assert len(history) == TINY.epochs and all(np.isfinite(h["critic_loss"]) for h in history)
    assert history[-1]["lambda_latency"] > 0  # the warm-up's random plans are far over 0.8 s
    assert history[-1]["noise_std"] == exploration_std(TINY, TINY.epochs - 1) == agent.noise_std
    path = agent.save(tmp_path / "ddpg", extra={"epochs": TINY.epochs})
    assert load_checkpoint(path).algo == "ddpg-lagrangian" and "ddpg-lagrangian" in LEARNED
    again, env_config = make_agent("ddpg-lagrangian", path)
    assert isinstance(again, DDPGAgent) and env_config == sim.config and again.config == TINY
    np.testing.assert_array_equal(again.lambdas, agent.lambdas)
    assert again.noise_std == agent.noise_std
    for a, b in zip([*agent.actor.state_dict().values(), *agent.critic.state_dict().values()],
                    [*again.actor.state_dict().values(), *again.critic.state_dict().values()], strict=True):
        assert torch.equal(a, b)
    obs = sim.reset(32, seed=11)
    plan, merge = agent.act(sim, obs, deterministic=True, generator=torch.Generator())
    plan2, merge2 = again.act(sim, obs, deterministic=True, generator=torch.Generator())
    np.testing.assert_array_equal(plan, plan2)
    np.testing.assert_array_equal(merge, merge2)
    assert plan.dtype.kind == "i" and ((plan >= 0) & (plan < sim.space.size)).all()
    np.testing.assert_array_equal(merge, sim.space.merge_ratio[plan])  # the discrete head's bins
    # exploring: seeded noise, valid plans, and it does explore
    explore = [again.act(sim, obs, deterministic=False, generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    np.testing.assert_array_equal(explore[0], explore[1])
    assert ((explore[2] >= 0) & (explore[2] < sim.space.size)).all() and not np.array_equal(explore[0], explore[2])
    # served: load_policy gives the actor's deterministic plan for an observation
    from meg.policy.env import features
    from meg.policy.serving import load_policy
    from meg.v1 import generation_pb2, policy_service_pb2

    served = load_policy(path)
    observation = policy_service_pb2.Observation(channel=generation_pb2.ChannelState(snr_db=float(obs[0, 0])),
                                                 previous_latency_s=float(obs[0, 1]), previous_energy_j=float(obs[0, 2]),
                                                 width=64, height=64)
    got = served.decide(observation)
    x = torch.from_numpy(features(obs[:1, 0], obs[:1, 1], obs[:1, 2], obs[:1, 3], sim.config))
    want, _ = again.action_map(again.actor(x).detach().numpy())
    assert got.steps == int(sim.space.steps[want[0]]) and got.policy == "ddpg-lagrangian"
    with pytest.raises(InvalidInputError, match="checkpoint"):
        make_agent("ddpg-lagrangian", None)
    with pytest.raises(InvalidInputError, match="holds 'ddpg-lagrangian'"):
        make_agent("cvpo", path)
    with pytest.raises(InvalidInputError, match="plans"):
        again.act(small_sim(splits=("decoder",)), obs, deterministic=True, generator=torch.Generator())


def test_the_multiplier_keeps_a_binding_latency_limit() -> None:
    # the paper's action (steps, continuous merge), decoder split: 4 steps take ~0.62 s, 8 steps
    # ~1.02 s and 12 steps ~1.42 s, so under a 1 s limit only 4 steps are feasible, while the
    # reward grows with the steps. One-step critics (gamma 0) and a margin, so that 16 short
    # epochs suffice: the comparison below is about the multiplier, not the discount
    sim = small_sim(splits=("decoder",), merge_head="continuous")
    cfg = DDPGLagrangianConfig(epochs=16, episodes_per_epoch=4, updates_per_epoch=32, batch_size=64,
                               hidden=(32, 32), critic_hidden=(32, 32), gamma=0.0, cost_margin=0.15,
                               lambda_lr=2.0, seed=0)
    space = sim.space
    expensive = FixedPlanAgent(FixedPlanConfig("decoder", 12, 0.0))
    _, fixed = rollout(expensive, sim, batch=16, seed=123, deterministic=True, generator=torch.Generator())
    assert fixed.latency_violation.all(), "the limit must bind for this test to mean anything"
    constrained, _ = train_ddpg_lagrangian(sim.config, cfg, simulator=sim)
    reward_only, _ = train_ddpg_lagrangian(sim.config, dataclasses.replace(cfg, lambda_lr=0.0), simulator=sim)
    ro_c, with_lambda = rollout(constrained, sim, batch=16, seed=123, deterministic=True, generator=torch.Generator())
    ro_u, without = rollout(reward_only, sim, batch=16, seed=123, deterministic=True, generator=torch.Generator())
    assert with_lambda.latency_violation.mean() <= 0.1 < fixed.latency_violation.mean()
    # the same networks, seeds and episodes without the multiplier go over: the reward pulls up the steps
    assert without.latency_violation.mean() >= 0.9 and without.reward.mean() > with_lambda.reward.mean()
    assert space.steps[ro_u.plan].mean() > space.steps[ro_c.plan].mean()
    assert constrained.lambdas[0] > 0.0 and reward_only.lambdas[0] == 0.0


def test_cli_offers_ddpg_lagrangian() -> None:
    from meg.policy.cli import eval_command, train_command

    algo = next(p for p in train_command.params if p.name == "algo")
    assert "ddpg-lagrangian" in algo.type.choices  # type: ignore[attr-defined]
    algos = next(p for p in eval_command.params if p.name == "algos")
    assert "ddpg-lagrangian" in (algos.help or "")  # type: ignore[attr-defined]
