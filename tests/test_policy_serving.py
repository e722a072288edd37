"""Checkpoints round-trip (weights and duals), the Policy interface, baselines, PPO, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from policy_helpers import one_thread, small_sim

from meg.cli import main as _main  # noqa: F401  (the console entry point imports)
from meg.errors import InvalidInputError
from meg.policy.agents import rollout
from meg.policy.baselines import FIXED_PLANS, FixedPlanAgent, RandomAgent
from meg.policy.checkpoint import env_config_from_dict, load_checkpoint
from meg.policy.cvpo import CVPOAgent, CVPOConfig, train_cvpo
from meg.policy.oracle import OracleAgent
from meg.policy.ppo_lagrangian import PPOAgent, PPOLagrangianConfig, train_ppo_lagrangian
from meg.policy.rule import RuleAgent
from meg.policy.serving import AgentPolicy, RulePolicy, load_policy
from meg.v1 import generation_pb2, policy_service_pb2

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

TINY_CVPO = CVPOConfig(epochs=2, episodes_per_epoch=2, updates_per_epoch=2, batch_size=16, warmup_epochs=1,
                       hidden=(16, 16), critic_hidden=(16, 16), cost_margin=(0.15, 0.10))


def _observation(snr_db: float, size: int = 64, latency_s: float = 0.0, energy_j: float = 0.0) -> policy_service_pb2.Observation:
    return policy_service_pb2.Observation(
        channel=generation_pb2.ChannelState(snr_db=snr_db), previous_latency_s=0.5, previous_energy_j=20.0,
        width=size, height=size, limits=generation_pb2.Limits(latency_s=latency_s, energy_j=energy_j))


def test_cvpo_checkpoint_round_trip_with_duals(tmp_path) -> None:
    sim = small_sim(episode_length=4)
    agent, _ = train_cvpo(sim.config, TINY_CVPO, simulator=sim)
    agent.eta, agent.lambdas = 0.123, np.array([4.5, 0.25])
    path = agent.save(tmp_path / "ckpt", extra={"note": "x"})
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "weights.safetensors"]
    ckpt = load_checkpoint(path)
    assert ckpt.algo == "cvpo" and ckpt.env_config == sim.config and ckpt.extra == {"note": "x"}
    assert ckpt.duals["eta"] == [0.123] and ckpt.duals["lambda"] == [4.5, 0.25]
    assert json.loads((path / "meta.json").read_text())["duals"]["lambda"] == [4.5, 0.25]
    again = CVPOAgent.from_checkpoint(ckpt)
    assert again.config == TINY_CVPO and again.config.cost_margin == (0.15, 0.10)  # per-cost tuple survives JSON
    assert again.eta == 0.123 and np.allclose(again.lambdas, [4.5, 0.25])
    # an environment written before reward_mse_offset existed reads back as plain −log MSE
    old_env = {k: v for k, v in json.loads((path / "meta.json").read_text())["env_config"].items()
               if k != "reward_mse_offset"}
    assert env_config_from_dict(old_env).reward_mse_offset == 0.0
    torch.testing.assert_close(again.log_alpha, agent.log_alpha, rtol=1e-6, atol=1e-6)
    for a, b in zip(agent.actor.state_dict().values(), again.actor.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(agent.critic.state_dict().values(), again.critic.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    obs = sim.reset(6, seed=3)
    g = torch.Generator()
    np.testing.assert_array_equal(agent.act(sim, obs, deterministic=True, generator=g)[0],
                                  again.act(sim, obs, deterministic=True, generator=g)[0])
    # served through the Policy interface: the same plan as the agent's argmax
    policy = load_policy(path)
    assert isinstance(policy, AgentPolicy) and policy.name == "cvpo"
    o = sim.reset(1, seed=4)
    plan_index = agent.act(sim, o, deterministic=True, generator=g)[0][0]
    plan = policy.decide(_observation(float(o[0, 0]), 64))
    assert plan.steps == sim.space.steps[plan_index] and plan.policy == "cvpo"
    assert plan.split.kind == [generation_pb2.SPLIT_KIND_DEVICE, generation_pb2.SPLIT_KIND_DECODER,
                               generation_pb2.SPLIT_KIND_IMAGE][sim.space.split[plan_index]]


def test_checkpoint_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    sim = small_sim(episode_length=4)
    agent, _ = train_cvpo(sim.config, TINY_CVPO, simulator=sim)
    path = agent.save(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    meta["format"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidInputError, match="format 99"):
        load_checkpoint(path)


def test_ppo_lagrangian_trains_saves_and_reloads(tmp_path) -> None:
    sim = small_sim(episode_length=4)
    cfg = PPOLagrangianConfig(epochs=3, episodes_per_epoch=4, hidden=(16, 16), minibatch_size=8)
    agent, history = train_ppo_lagrangian(sim.config, cfg, simulator=sim)
    assert len(history) == 3 and all(np.isfinite(h["mean_reward"]) for h in history)
    # the limit is far below the uniform policy's latency: the multiplier rises
    assert history[-1]["lambda_latency"] > 0
    again = PPOAgent.from_checkpoint(load_checkpoint(agent.save(tmp_path / "p")))
    np.testing.assert_allclose(again.lambdas, agent.lambdas)
    obs = sim.reset(5, seed=1)
    np.testing.assert_array_equal(again.act(sim, obs, deterministic=True, generator=torch.Generator())[0],
                                  agent.act(sim, obs, deterministic=True, generator=torch.Generator())[0])


def test_oracle_is_best_feasible_per_request() -> None:
    sim = small_sim(latency_limit_s=1.0, energy_limit_j=80.0)
    obs = sim.reset(16, seed=2)
    plan, merge = OracleAgent().act(sim, obs, deterministic=True, generator=torch.Generator())
    space = sim.space
    reward, lat, en, _ = sim.outcome(space.split[None], space.steps[None], space.merge_ratio[None])
    feasible = (lat <= 1.0) & (en <= 80.0)
    for b in range(16):
        if feasible[b].any():
            assert feasible[b, plan[b]] and reward[b, plan[b]] == reward[b][feasible[b]].max()


def test_baselines_plan_what_they_say() -> None:
    sim = small_sim()
    obs = sim.reset(8, seed=0)
    g = torch.Generator().manual_seed(0)
    plan, merge = FixedPlanAgent(FIXED_PLANS["fixed-meg"]).act(sim, obs, deterministic=True, generator=g)
    assert sim.space.describe(int(plan[0])) == "decoder/8 steps/merge 0.50" and (plan == plan[0]).all()
    plan, _ = FixedPlanAgent(FIXED_PLANS["fixed-image"]).act(sim, obs, deterministic=True, generator=g)
    assert sim.space.describe(int(plan[0])).startswith("image/8")
    plans = np.concatenate([RandomAgent().act(sim, obs, deterministic=True, generator=g)[0] for _ in range(20)])
    assert len(set(plans.tolist())) > sim.space.size // 2


def test_rule_policy_merges_more_on_worse_links_and_keeps_limits() -> None:
    sim = small_sim(episode_length=4, latency_limit_s=2.0, energy_limit_j=200.0)
    policy = RulePolicy(sim.config, simulator=sim)
    good = policy.decide(_observation(20.0))
    bad = policy.decide(_observation(-6.0))
    assert good.split.kind == generation_pb2.SPLIT_KIND_DECODER and good.merge_ratio == 0.0
    assert bad.merge_ratio == 0.5 and bad.codec_chain == "merge:0.5,fp16" and good.codec_chain == "fp16"
    assert good.policy == "rule"
    # the request's limits are honoured: a tight latency limit means fewer steps
    tight = policy.decide(_observation(20.0, latency_s=0.8))
    assert tight.steps < good.steps
    _, latency_s, energy_j, _ = sim.outcome(np.array([1]), np.array([tight.steps]), np.array([0.0]),
                                            snr_db=np.array([20.0]), pixels=np.array([64.0 * 64]))
    assert latency_s[0] <= 0.8
    with pytest.raises(InvalidInputError, match="previous_latency_s"):
        policy.decide(policy_service_pb2.Observation(previous_latency_s=float("nan")))
    # the rule agent on whole episodes stays inside its limits
    _, stats = rollout(RuleAgent(), sim, batch=8, seed=0, deterministic=True, generator=torch.Generator())
    assert (stats.latency_s <= 2.0).all() and (stats.energy_j <= 200.0).all()


def test_cli_train_and_eval(tmp_path) -> None:
    from meg.cli import cli

    runner = CliRunner()
    out = tmp_path / "ckpt"
    result = runner.invoke(cli, ["policy", "train", "--algo", "ppo-lagrangian", "--out", str(out), "--epochs", "2",
                                 "--episode-length", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "curves.png").stat().st_size > 1000 and (out / "weights.safetensors").exists()
    assert len(json.loads((out / "history.json").read_text())) == 2
    rows_path, plot_path = tmp_path / "rows.json", tmp_path / "cmp.png"
    result = runner.invoke(cli, ["policy", "eval", "--algo", "ppo-lagrangian,fixed-meg,random,oracle", "--checkpoint",
                                 str(out), "--episodes", "3", "--seed", "5", "--json", str(rows_path),
                                 "--plot", str(plot_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(rows_path.read_text())["rows"]
    assert [r["algo"] for r in rows] == ["ppo-lagrangian", "fixed-meg", "random", "oracle"]
    for r in rows:
        assert {"mean_reward", "mean_mse", "mean_latency_s", "mean_energy_j", "latency_violation_rate",
                "energy_violation_rate"} <= set(r)
    assert plot_path.stat().st_size > 1000
    result = runner.invoke(cli, ["policy", "eval", "--algo", "cvpo", "--episodes", "2"])
    # a user error: one line naming the option, exit code 2, no traceback
    assert result.exit_code == 2 and "checkpoint" in result.output and "Traceback" not in result.output


def test_shipped_cvpo_meets_its_limits_and_the_oracle_on_held_out_episodes() -> None:
    from meg.policy.evaluate import evaluate, make_agent
    from meg.policy.serving import packaged_checkpoint

    agent, env_config = make_agent("cvpo", packaged_checkpoint("cvpo"))
    assert env_config is not None
    rows = {r["algo"]: r for r in evaluate({"cvpo": agent, "oracle": make_agent("oracle")[0]}, env_config,
                                           episodes=60, seed=20_000)}
    cvpo, oracle = rows["cvpo"], rows["oracle"]
    assert cvpo["latency_violation_rate"] <= 0.05 and cvpo["energy_violation_rate"] <= 0.05
    assert cvpo["mean_mse"] <= 1.15 * oracle["mean_mse"]
    plan = load_policy("cvpo").decide(_observation(0.0, 512))
    assert plan.policy == "cvpo" and 4 <= plan.steps <= 12
