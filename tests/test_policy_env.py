"""The constrained MDP: step semantics, distortion interpolation, cost model, binding limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from policy_helpers import DEVICE, EDGE, FLOPS, mse_of, small_sim, small_table

from meg.errors import InvalidInputError
from meg.policy.costs import SPLIT_CODES, CostModel, crossing_bits
from meg.policy.distortion import DistortionTable, load_table
from meg.policy.env import EnvConfig, MegPlanEnv, PlanSimulator


def test_table_is_exact_on_grid_and_clamps_outside() -> None:
    table = small_table()
    for s in (4, 8, 12):
        for m in (0.0, 0.5):
            for g in (0.0, 0.2):
                assert table.mse("decoder", s, m, g) == pytest.approx(mse_of("decoder", s, m, g), rel=1e-9)
    # between grid points: log-linear interpolation lies between the corners around it
    mid = float(table.mse("decoder", 6, 0.25, 0.1))
    corners = [mse_of("decoder", s, m, g) for s in (4, 8) for m in (0.0, 0.5) for g in (0.0, 0.2)]
    assert min(corners) < mid < max(corners)
    # halfway along one axis: the geometric mean of the two neighbours
    assert table.mse("device", 6, 0, 0) == pytest.approx(math.sqrt(mse_of("device", 4, 0, 0) * mse_of("device", 8, 0, 0)))
    # outside the grid: clamped to the edge, never extrapolated
    assert table.mse("decoder", 20, 0.9, 1.0) == pytest.approx(mse_of("decoder", 12, 0.5, 0.2))
    assert table.mse("device", 2, 0.3, 0.3) == pytest.approx(mse_of("device", 4, 0, 0))
    with pytest.raises(InvalidInputError, match="'unet:1'"):
        table.log_mse("unet:1", 4, 0, 0)


def test_table_json_round_trip_and_packaged_table(tmp_path) -> None:
    table = small_table()
    table.save(tmp_path / "t.json")
    again = load_table(tmp_path / "t.json")
    assert again == DistortionTable.from_json(table.to_json())
    assert again.mse("decoder", 7, 0.3, 0.1) == pytest.approx(table.mse("decoder", 7, 0.3, 0.1))
    packaged = load_table("tiny-random")
    assert packaged.model == "tiny-random" and set(packaged.splits) == set(SPLIT_CODES)
    # measured, not invented: more merging never helps at fixed steps and noise on the packaged table
    assert packaged.mse("decoder", 8, 0.75, 0.1) > packaged.mse("decoder", 8, 0.0, 0.1)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_table("no-such-model")


def test_crossing_bits_match_the_paper_formula() -> None:
    # SDXL 1024²: 4096 tokens × 16 fp16 values = 1,048,576 bits; B(r) = 1,048,576 − 240·r
    pixels = np.array(1024.0 * 1024.0)
    assert crossing_bits(np.array(1), pixels, np.array(0.0)) == 1_048_576
    assert crossing_bits(np.array(1), pixels, np.array(0.75)) == 1_048_576 - 240 * 3072
    assert crossing_bits(np.array(2), pixels, np.array(0.5)) == 24 * 1024 * 1024
    assert crossing_bits(np.array(0), pixels, np.array(0.5)) == 0


def test_cost_model_adds_compute_airtime_and_radio() -> None:
    model = CostModel(EDGE, DEVICE, {64 * 64: FLOPS}, bandwidth_hz=1e6)
    snr_db = 10 * math.log10(3.0)  # rate = 2 Mbit/s
    c = model(np.array(1), np.array(8), np.array(0.0), np.array(snr_db), np.array(64.0 * 64))
    edge_s = (1e10 + 8 * 2 * 5e10) / 1e12
    device_s = 1e11 / 5e11
    airtime_s = 16 * 16 * (64 * 64 / 256) / 2e6
    assert c.airtime_s == pytest.approx(airtime_s)
    assert c.latency_s == pytest.approx(edge_s + airtime_s + device_s)
    assert c.energy_j == pytest.approx(100 * edge_s + 10 * device_s + 1.0 * airtime_s + 1.0 * (edge_s + airtime_s))
    device_only = model(np.array(0), np.array(8), np.array(0.0), np.array(snr_db), np.array(64.0 * 64))
    assert device_only.airtime_s == 0 and device_only.edge_flops == 0
    with pytest.raises(InvalidInputError, match="256"):
        model(np.array(1), np.array(8), np.array(0.0), np.array(0.0), np.array(256.0))


def test_gym_env_step_semantics() -> None:
    sim = small_sim()
    env = MegPlanEnv(sim.config, table=sim.table, edge=EDGE, device=DEVICE)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (4,) and env.observation_space.contains(obs)
    space = env.sim.space
    plan = int(np.flatnonzero((space.split == 1) & (space.steps == 8) & (space.merge_ratio == 0.5))[0])
    # reward is −log(MSE + offset) of the served request, at the SNR observed before the step
    snr = obs[0]
    sigma = 10 ** (-(snr + sim.config.feature_gain_db) / 20)
    expected_mse = float(env.sim.table.mse("decoder", 8, 0.5, sigma))
    obs2, reward, terminated, truncated, info = env.step(plan)
    assert sim.config.reward_mse_offset == 1e-3
    assert reward == pytest.approx(-math.log(expected_mse + 1e-3))
    assert info["mse"] == pytest.approx(expected_mse)
    assert info["snr_db"] == pytest.approx(snr)
    assert info["cost"].shape == (2,) and (info["cost"] > 0).all()
    assert obs2[1] == pytest.approx(info["cost"][0]) and obs2[2] == pytest.approx(info["cost"][1])
    assert not terminated and not truncated
    for _ in range(sim.config.episode_length - 1):
        *_, truncated, _ = env.step(plan)
    assert truncated
    with pytest.raises(InvalidInputError, match="before reset"):
        env.step(plan)
    env.reset(seed=0)
    with pytest.raises(InvalidInputError, match="999"):
        env.step(999)


def test_continuous_head_action_space() -> None:
    sim = small_sim(merge_head="continuous")
    env = MegPlanEnv(sim.config, table=sim.table, edge=EDGE, device=DEVICE)
    env.reset(seed=1)
    assert env.action_space["plan"].n == 3 * len(sim.config.steps)
    _, _, _, _, info = env.step({"plan": np.int64(4), "merge_ratio": np.array([0.3])})
    assert "merge 0.30" in info["plan"]
    with pytest.raises(InvalidInputError, match="0.9"):
        env.step({"plan": 4, "merge_ratio": np.array([0.9])})


def test_channel_depends_on_seed_only() -> None:
    a, b = small_sim(), small_sim()
    oa, ob = a.reset(4, seed=7), b.reset(4, seed=7)
    np.testing.assert_array_equal(oa, ob)
    # different plans, same channel sequence
    for t in range(5):
        ra = a.step(np.zeros(4, int), np.full(4, 4), np.zeros(4))
        rb = b.step(np.full(4, 2), np.full(4, 12), np.zeros(4))
        np.testing.assert_array_equal(ra.snr_db, rb.snr_db)
        assert t < 4 or not np.allclose(ra.latency_s, rb.latency_s)
    assert not np.allclose(small_sim().reset(4, seed=8)[:, 0], oa[:, 0])


def test_fading_makes_snr_vary_around_path_loss() -> None:
    sim = small_sim(episode_length=64)
    sim.reset(256, seed=0)
    snrs = [sim.snr_db]
    for _ in range(20):
        sim.step(np.zeros(256, int), np.full(256, 4), np.zeros(256))
        snrs.append(sim.snr_db)
    snr = np.stack(snrs)
    # 200–300 m: path loss SNR in [-4.4, +2.2] dB; Rayleigh fading spreads it far below
    assert snr.min() < -10 and np.median(snr) < 2.2
    # time-correlated: consecutive requests are far closer than independent ones
    assert np.corrcoef(snr[:-1].ravel(), snr[1:].ravel())[0, 1] > 0.5


def test_extended_limits_bind() -> None:
    """With the shipped table and profiles, the best-quality plan breaks the limits, and most
    requests still have a feasible plan."""
    sim = PlanSimulator(EnvConfig.preset("extended"))
    sim.reset(512, seed=0)
    space = sim.space
    reward, latency_s, energy_j, _ = sim.outcome(space.split[None], space.steps[None], space.merge_ratio[None])
    cfg = sim.config
    feasible = (latency_s <= cfg.latency_limit_s) & (energy_j <= cfg.energy_limit_j)
    best = reward.argmax(1)
    assert feasible[np.arange(512), best].mean() < 0.05
    assert feasible.any(1).mean() > 0.9
    # both limits bind somewhere: some feasible-by-latency plans break the energy limit and vice versa
    assert ((latency_s <= cfg.latency_limit_s) & (energy_j > cfg.energy_limit_j)).any()
    assert ((energy_j <= cfg.energy_limit_j) & (latency_s > cfg.latency_limit_s)).any()


def test_reward_offset_zero_is_plain_log_mse() -> None:
    sim = small_sim(reward_mse_offset=0.0)
    sim.reset(4, seed=1)
    space = sim.space
    reward, _, _, mse = sim.outcome(space.split[None], space.steps[None], space.merge_ratio[None])
    np.testing.assert_allclose(reward, -np.log(mse))
    capped = small_sim()
    capped.reset(4, seed=1)
    reward_capped, _, _, mse_capped = capped.outcome(space.split[None], space.steps[None], space.merge_ratio[None])
    np.testing.assert_allclose(mse_capped, mse)
    assert (reward_capped < reward).all() and (reward_capped <= -math.log(1e-3)).all()
    # the ranking of plans by reward is the ranking by MSE either way
    np.testing.assert_array_equal(reward_capped.argmax(1), reward.argmax(1))


def test_bad_config_names_the_value() -> None:
    with pytest.raises(InvalidInputError, match="-0.5"):
        EnvConfig(reward_mse_offset=-0.5)
    with pytest.raises(InvalidInputError, match="unet"):
        EnvConfig(splits=("unet",))
    with pytest.raises(InvalidInputError, match="0.9"):
        EnvConfig(merge_ratios=(0.0, 0.9))
    with pytest.raises(InvalidInputError, match=r"\[2048\]"):
        small_sim(resolutions=(2048,))
    torch.manual_seed(0)


@pytest.mark.parametrize("head", ["discrete", "continuous"])
def test_gymnasium_env_checker_passes(head: str) -> None:
    from gymnasium.utils.env_checker import check_env

    sim = small_sim(merge_head=head)
    check_env(MegPlanEnv(sim.config, table=sim.table, edge=EDGE, device=DEVICE), skip_render_check=True)
