"""Hybrid SR controller: Algorithm 1 against the exact optimum, constraints, baselines, serving."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from meg.errors import InvalidInputError, ResourceExhaustedError
from meg.policy.hybrid_sr import (
    HybridControllerConfig,
    HybridSrPolicy,
    HybridTable,
    Problem,
    UserRequest,
    anneal,
    decide,
    solve_baseline,
    solve_exact,
)
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb


@pytest.fixture(scope="module")
def table() -> HybridTable:
    return HybridTable.load()


def _users(table: HybridTable, k: int, seed: int) -> list[UserRequest]:
    rng = np.random.default_rng(seed)
    return [UserRequest(int(rng.choice(table.targets)), float(rng.uniform(0, 1))) for _ in range(k)]


def _loads(problem: Problem, choice: list[int]) -> tuple[float, float]:
    return (sum(problem.edge_flops[k, c] for k, c in enumerate(choice)),
            sum(problem.device_flops[k, c] for k, c in enumerate(choice)))


def test_table_shape_and_latency_model(table: HybridTable) -> None:
    config = HybridControllerConfig()
    options = table.options(512, config)
    assert {o.sr_scale for o in options} == {1, 2, 4}
    for o in options:
        t1, t2, t3, t4, t5 = o.parts_s
        expected = t1 + t4 if o.sr_scale == 1 else t1 + max(t2 + t4, t3 + t5)  # eqs. 6-7
        assert o.latency_s == pytest.approx(expected)
        assert 0 < o.quality <= 1
    # SR at 4x sends fewer bytes than the image at R̃: T5 + T4 below S = 1's transfer
    direct = next(o for o in options if o.sr_scale == 1)
    x4 = next(o for o in options if o.sr_scale == 4)
    assert x4.parts_s[3] + x4.parts_s[4] < direct.parts_s[3]


@pytest.mark.parametrize("k", [2, 4, 6])
def test_annealing_reaches_the_exact_optimum_on_small_batches(table: HybridTable, k: int) -> None:
    config = HybridControllerConfig()
    for seed in range(5):
        problem = Problem.build(table, _users(table, k, 100 * k + seed), config)
        exact = solve_exact(problem)
        sa = anneal(problem, replace(config, seed=seed))
        assert sa.utility == pytest.approx(exact.utility, rel=0.02, abs=1e-9)
        assert sa.utility <= exact.utility + 1e-9  # the oracle is an upper bound


def test_decisions_keep_the_budgets_and_l0(table: HybridTable) -> None:
    # a tight edge: C_max at 80% of what the unconstrained optimum uses; both solvers stay within it
    from meg.devices import load_profile

    users = _users(table, 10, 3)
    free = solve_exact(Problem.build(table, users, HybridControllerConfig(edge_window_s=1e6)))
    free_load = _loads(Problem.build(table, users, HybridControllerConfig()), free.choice)[0]
    config = HybridControllerConfig(edge_window_s=0.8 * free_load / load_profile("rtx-3080-ti").effective_flops)
    problem = Problem.build(table, users, config)
    assert free_load > problem.edge_budget_flops  # the budget matters here
    for decision in (anneal(problem, config), solve_exact(problem)):
        edge, device = _loads(problem, decision.choice)
        assert edge <= problem.edge_budget_flops and device <= problem.device_budget_flops
        assert decision.latency_violations == 0
        assert max(decision.latency_s) <= config.latency_limit_s


def test_baselines_keep_their_configuration(table: HybridTable) -> None:
    users = _users(table, 10, 7)
    assert {o.sr_scale for o in solve_baseline("wo-sr", table, users).options} == {1}
    assert {o.sr_scale for o in solve_baseline("onetype", table, users).options} == {2}
    best = decide("exact", table, users)
    for name in ("random", "wo-sr", "onetype"):
        assert decide(name, table, users).utility <= best.utility + 1e-9
    # the cascade (diffusion SR on every cell) fits small targets, not ten 512 px ones
    small = [UserRequest(256, 0.5)] * 4
    cascade = solve_baseline("cogview3", table, small)
    assert {o.sr_scale for o in cascade.options} == {2}
    assert all(o.edge_flops > c.edge_flops for o, c in zip(cascade.options, decide("onetype", table, small).options,
                                                             strict=True))
    # a budget the cheapest direct generation fits but the cascade does not
    tight = HybridControllerConfig(edge_window_s=0.1)
    solve_baseline("wo-sr", table, [UserRequest(512, 0.5)] * 10, tight)
    with pytest.raises(ResourceExhaustedError, match="C_max"):
        solve_baseline("cogview3", table, [UserRequest(512, 0.5)] * 10, tight)


def test_infeasible_batches_name_the_constraint(table: HybridTable) -> None:
    users = _users(table, 10, 1)
    with pytest.raises(ResourceExhaustedError, match="L0 = 0.001 s"):
        decide("sa", table, users, HybridControllerConfig(latency_limit_s=1e-3))
    with pytest.raises(ResourceExhaustedError, match="C_max"):
        decide("sa", table, users, HybridControllerConfig(edge_window_s=1e-6))
    with pytest.raises(InvalidInputError, match="latency weight"):
        decide("sa", table, [UserRequest(512, 2.0)])


def _observation(side: int, weight: float = 0.0, latency_s: float = 0.0) -> policy_pb.Observation:
    return policy_pb.Observation(width=side, height=side, recipe=gen_pb.RECIPE_HYBRID_SR,
                                 limits=gen_pb.Limits(latency_weight=weight, latency_s=latency_s))


def test_served_policy_plans_a_batch_jointly(table: HybridTable) -> None:
    policy = HybridSrPolicy(table)
    plans = policy.decide_batch([_observation(512, 0.1), _observation(256, 1.0), _observation(384)])
    assert [p.policy for p in plans] == ["hybrid-sr-sa"] * 3
    for p, side in zip(plans, (512, 256, 384), strict=True):
        assert side % (32 * int(p.params["sr_scale"])) == 0
        assert p.params["foreground_fraction"] == pytest.approx(0.25)
        assert p.steps in (1, 2, 4, 8)  # the served edge's student steps
    with pytest.raises(ResourceExhaustedError, match="L0"):
        policy.decide(_observation(512, latency_s=1e-4))


def test_rule_policy_gives_hybrid_requests_the_controllers_plan() -> None:
    from meg.policy.serving import rule_policy

    plan = rule_policy().decide(_observation(512, 0.5))
    assert plan.policy == "hybrid-sr-sa"


def test_decide_batch_over_grpc(table: HybridTable) -> None:
    import grpc

    from meg.services.background import start_policy
    from meg.services.policy_server import PolicyServerConfig
    from meg.v1 import policy_service_pb2_grpc as policy_grpc

    batch = policy_pb.DecideBatchRequest(observations=[_observation(512, 0.2), _observation(256, 0.9)])
    with start_policy(PolicyServerConfig(port=0), policy=HybridSrPolicy(table)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = policy_grpc.PolicyServiceStub(channel)
        reply = stub.DecideBatch(batch, timeout=10)
        assert [p.policy for p in reply.plans] == ["hybrid-sr-sa"] * 2
        assert reply.decision_latency_s > 0
        infeasible = policy_pb.DecideBatchRequest(observations=[_observation(512, latency_s=1e-4)])
        with pytest.raises(grpc.RpcError) as info:
            stub.DecideBatch(infeasible, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "L0" in info.value.details()
    # a policy without a joint decision answers each observation alone
    meg_obs = policy_pb.Observation(channel=gen_pb.ChannelState(snr_db=10.0))
    with start_policy(PolicyServerConfig(port=0)) as server, grpc.insecure_channel(server.address) as channel:
        reply = policy_grpc.PolicyServiceStub(channel).DecideBatch(
            policy_pb.DecideBatchRequest(observations=[meg_obs, meg_obs]), timeout=10)
        assert [p.policy for p in reply.plans] == ["rule", "rule"]


def test_cli_decides_a_batch_and_names_an_infeasible_constraint() -> None:
    from click.testing import CliRunner

    from meg.cli import cli

    ok = CliRunner().invoke(cli, ["hybrid", "decide", "--target", "512", "--target", "256", "--weight", "0.3",
                                   "--weight", "0.8"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("R̃") == 2 and "utility" in ok.output
    bad = CliRunner().invoke(cli, ["hybrid", "decide", "--target", "500"])
    assert bad.exit_code == 2 and "not in the table" in bad.output
