"""Hybrid SR's multi-user controller: simulated annealing over (S, D) for K users (PAPERS.md §2).

Problem **P** (eqs. 8–13): K requests q_k = (R̃_k, λ_k, prompt); choose e_k = (S_k, D_k) to

    maximise Σ_k U_k,  U_k = Q_k − λ_k·T_k
    s.t. S_k ∈ 𝒮, D_k ∈ 𝒟; Σ_k ξ1(D_k, R_k) + ξ2(R_k, γ) ≤ C_max (edge);
         Σ_k ξ3(R_k, γ) ≤ C'_max (device); R_k = R̃_k / S_k; and T_k ≤ L0 (Algorithm 1, line 7).

Q_k = g(D, R)·m(S, γ) and the loads ξ, η come from the measured table (`meg hybrid profile`,
`meg.policy.hybrid_profile`); T_k follows eqs. 3–7 with the edge and device profiles and the
link rate: T = T1 + max(T2 + T4, T3 + T5), and T = T1 + η(image at R̃)/B when S = 1.
The edge compute availability ratio (the paper's Fig. 8a) scales both the edge's FLOP/s
(C1) and its budget C_max.

Read top to bottom: the configuration (`HybridControllerConfig`, every default once), the
per-user option arrays (`Problem`), Algorithm 1 (`anneal`), the exact oracle (`solve_exact`,
an integer program: one binary per (user, option)), the paper's baselines, and `decide`.

Algorithm 1 as printed accepts a worse neighbour with probability exp(−ΔU/T); for a
maximisation ΔU < 0 there, so the Metropolis rule is exp(ΔU/T) (PAPERS.md notes the typo).
A neighbour that breaks L0 or a budget is not taken. The best configuration visited is
returned (the printed algorithm returns the last; with the same moves the best is never worse).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from meg.errors import InvalidInputError, ResourceExhaustedError

__all__ = [
    "BASELINES",
    "Decision",
    "HybridControllerConfig",
    "HybridSrPolicy",
    "HybridTable",
    "Problem",
    "UserRequest",
    "anneal",
    "decide",
    "solve_baseline",
    "solve_exact",
]

Method = Literal["sa", "exact", "random", "wo-sr", "onetype", "cogview3"]
BASELINES: tuple[Method, ...] = ("random", "wo-sr", "onetype", "cogview3")


@dataclass(frozen=True)
class HybridControllerConfig:
    """Every default of the controller (the paper gives none of the SA parameters)."""

    initial_temperature: float = 0.5
    """T at the start (utility units: Q ∈ [0, 1], λ·T in the same units)."""
    min_temperature: float = 1e-3
    """Annealing stops when T ≤ this."""
    cooling: float = 0.9
    """α: T ← α·T after each temperature stage."""
    iterations_per_temperature: int = 100
    """limit_T: neighbour moves per temperature stage."""
    latency_limit_s: float = 4.0
    """L0: a configuration with a longer modelled service latency is never taken."""
    foreground_fraction: float = 0.25
    """γ (the paper fixes 0.25)."""
    bandwidth_bps: float = 10e6
    """B: edge → device link rate (the paper's 10 Mbit/s)."""
    edge_profile: str = "rtx-3080-ti"
    """C1: the edge's device profile."""
    device_profile: str = "jetson-agx-orin"
    """C2: the user device's profile."""
    edge_window_s: float = 0.3
    """C_max = edge effective FLOP/s × this window × the capacity ratio (the edge's compute per batch)."""
    device_window_s: float = 0.5
    """C'_max = device effective FLOP/s × this window (summed over the batch, eq. 12)."""
    edge_capacity_ratio: float = 1.0
    """Fraction of the edge's compute available (Fig. 8a): scales C1 and C_max."""
    unets: tuple[str, ...] = ("student", "teacher")
    """Which of the table's UNets the options may use (a served edge runs one: "student")."""
    latency_weight: float = 0.5
    """λ of a served request that gives none (`Limits.latency_weight` = 0)."""
    size_multiple_px: int = 32
    """A served target side must be a multiple of this × S (the model's VAE factor × grid; meg-tiny 8 × 4)."""
    seed: int = 0
    """Seeds the annealing's moves and the Random baseline."""


# -- the measured table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One configuration e = (S, D) for one target resolution, with its modelled costs."""

    sr_scale: int
    steps: int
    unet: str
    quality: float
    latency_s: float
    edge_flops: float
    """ξ1 + ξ2."""
    device_flops: float
    """ξ3."""
    parts_s: tuple[float, float, float, float, float]
    """T1 … T5."""


class HybridTable:
    """The measured table (`meg hybrid profile` output) and the options it gives per R̃."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.gen = {(r["steps"], r["r_px"]): r for r in data["generation"]}
        self.sr = {(r["target_px"], r["sr_scale"], float(r["gamma"])): r for r in data["sr"]}
        self.steps = sorted({r["steps"] for r in data["generation"]})
        self.scales = sorted({r["sr_scale"] for r in data["sr"]})
        self.targets = sorted({r["target_px"] for r in data["sr"]})
        self.gammas = sorted({float(r["gamma"]) for r in data["sr"]})

    @classmethod
    def load(cls, path: str | Path | None = None) -> HybridTable:
        """A table file; default the packaged meg-tiny table."""
        from meg.policy.hybrid_profile import packaged_table

        p = Path(path) if path is not None else packaged_table()
        if not p.is_file():
            raise InvalidInputError(f"Hybrid SR table {str(p)!r} does not exist (run `meg hybrid profile`)", field="table")
        return cls(json.loads(p.read_text()))

    def options(self, target_px: int, config: HybridControllerConfig, *, gamma: float | None = None) -> list[Option]:
        """Every (S, D) for target R̃ at γ (default the config's), with eqs. 1–7 evaluated."""
        from meg.devices import load_profile

        if target_px not in self.targets:
            raise InvalidInputError(f"target {target_px} px is not in the table (targets {self.targets})", field="width")
        g = config.foreground_fraction if gamma is None else gamma
        if float(g) not in self.gammas:
            raise InvalidInputError(f"foreground fraction {g} is not in the table (γ {self.gammas})", field="gamma")
        edge, device = load_profile(config.edge_profile), load_profile(config.device_profile)
        ratio = config.edge_capacity_ratio
        if not 0 < ratio <= 1:
            raise InvalidInputError(f"edge_capacity_ratio must be in (0, 1], got {ratio}", field="edge_capacity_ratio")

        def edge_s(flops: float) -> float:  # C1 shrinks with the availability ratio
            return edge.overhead_s + flops / (edge.effective_flops * ratio) if flops else 0.0

        def device_s(flops: float) -> float:
            return device.compute_latency_s(flops) if flops else 0.0

        out = []
        for s in self.scales:
            sr = self.sr[(target_px, s, 0.0 if s == 1 else float(g))]
            for d in self.steps:
                gen = self.gen[(d, target_px // s)]
                if gen["unet"] not in config.unets:
                    continue
                xi1, xi2, xi3 = gen["gflops"] * 1e9, sr["edge_gflops"] * 1e9, sr["device_gflops"] * 1e9
                t1, t2, t3 = edge_s(xi1), edge_s(xi2), device_s(xi3)
                if s == 1:
                    t4, t5 = sr["image_bytes"] * 8 / config.bandwidth_bps, 0.0
                    latency = t1 + t4
                else:
                    t4 = sr["fg_bytes"] * 8 / config.bandwidth_bps
                    t5 = sr["bg_bytes"] * 8 / config.bandwidth_bps
                    latency = t1 + max(t2 + t4, t3 + t5)
                out.append(Option(s, d, gen["unet"], gen["fidelity"] * sr["m"], latency, xi1 + xi2, xi3,
                                  (t1, t2, t3, t4, t5)))
        return out


# -- one batch as arrays -------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRequest:
    """q_k without the prompt: target side R̃ (px) and the latency weight λ ∈ [0, 1]."""

    target_px: int
    latency_weight: float
    latency_limit_s: float | None = None
    """This user's L0; None: the controller's."""


@dataclass
class Problem:
    """Per-user option arrays [K, n]: utility, latency, loads; the budgets."""

    options: list[list[Option]]
    utility: np.ndarray
    latency_s: np.ndarray
    edge_flops: np.ndarray
    device_flops: np.ndarray
    edge_budget_flops: float
    device_budget_flops: float
    latency_limit_s: np.ndarray
    """[K] L0 per user."""
    grid: tuple[int, int]
    """(number of S values, number of D values): option i is (i // n_D, i % n_D)."""

    @classmethod
    def build(cls, table: HybridTable, users: list[UserRequest], config: HybridControllerConfig,
              *, gamma: float | None = None) -> Problem:
        from meg.devices import load_profile

        if not users:
            raise InvalidInputError("a batch needs at least one request", field="requests")
        for k, u in enumerate(users):
            if not 0.0 <= u.latency_weight <= 1.0:
                raise InvalidInputError(f"request {k}: latency weight λ = {u.latency_weight} is outside [0, 1]",
                                        field="latency_weight")
        options = [table.options(u.target_px, config, gamma=gamma) for u in users]
        lam = np.array([u.latency_weight for u in users])[:, None]
        quality = np.array([[o.quality for o in opts] for opts in options])
        latency = np.array([[o.latency_s for o in opts] for opts in options])
        edge, device = load_profile(config.edge_profile), load_profile(config.device_profile)
        return cls(options, quality - lam * latency, latency,
                   np.array([[o.edge_flops for o in opts] for opts in options]),
                   np.array([[o.device_flops for o in opts] for opts in options]),
                   edge.effective_flops * config.edge_window_s * config.edge_capacity_ratio,
                   device.effective_flops * config.device_window_s,
                   np.array([u.latency_limit_s or config.latency_limit_s for u in users]),
                   (len(table.scales), len(options[0]) // len(table.scales)))

    @property
    def k(self) -> int:
        return int(self.utility.shape[0])

    def within_l0(self) -> np.ndarray:
        """[K, n] bool: options within each user's L0."""
        return self.latency_s <= self.latency_limit_s[:, None]

    def check_feasible(self, allowed: np.ndarray) -> None:
        """ResourceExhaustedError naming the constraint no choice within `allowed` can meet."""
        fits = allowed & self.within_l0()
        for k in range(self.k):
            if not fits[k].any():
                best = float(self.latency_s[k][allowed[k]].min())
                raise ResourceExhaustedError(
                    f"request {k}: no configuration meets the latency limit L0 = {self.latency_limit_s[k]:g} s "
                    f"(fastest {best:.3g} s)", field="latency_limit_s")
        for name, load, budget in (("edge compute C_max", self.edge_flops, self.edge_budget_flops),
                                   ("device compute C'_max", self.device_flops, self.device_budget_flops)):
            least = float(np.where(fits, load, np.inf).min(axis=1).sum())
            if least > budget:
                raise ResourceExhaustedError(
                    f"the batch of {self.k} needs at least {least / 1e9:.4g} GFLOP of {name}, "
                    f"which is {budget / 1e9:.4g} GFLOP", field="edge_capacity" if "edge" in name else "device_capacity")


@dataclass
class Decision:
    """One configuration per user and what it gives."""

    method: str
    choice: list[int]
    utility: float
    latency_s: list[float]
    quality: list[float]
    decide_s: float
    latency_violations: int = 0
    options: list[Option] = field(default_factory=list)

    @classmethod
    def of(cls, method: str, problem: Problem, choice: list[int], decide_s: float) -> Decision:
        rows = range(problem.k)
        lat = [float(problem.latency_s[k, c]) for k, c in zip(rows, choice, strict=True)]
        return cls(method, list(choice), float(sum(problem.utility[k, c] for k, c in zip(rows, choice, strict=True))),
                   lat, [problem.options[k][c].quality for k, c in zip(rows, choice, strict=True)], decide_s,
                   sum(t > limit + 1e-12 for t, limit in zip(lat, problem.latency_limit_s, strict=True)),
                   [problem.options[k][c] for k, c in zip(rows, choice, strict=True)])


# -- Algorithm 1: simulated annealing -----------------------------------------------------------


def anneal(problem: Problem, config: HybridControllerConfig = HybridControllerConfig(),
           allowed: np.ndarray | None = None) -> Decision:
    """Simulated annealing over every user's (S, D) (Algorithm 1)."""
    started = time.perf_counter()
    allowed = np.ones(problem.utility.shape, bool) if allowed is None else allowed
    problem.check_feasible(allowed)
    rng = np.random.default_rng(config.seed)
    ok = allowed & problem.within_l0()
    n_s, n_d = problem.grid
    # start: every user on its cheapest feasible configuration (meets the budgets if anything does)
    cur = [int(np.where(ok[k], problem.edge_flops[k], np.inf).argmin()) for k in range(problem.k)]
    edge_load = float(sum(problem.edge_flops[k, c] for k, c in enumerate(cur)))
    device_load = float(sum(problem.device_flops[k, c] for k, c in enumerate(cur)))
    util = problem.utility
    total = float(sum(util[k, c] for k, c in enumerate(cur)))
    best, best_total = list(cur), total
    temperature = config.initial_temperature
    while temperature > config.min_temperature:
        for _ in range(config.iterations_per_temperature):
            # neighbour: one user changes its S or its D (to any other candidate: the step
            # counts are not ordered by quality, so ±1 moves would leave gaps)
            k = int(rng.integers(problem.k))
            s, d = divmod(cur[k], n_d)
            if rng.random() < 0.5:
                s = (s + int(rng.integers(1, n_s))) % n_s
            else:
                d = (d + int(rng.integers(1, n_d))) % n_d
            new = s * n_d + d
            if new == cur[k] or not ok[k, new]:  # GetLatency(e') ≤ L0 (and the allowed set)
                continue
            e = edge_load - problem.edge_flops[k, cur[k]] + problem.edge_flops[k, new]
            v = device_load - problem.device_flops[k, cur[k]] + problem.device_flops[k, new]
            if e > problem.edge_budget_flops or v > problem.device_budget_flops:
                continue
            delta = float(util[k, new] - util[k, cur[k]])
            if delta > 0 or rng.random() < math.exp(delta / temperature):  # Metropolis, maximisation
                cur[k], edge_load, device_load, total = new, e, v, total + delta
                if total > best_total:
                    best, best_total = list(cur), total
        temperature *= config.cooling
    return Decision.of("sa", problem, best, time.perf_counter() - started)


# -- the exact oracle ----------------------------------------------------------------------------


def solve_exact(problem: Problem, allowed: np.ndarray | None = None, *, method: str = "exact") -> Decision:
    """The optimum of P over `allowed`: a 0/1 integer program (scipy.optimize.milp, HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    started = time.perf_counter()
    allowed = np.ones(problem.utility.shape, bool) if allowed is None else allowed
    problem.check_feasible(allowed)
    ok = (allowed & problem.within_l0()).ravel()
    k, n = problem.utility.shape
    one_each = np.kron(np.eye(k), np.ones(n))  # Σ_c x_kc = 1
    constraints = [LinearConstraint(one_each, 1, 1),
                   LinearConstraint(problem.edge_flops.ravel()[None] / 1e9, -np.inf, problem.edge_budget_flops / 1e9),
                   LinearConstraint(problem.device_flops.ravel()[None] / 1e9, -np.inf, problem.device_budget_flops / 1e9)]
    result = milp(-problem.utility.ravel(), constraints=constraints, integrality=np.ones(k * n),
                  bounds=Bounds(0, ok.astype(float)))
    if result.x is None:
        raise ResourceExhaustedError(f"no configuration of the batch meets C_max, C'_max and L0 together ({result.message})",
                                     field="edge_capacity")
    choice = [int(i) for i in result.x.reshape(k, n).argmax(axis=1)]
    return Decision.of(method, problem, choice, time.perf_counter() - started)


# -- the paper's baselines -----------------------------------------------------------------------


def _mask(problem: Problem, keep: Any) -> np.ndarray:
    return np.array([[bool(keep(o.sr_scale, o.steps)) for o in opts] for opts in problem.options])


def solve_baseline(name: Method, table: HybridTable, users: list[UserRequest],
                   config: HybridControllerConfig = HybridControllerConfig()) -> Decision:
    """A baseline's decision under the same budgets:

    - ``random``: (S, D) uniformly per user, redrawn until the budgets hold (L0 not checked);
    - ``wo-sr``: S = 1 (generation at R̃), D tuned exactly;
    - ``onetype``: S = 2, D tuned exactly;
    - ``cogview3``: S = 2 with diffusion SR on the whole image (γ = 1), D tuned exactly.

    A tuned baseline that cannot meet L0 for some user keeps the budgets, drops L0 and counts
    the users over it (``latency_violations``).
    """
    started = time.perf_counter()
    if name == "random":
        problem = Problem.build(table, users, config)
        rng = np.random.default_rng(config.seed + 1)
        for _ in range(1000):
            choice = [int(i) for i in rng.integers(problem.utility.shape[1], size=problem.k)]
            if (sum(problem.edge_flops[k, c] for k, c in enumerate(choice)) <= problem.edge_budget_flops
                    and sum(problem.device_flops[k, c] for k, c in enumerate(choice)) <= problem.device_budget_flops):
                return Decision.of(name, problem, choice, time.perf_counter() - started)
        raise ResourceExhaustedError("Random: 1000 draws, none within C_max and C'_max", field="edge_capacity")
    keep_scale = {"wo-sr": 1, "onetype": 2, "cogview3": 2}[name]
    problem = Problem.build(table, users, config, gamma=1.0 if name == "cogview3" else None)
    allowed = _mask(problem, lambda s, d: s == keep_scale)
    try:
        return solve_exact(problem, allowed, method=name)
    except ResourceExhaustedError:
        relaxed = replace(problem, latency_limit_s=np.full(problem.k, math.inf))
        decision = solve_exact(relaxed, allowed, method=name)
        return Decision.of(name, problem, decision.choice, time.perf_counter() - started)


def decide(method: Method, table: HybridTable, users: list[UserRequest],
           config: HybridControllerConfig = HybridControllerConfig()) -> Decision:
    """One batch decision by `method` ("sa", "exact" or a baseline)."""
    if method in BASELINES:
        return solve_baseline(method, table, users, config)
    problem = Problem.build(table, users, config)
    if method == "sa":
        return anneal(problem, config)
    if method == "exact":
        return solve_exact(problem)
    raise InvalidInputError(f"unknown method {method!r} (sa, exact, {', '.join(BASELINES)})", field="method")


# -- served: the controller behind the Policy interface -----------------------------------------


class HybridSrPolicy:
    """The controller as a `meg.policy.Policy`: Hybrid SR observations get the annealing's plan,
    decided jointly for a batch (`decide_batch`, the `DecideBatch` RPC) or alone (`decide`, a
    batch of one); other recipes go to ``other`` (default: their recipe's default plan).

    A served edge runs one UNet, so the options are the student's steps. A request's target is
    its larger side, costed as the nearest target in the table; its λ is
    `Limits.latency_weight` (else the config's) and its L0 `Limits.latency_s` (else the config's).
    """

    def __init__(self, table: HybridTable | None = None, config: HybridControllerConfig = HybridControllerConfig(),
                 other: Any = None) -> None:
        self.table = table if table is not None else HybridTable.load()
        self.config = replace(config, unets=("student",))
        self.other = other
        self.name = "hybrid-sr-sa"

    def decide(self, observation: Any) -> Any:
        return self.decide_batch([observation])[0]

    def decide_batch(self, observations: list[Any]) -> list[Any]:
        from meg.recipes.hybrid_sr import hybrid_plan
        from meg.recipes.plan import plan_to_proto
        from meg.v1 import generation_pb2

        plans: list[Any] = [None] * len(observations)
        mine = [i for i, o in enumerate(observations) if o.recipe == generation_pb2.RECIPE_HYBRID_SR]
        for i, o in enumerate(observations):
            if i not in mine:
                plans[i] = self.other.decide(o) if self.other is not None else _default_plan(o)
        if not mine:
            return plans
        users = [self._user(observations[i], i) for i in mine]
        problem = Problem.build(self.table, users, self.config)
        # S must divide the request's own size into whole latent cells
        sides = [max(observations[i].width, observations[i].height) for i in mine]
        allowed = np.array([[side % (self.config.size_multiple_px * o.sr_scale) == 0 for o in opts] for side, opts in
                            zip(sides, problem.options, strict=True)])
        for row, side, i in zip(allowed, sides, mine, strict=True):
            if not row.any():
                raise InvalidInputError(f"observation {i}: size {side} px is not a multiple of "
                                        f"{self.config.size_multiple_px} × any SR scale", field="observation.width")
        decision = anneal(problem, self.config, allowed)
        for i, option in zip(mine, decision.options, strict=True):
            plans[i] = plan_to_proto(hybrid_plan(steps=option.steps, sr_scale=option.sr_scale,
                                                 foreground_fraction=self.config.foreground_fraction, policy=self.name))
        return plans

    def _user(self, observation: Any, index: int) -> UserRequest:
        side = max(observation.width, observation.height)
        if side <= 0:
            raise InvalidInputError(f"observation {index}: Hybrid SR planning needs the target size (width, height)",
                                    field="observation.width")
        target = min(self.table.targets, key=lambda t: abs(math.log(t / side)))
        lim = observation.limits
        weight = lim.latency_weight or self.config.latency_weight
        if not 0.0 <= weight <= 1.0:
            raise InvalidInputError(f"observation {index}: limits.latency_weight = {weight} is outside [0, 1]",
                                    field="observation.limits.latency_weight")
        return UserRequest(target, weight, lim.latency_s if lim.latency_s > 0 else None)


def _default_plan(observation: Any) -> Any:
    from meg.recipes.plan import plan_to_proto
    from meg.recipes.registry import recipe_for

    plan = recipe_for(observation.recipe, field="observation.recipe").default_plan(observation)
    if plan is None:
        raise InvalidInputError("the Hybrid SR controller plans Hybrid SR requests only", field="observation.recipe")
    return plan_to_proto(plan)
