"""`meg bench hybrid`: the Hybrid SR paper's experiments on the measured meg-tiny table.

Every number comes from the shipped table (`meg hybrid profile`: judge fidelity, SSIM detail,
FLOPs of the real models, bytes of the real encodings) through eqs. 1–13 with the
`rtx-3080-ti` edge, `jetson-agx-orin` device and a 10 Mbit/s link; decisions by
`meg.policy.hybrid_sr`. Instances are seeded: K users, each with a target R̃ drawn from the
table's targets and λ_k ~ U[0, 1].

- `fig1`: delay and quality against target resolution, direct generation and each SR scale
  (student, D = 4; γ = 0.25);
- `fig7`: latency, quality and utility per method (SA, exact, Random, w/o SR, OneType,
  CogView3-style cascade), K = 10, per target resolution and overall;
- `sa_gap`: SA against the exact optimum for K = 2 … 6 on 100 instances each; SA's
  decision time at K = 10;
- `fig8a` / `fig8b`: utility against the edge compute availability ratio and against γ;
- `lambda` / `k`: utility per method against a common λ and against K.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["run_hybrid_bench"]

METHODS = ("sa", "exact", "random", "wo-sr", "onetype", "cogview3")


def _users(table: Any, k: int, rng: np.random.Generator, lam: float | None = None) -> list[Any]:
    from meg.policy.hybrid_sr import UserRequest

    return [UserRequest(int(rng.choice(table.targets)), float(rng.uniform(0, 1)) if lam is None else lam) for _ in range(k)]


def _run(methods: tuple[str, ...], table: Any, config: Any, k: int, n: int, seed: int,
         lam: float | None = None) -> dict[str, dict[str, Any]]:
    """Per method: mean per-user utility, latency, quality over n instances, and per target."""
    from meg.errors import ResourceExhaustedError
    from meg.policy.hybrid_sr import decide

    out: dict[str, dict[str, Any]] = {m: {"utility": [], "latency_s": [], "quality": [], "violations": 0,
                                          "infeasible": 0, "by_target": {}} for m in methods}
    for i in range(n):
        rng = np.random.default_rng(seed * 10_000 + i)
        users = _users(table, k, rng, lam)
        for m in methods:
            try:
                d = decide(m, table, users, replace(config, seed=seed * 10_000 + i))  # type: ignore[arg-type]
            except ResourceExhaustedError:
                out[m]["infeasible"] += 1
                continue
            rec = out[m]
            rec["utility"].append(d.utility / k)
            rec["latency_s"] += d.latency_s
            rec["quality"] += d.quality
            rec["violations"] += d.latency_violations
            for u, t, q in zip(users, d.latency_s, d.quality, strict=True):
                bt = rec["by_target"].setdefault(u.target_px, {"latency_s": [], "quality": [], "utility": []})
                bt["latency_s"].append(t)
                bt["quality"].append(q)
                bt["utility"].append(q - u.latency_weight * t)
    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    summary: dict[str, dict[str, Any]] = {}
    for m, rec in out.items():
        summary[m] = {"utility": mean(rec["utility"]), "latency_s": mean(rec["latency_s"]), "quality": mean(rec["quality"]),
                      "latency_violations": rec["violations"], "infeasible_instances": rec["infeasible"],
                      "by_target": {t: {key: mean(v) for key, v in bt.items()} for t, bt in sorted(rec["by_target"].items())}}
    return summary


def run_hybrid_bench(*, table_path: Path | None = None, k: int = 10, instances: int = 20, gap_instances: int = 100,
                     seed: int = 0) -> dict[str, Any]:
    """Every experiment; returns a JSON-ready dict."""
    from meg.policy.hybrid_sr import (
        HybridControllerConfig,
        HybridTable,
        Problem,
        anneal,
        solve_exact,
    )

    table = HybridTable.load(table_path)
    config = HybridControllerConfig()
    result: dict[str, Any] = {"benchmark": "hybrid-sr", "config": {**config.__dict__, "k": k, "instances": instances,
                                                                  "gap_instances": gap_instances, "seed": seed},
                              "table": table.data["config"], "table_notes": table.data.get("notes", {})}
    # Fig. 1/2: every (R̃, S, D) option's modelled delay and quality
    result["fig1"] = [{"target_px": t, "sr_scale": o.sr_scale, "steps": o.steps, "unet": o.unet, "quality": o.quality,
                       "latency_s": o.latency_s, "parts_s": list(o.parts_s)}
                      for t in table.targets for o in table.options(t, config)]
    # Fig. 7: K users, every method
    fig7 = _run(METHODS, table, config, k, instances, seed)
    base = ("random", "wo-sr", "onetype", "cogview3")
    mean_b = {key: float(np.mean([fig7[b][key] for b in base])) for key in ("latency_s", "quality", "utility")}
    result["fig7"] = fig7
    result["claims"] = {
        "latency_reduction_vs_baseline_mean": 1 - fig7["sa"]["latency_s"] / mean_b["latency_s"],
        "quality_vs_baseline_mean": fig7["sa"]["quality"] / mean_b["quality"] - 1,
        "utility_gain_vs_baseline_mean": (fig7["sa"]["utility"] - mean_b["utility"]) / abs(mean_b["utility"]),
        "baseline_mean": mean_b,
    }
    # SA vs exact, K = 2 … 6
    gaps: dict[int, Any] = {}
    for kk in range(2, 7):
        rel = []
        for i in range(gap_instances):
            rng = np.random.default_rng(777_000 + 100 * kk + i)
            problem = Problem.build(table, _users(table, kk, rng), config)
            exact = solve_exact(problem).utility
            sa = anneal(problem, replace(config, seed=i)).utility
            rel.append((exact - sa) / abs(exact) if exact else 0.0)
        gaps[kk] = {"mean_gap": float(np.mean(rel)), "max_gap": float(np.max(rel)),
                    "exact_hits": int(sum(r <= 1e-9 for r in rel)), "n": gap_instances}
    result["sa_gap"] = gaps
    times = []
    for i in range(20):
        problem = Problem.build(table, _users(table, 10, np.random.default_rng(5_000 + i)), config)
        started = time.perf_counter()
        anneal(problem, replace(config, seed=i))
        times.append(time.perf_counter() - started)
    result["sa_decide_ms_k10"] = {"median": 1e3 * statistics.median(times), "max": 1e3 * max(times)}
    # Fig. 8a: edge capacity ratio; Fig. 8b: γ
    result["fig8a"] = {f"{r:.1f}": _run(METHODS, table, replace(config, edge_capacity_ratio=r), k, instances, seed)
                       for r in (0.2, 0.4, 0.6, 0.8, 1.0)}
    ratios = sorted(float(r) for r in result["fig8a"])
    slopes: dict[str, Any] = {}
    for m in METHODS:  # a least-squares slope over the ratios where the method found a feasible batch
        pts = [(r, result["fig8a"][f"{r:.1f}"][m]["utility"]) for r in ratios]
        pts = [(r, u) for r, u in pts if np.isfinite(u)]
        xs, ys = np.array([r for r, _ in pts]), np.array([u for _, u in pts])
        slopes[m] = {"slope": float(np.polyfit(xs, ys, 1)[0]) if len(pts) >= 2 else float("nan"),
                     "ratios": [r for r, _ in pts]}
    result["fig8a_slope"] = slopes
    result["fig8b"] = {f"{g:g}": _run(("sa",), table, replace(config, foreground_fraction=g), k, instances, seed)["sa"]
                       for g in table.gammas}
    result["lambda"] = {f"{lam:g}": _run(METHODS, table, config, k, instances, seed, lam=lam) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)}
    result["k"] = {str(kk): _run(METHODS, table, config, kk, instances, seed) for kk in (2, 5, 10, 15, 20)}
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
    rows = [r for r in result["fig1"] if r["steps"] == 4]
    for s in sorted({r["sr_scale"] for r in rows}):
        pts = sorted((r["target_px"], r["latency_s"], r["quality"]) for r in rows if r["sr_scale"] == s)
        label = "direct (S=1)" if s == 1 else f"SR ×{s}"
        ax[0, 0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax[0, 1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label)
    ax[0, 0].set(title="Fig. 1/2 analogue: delay (D=4)", xlabel="target R̃ (px)", ylabel="modelled latency (s)")
    ax[0, 1].set(title="quality Q = g·m (D=4)", xlabel="target R̃ (px)", ylabel="Q")
    ax[0, 0].legend()
    fig7 = result["fig7"]
    for m, rec in fig7.items():
        bt = rec["by_target"]
        ax[0, 2].scatter([v["latency_s"] for v in bt.values()], [v["quality"] for v in bt.values()], label=m)
    ax[0, 2].set(title="Fig. 7a analogue: latency vs quality per R̃", xlabel="latency (s)", ylabel="Q")
    ax[0, 2].legend(fontsize=7)
    ax[1, 0].bar(list(fig7), [rec["utility"] for rec in fig7.values()])
    ax[1, 0].set(title=f"Fig. 7b analogue: utility per user (K={result['config']['k']})", ylabel="mean U")
    ratios = sorted(result["fig8a"], key=float)
    for m in fig7:
        ax[1, 1].plot([float(r) for r in ratios], [result["fig8a"][r][m]["utility"] for r in ratios], "o-", label=m)
    ax[1, 1].set(title="Fig. 8a analogue: edge capacity", xlabel="edge compute availability ratio", ylabel="mean U")
    ax[1, 1].legend(fontsize=7)
    gammas = sorted(result["fig8b"], key=float)
    ax[1, 2].plot([float(g) for g in gammas], [result["fig8b"][g]["utility"] for g in gammas], "o-", label="utility")
    ax[1, 2].plot([float(g) for g in gammas], [result["fig8b"][g]["quality"] for g in gammas], "s--", label="quality")
    ax[1, 2].set(title="Fig. 8b analogue: foreground fraction γ (SA)", xlabel="γ")
    ax[1, 2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command("hybrid")
@click.option("--table", "table_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Table from `meg hybrid profile` (default: the shipped meg-tiny table).")
@click.option("--k", type=int, default=10, show_default=True, help="Users per batch.")
@click.option("--instances", type=int, default=20, show_default=True, help="Seeded batches per setting.")
@click.option("--gap-instances", type=int, default=100, show_default=True, help="Instances per K for SA vs exact.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG here.")
def bench_hybrid(table_path: Path | None, k: int, instances: int, gap_instances: int, seed: int, json_path: Path | None,
                 plot_path: Path | None) -> None:
    """Hybrid SR controller: SA vs exact vs the paper's baselines (modelled on the measured table)."""
    result = run_hybrid_bench(table_path=table_path, k=k, instances=instances, gap_instances=gap_instances, seed=seed)
    console = Console()
    t = Table(title=f"Hybrid SR, K = {k}, {instances} seeded batches (per user)")
    for col in ("method", "utility", "latency_s", "quality", "L0 violations", "infeasible"):
        t.add_column(col)
    for m, rec in result["fig7"].items():
        t.add_row(m, f"{rec['utility']:.4f}", f"{rec['latency_s']:.3f}", f"{rec['quality']:.4f}",
                  str(rec["latency_violations"]), str(rec["infeasible_instances"]))
    console.print(t)
    c = result["claims"]
    console.print(f"SA vs baseline mean: latency {-100 * c['latency_reduction_vs_baseline_mean']:+.1f}%, "
                  f"quality {100 * c['quality_vs_baseline_mean']:+.1f}%, utility {100 * c['utility_gain_vs_baseline_mean']:+.1f}%")
    g = Table(title="SA vs exact optimum")
    for col in ("K", "mean gap", "max gap", "exact hits"):
        g.add_column(col)
    for kk, rec in result["sa_gap"].items():
        g.add_row(str(kk), f"{100 * rec['mean_gap']:.3f}%", f"{100 * rec['max_gap']:.3f}%", f"{rec['exact_hits']}/{rec['n']}")
    console.print(g)
    console.print(f"SA decision, K = 10: median {result['sa_decide_ms_k10']['median']:.1f} ms, "
                  f"max {result['sa_decide_ms_k10']['max']:.1f} ms")
    console.print("utility slope vs edge capacity ratio (feasible ratios): " +
                  ", ".join(f"{m} {s['slope']:.4f} ({min(s['ratios'], default=float('nan')):g}-1)"
                            for m, s in result["fig8a_slope"].items()))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        _plot(result, plot_path)
