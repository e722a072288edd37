"""`meg bench paper-meg`: MEG's published figures, reproduced at SDXL-1024 cost scale.

Every cost here (latency, energy) is the paper-scale cost model: FLOPs of the real SDXL
UNet / VAE / text-encoder configurations counted on PyTorch's meta device (no weights),
with ToMe at 0.5 in the edge UNet, the `a100-sxm4` edge and `meg-paper-ue` device
profiles and MEG's 1 MHz path-loss link (`EnvConfig()`, the paper's MDP). Every
distortion (MSE against the 12-step reference image) is measured on meg-tiny at 128 px:
the packaged distortion tables `meg-tiny-paper*` (one per device decoder). The two scales
differ and are shown side by side on purpose: SDXL cannot run on a CPU, and meg-tiny's
costs are far too small to bind any limit.

Parts (each a section of the JSON and a PNG):

- fig3: latency and energy against distance (200–300 m, i.e. SNR) for MEG, CEG (the edge
  sends the 8-bit image), MS (the merged latent to the stock decoder), the noise-tuned
  decoder and a few-step generator; the headline check at 200 and 300 m.
- fig5: MSE against merge ratio, channel σ and steps for the stock, noise-tuned and
  merge-aware decoders.
- policies: CVPO, PPO-Lagrangian, DDPG-Lagrangian (and the unconstrained and fixed plans,
  the oracle) trained on the paper's MDP; training curves; held-out episodes.
- tradeoff: CVPO's distortion against its latency limit as the limit moves.
- tome: ToMe in the edge UNet: FLOPs at SDXL-1024, wall time of meg-tiny's UNet on this
  CPU, and the distortion it adds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["DECODER_TABLES", "PaperMegConfig", "run_fig3", "run_fig5", "run_policies", "run_tome", "run_tradeoff"]

DECODER_TABLES: dict[str, str] = {
    "merge-aware": "meg-tiny-paper",
    "merge-aware (clean target)": "meg-tiny-paper-cleantarget",
    "noise-tuned": "meg-tiny-paper-noise",
    "stock": "meg-tiny-paper-stock",
}
"""Device decoder → packaged distortion table measured with it (ToMe 0.5 in the edge UNet,
12 held-out prompts, 128 px). "merge-aware": `vae_merge_paper`, distilled as the paper does
(`meg train decoder-paper`: the L-step latent against the 12-step reference image);
"clean target": `vae_merge`, trained against the stock decoder's image of the same clean
latent (what the device serves with by default); "noise-tuned": `decoder-paper
--ratio-high 0 --out vae_noise` (channel noise, no merging; not shipped); "stock": `vae`."""

PARTS = ("fig3", "fig5", "policies", "tradeoff", "tome")


@dataclass(frozen=True)
class PaperMegConfig:
    """What `meg bench paper-meg` runs (defaults: the full reproduction, ~23 min on 2 cores)."""

    distances_m: tuple[float, ...] = tuple(float(d) for d in np.linspace(200.0, 300.0, 11))
    """Distances of fig3 (paper: 200–300 m)."""
    steps: int = 8
    """Steps of every scheme in fig3 and fig5 (mid-range of the paper's 4…12)."""
    merge_ratio: float = 0.5
    """Merge ratio of the merged schemes in fig3 and of fig5's σ and steps panels."""
    few_steps: tuple[int, ...] = (1, 2, 4)
    """Step counts of the few-step generator (the SDXL-Turbo role: the student at 1–4 steps)."""
    epochs: dict[str, int] = field(default_factory=lambda: {"cvpo": 60, "ppo-lagrangian": 200, "ddpg-lagrangian": 60})
    """Training epochs per algorithm (their defaults)."""
    margin: float = 0.05
    """Cost margin of the "+margin" variants (an extension: per-step budget (1 − margin) × limit)."""
    episodes: int = 200
    """Held-out evaluation episodes (64 requests each)."""
    eval_seed: int = 10_000
    """Seed of the held-out episodes (training uses seeds from 0)."""
    tradeoff_limits_s: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5, 4.0)
    """Latency limits CVPO is retrained at for the trade-off curve."""
    tradeoff_epochs: int = 40
    """CVPO epochs per trade-off point."""
    tome_prompts: int = 8
    """Prompts of the ToMe distortion measurement."""
    tome_repeats: int = 20
    """Timed UNet calls per ToMe setting (interleaved)."""
    seed: int = 0


def _sim(**overrides: Any) -> Any:
    from meg.policy.env import EnvConfig, PlanSimulator

    return PlanSimulator(EnvConfig(**overrides))


# ---------------------------------------------------------------------------------- fig3
def run_fig3(config: PaperMegConfig = PaperMegConfig()) -> dict[str, Any]:
    """Rows (scheme, distance, SNR, latency, energy, MSE) and the headline check."""
    from meg.channel.pathloss import MEG_LINK_BUDGET
    from meg.policy.costs import SPLIT_CODES
    from meg.policy.distortion import load_table

    sim = _sim()
    sigma = sim.config.feature_sigma
    tables = {label: load_table(name) for label, name in DECODER_TABLES.items()}
    decoder, image = SPLIT_CODES.index("decoder"), SPLIT_CODES.index("image")
    n, m = config.steps, config.merge_ratio
    # (scheme, split, steps, merge ratio, device decoders: the plan takes the best of them)
    schemes: list[tuple[str, int, int, float, tuple[str, ...]]] = [
        ("MEG, decoder per plan", decoder, n, m, ("merge-aware", "stock")),
        ("MEG", decoder, n, m, ("merge-aware",)),
        ("MEG, no merging", decoder, n, 0.0, ("merge-aware",)),
        ("MS", decoder, n, m, ("stock",)),
        ("noise-tuned decoder", decoder, n, m, ("noise-tuned",)),
        ("CEG", image, n, 0.0, ("stock",)),
        *((f"few-step ({k})", decoder, k, 0.0, ("stock",)) for k in config.few_steps),
    ]
    pixels = float(sim.config.resolutions[0] ** 2)
    rows: list[dict[str, Any]] = []
    for distance in config.distances_m:
        snr = float(MEG_LINK_BUDGET.snr_db(distance))
        for name, split, steps, ratio, decoders in schemes:
            c = sim.costs(np.array(split), np.array(steps), np.array(ratio), np.array(snr), np.array(pixels))
            split_name = SPLIT_CODES[split]
            mse = min(float(tables[d].mse(split_name, np.array(float(steps)), np.array(ratio),
                                          np.array(sigma if split_name == "decoder" else 0.0))) for d in decoders)
            rows.append({"scheme": name, "distance_m": distance, "snr_db": snr, "steps": steps, "merge_ratio": ratio,
                         "decoder": " or ".join(decoders), "latency_s": float(c.latency_s), "energy_j": float(c.energy_j),
                         "airtime_s": float(c.airtime_s), "mse": mse})
    headline = []
    for distance in (config.distances_m[0], config.distances_m[-1]):
        at = {r["scheme"]: r for r in rows if r["distance_m"] == distance}
        headline.append({
            "distance_m": distance, "meg_latency_s": at["MEG"]["latency_s"], "ceg_latency_s": at["CEG"]["latency_s"],
            "latency_reduction": 1.0 - at["MEG"]["latency_s"] / at["CEG"]["latency_s"],
            "meg_mse": at["MEG"]["mse"], "ms_mse": at["MS"]["mse"],
            "met": bool(1.0 - at["MEG"]["latency_s"] / at["CEG"]["latency_s"] >= 0.40 and at["MEG"]["mse"] <= at["MS"]["mse"])})
    return {"sigma": sigma, "rows": rows, "headline": headline}


# ---------------------------------------------------------------------------------- fig5
def run_fig5(config: PaperMegConfig = PaperMegConfig()) -> dict[str, Any]:
    """MSE of every decoder against merge ratio, σ and steps, at the tables' grid points."""
    from meg.policy.distortion import load_table

    sigma = _sim().config.feature_sigma
    out: dict[str, Any] = {"steps": config.steps, "merge_ratio": config.merge_ratio, "sigma": sigma, "curves": {}}
    for label, name in DECODER_TABLES.items():
        t = load_table(name)

        def mse(steps: Any, ratio: Any, s: Any, t: Any = t) -> list[float]:
            return [float(v) for v in t.mse("decoder", np.asarray(steps, dtype=float), np.asarray(ratio, dtype=float),
                                            np.asarray(s, dtype=float))]

        ratios, sigmas, steps = np.array(t.merge_ratios), np.array(t.noise_sigmas), np.array(t.steps, dtype=float)
        out["curves"][label] = {
            "table": name,
            "merge_ratio": {"x": ratios.tolist(), "mse": mse(np.full_like(ratios, config.steps), ratios, np.full_like(ratios, sigma))},
            "sigma": {"x": sigmas.tolist(), "mse": mse(np.full_like(sigmas, config.steps), np.full_like(sigmas, config.merge_ratio), sigmas)},
            "steps": {"x": steps.tolist(), "mse": mse(steps, np.full_like(steps, config.merge_ratio), np.full_like(steps, sigma))},
            # the whole (steps × merge ratio) grid at the paper's test noise
            "grid": {"steps": steps.tolist(), "merge_ratio": ratios.tolist(),
                     "mse": [mse(np.full_like(ratios, n), ratios, np.full_like(ratios, sigma)) for n in steps]},
        }
    # which decoder is best at each grid point (σ fixed)
    labels = list(out["curves"])
    first = out["curves"][labels[0]]["grid"]
    out["best"] = {"steps": first["steps"], "merge_ratio": first["merge_ratio"], "decoder": [
        [labels[int(np.argmin([out["curves"][k]["grid"]["mse"][i][j] for k in labels]))] for j in range(len(first["merge_ratio"]))]
        for i in range(len(first["steps"]))]}
    return out


# ------------------------------------------------------------------------------ policies
def _train(algo: str, epochs: int, seed: int, *, margin: float | None = None,
           **env: Any) -> tuple[Any, list[dict[str, float]], float]:
    """Train ALGO on `EnvConfig(**env)` with its defaults but EPOCHS, SEED and (when given) the
    cost MARGIN; returns (agent, history, seconds)."""
    from meg.policy.env import EnvConfig
    from meg.policy.evaluate import trainer_for

    config, trainer = trainer_for(algo, epochs=epochs, seed=seed, **({"cost_margin": margin} if margin is not None else {}))
    start = time.perf_counter()
    agent, history = trainer(EnvConfig(**env), config)
    return agent, history, time.perf_counter() - start


def run_policies(config: PaperMegConfig = PaperMegConfig()) -> dict[str, Any]:
    """Train every learned planner on the paper's MDP; evaluate all on the same held-out episodes."""
    from tqdm.auto import tqdm

    from meg.policy.baselines import FIXED_PLANS, FixedPlanAgent, RandomAgent
    from meg.policy.env import EnvConfig
    from meg.policy.evaluate import evaluate
    from meg.policy.oracle import OracleAgent

    env = EnvConfig()
    constrained = ("cvpo", "ppo-lagrangian", "ddpg-lagrangian")
    runs: list[tuple[str, str, int, float | None]] = [(algo, algo, config.epochs[algo], None) for algo in constrained]
    runs += [(f"{algo}+margin", algo, config.epochs[algo], config.margin) for algo in constrained]
    runs.append(("unconstrained", "unconstrained", config.epochs["ppo-lagrangian"], None))
    agents: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for name, algo, epochs, margin in tqdm(runs, desc="train planners"):
        agent, history, seconds = _train(algo, epochs, config.seed, margin=margin)
        agents[name] = agent
        curves[name] = {"seconds": seconds, "epochs": epochs, "margin": margin or 0.0, "history": history}
    agents["fixed-meg"] = FixedPlanAgent(FIXED_PLANS["fixed-meg"], name="fixed-meg")
    agents["random"] = RandomAgent()
    agents["oracle"] = OracleAgent()
    rows = evaluate(agents, env, episodes=config.episodes, seed=config.eval_seed)
    oracle_mse = next(r["mean_mse"] for r in rows if r["algo"] == "oracle")
    for r in rows:
        r["mse_vs_oracle"] = r["mean_mse"] / oracle_mse
        r["within_limits"] = bool(r["latency_violation_rate"] <= 0.05 and r["energy_violation_rate"] <= 0.05)
    return {"env": dataclasses.asdict(env), "rows": rows, "curves": curves}


def run_tradeoff(config: PaperMegConfig = PaperMegConfig()) -> list[dict[str, Any]]:
    """CVPO (+margin) retrained per latency limit; held-out MSE and costs against the limit."""
    from tqdm.auto import tqdm

    from meg.policy.env import EnvConfig
    from meg.policy.evaluate import evaluate
    from meg.policy.oracle import OracleAgent

    rows = []
    for limit in tqdm(config.tradeoff_limits_s, desc="trade-off"):
        agent, _, seconds = _train("cvpo", config.tradeoff_epochs, config.seed, margin=config.margin, latency_limit_s=limit)
        env = EnvConfig(latency_limit_s=limit)
        got = evaluate({"cvpo+margin": agent, "oracle": OracleAgent()}, env, episodes=config.episodes, seed=config.eval_seed)
        rows.append({"latency_limit_s": limit, "train_seconds": seconds,
                     **{f"{r['algo']}_{k}": v for r in got for k, v in r.items() if k.startswith(("mean_", "latency_v", "energy_v"))}})
    return rows


# ---------------------------------------------------------------------------------- tome
def run_tome(config: PaperMegConfig = PaperMegConfig()) -> dict[str, Any]:
    """ToMe at 0.5 in the edge UNet: FLOPs (SDXL-1024, meg-tiny), CPU time, added distortion."""
    import torch

    import meg.models  # noqa: F401  (registers meg-tiny)
    from meg.models.evaluate import read_prompts
    from meg.models.registry import model_dir
    from meg.policy.distortion import load_table
    from meg.split import GenerationInputs, SplitEngine, SplitPoint, load_pipeline
    from meg.split.flops import partition_flops

    ratio = 0.5
    sdxl = load_table(DECODER_TABLES["merge-aware"]).cost_flops["by_resolution"]["1024"]
    engine = SplitEngine(load_pipeline("meg-tiny"))
    prompts = read_prompts(model_dir("meg-tiny") / "prompts" / "heldout.txt")[: config.tome_prompts]
    out: dict[str, Any] = {"ratio": ratio, "sdxl_1024": {
        "unet_pass_flops": sdxl["unet_pass_flops"], "unet_pass_flops_tome": sdxl["unet_pass_flops_tome"],
        "flops_saving": 1.0 - sdxl["unet_pass_flops_tome"] / sdxl["unet_pass_flops"]}, "meg_tiny": []}
    image = SplitPoint.parse("image")
    for side in (128, 256, 512):
        inputs = GenerationInputs(prompt=prompts[0], seed=0, height=side, width=side, steps=config.steps, guidance_scale=2.5)
        flops = {r: float(partition_flops(engine, image, inputs, tome_ratio=r).edge_flops) for r in (0.0, ratio)}
        # wall time of the edge's UNet over `steps` steps, interleaved so drift hits both alike
        times: dict[float, list[float]] = {0.0: [], ratio: []}
        for _ in range(max(1, config.tome_repeats // 4)):
            for r in (0.0, ratio):
                t0 = time.perf_counter()
                engine.run_edge(inputs, SplitPoint.parse("decoder"), tome_ratio=r)
                times[r].append(time.perf_counter() - t0)
        mse_tome, mse_ref_plain, mse_ref_tome = [], [], []
        if side == 128:
            with torch.inference_mode():
                for i, prompt in enumerate(prompts):
                    def gen(steps: int, r: float, prompt: str = prompt, i: int = i, side: int = side) -> torch.Tensor:
                        return engine.run_edge(GenerationInputs(prompt=prompt, seed=i, height=side, width=side, steps=steps,
                                                                guidance_scale=2.5), image, tome_ratio=r)["image"]  # fmt: skip

                    reference, plain, merged = gen(12, 0.0), gen(config.steps, 0.0), gen(config.steps, ratio)
                    mse_tome.append(float(((merged - plain) ** 2).mean()))
                    mse_ref_plain.append(float(((plain - reference) ** 2).mean()))
                    mse_ref_tome.append(float(((merged - reference) ** 2).mean()))
        row = {"side_px": side, "edge_flops": flops[0.0], "edge_flops_tome": flops[ratio],
               "flops_saving": 1.0 - flops[ratio] / flops[0.0],
               "edge_s_median": float(np.median(times[0.0])), "edge_s_tome_median": float(np.median(times[ratio])),
               "time_saving": 1.0 - float(np.median(times[ratio])) / float(np.median(times[0.0]))}
        if mse_tome:
            row.update({"mse_tome_vs_plain": float(np.mean(mse_tome)), "mse_vs_reference_plain": float(np.mean(mse_ref_plain)),
                        "mse_vs_reference_tome": float(np.mean(mse_ref_tome))})
        out["meg_tiny"].append(row)
    return out


# ---------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, path: Path, title: str, *, dpi: int) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_fig3(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        sel = [r for r in rows if r["scheme"] == scheme]
        style = "--" if scheme == "CEG" else "-o"
        for ax, key in zip(axes, ("latency_s", "energy_j", "mse"), strict=True):
            ax.plot([r["distance_m"] for r in sel], [r[key] for r in sel], style, ms=3, label=scheme)
    for ax, label in zip(axes, ("end-to-end latency (s)", "energy per request (J)", "MSE vs 12-step reference"), strict=True):
        ax.set_xlabel("distance (m)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        # path loss falls 37.6 dB per decade of distance (PAPERS.md §1): exact both ways
        d0, s0 = rows[0]["distance_m"], rows[0]["snr_db"]
        top = ax.secondary_xaxis("top", functions=(lambda d, d0=d0, s0=s0: s0 - 37.6 * np.log10(np.maximum(d, 1e-9) / d0),
                                                   lambda v, d0=d0, s0=s0: d0 * 10 ** ((s0 - v) / 37.6)))
        top.set_xlabel("SNR (dB)")
    axes[0].legend(fontsize=7)
    _finish(plt, fig, path, "MEG's Fig. 3 analogue — costs at SDXL 1024² scale (modelled), MSE measured on meg-tiny 128 px", dpi=110)


def plot_fig5(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"merge_ratio": f"σ = {result['sigma']:g}, {result['steps']} steps",
              "sigma": f"merge {result['merge_ratio']:g}, {result['steps']} steps",
              "steps": f"merge {result['merge_ratio']:g}, σ = {result['sigma']:g}"}
    for label, curves in result["curves"].items():
        for ax, key in zip(axes, ("merge_ratio", "sigma", "steps"), strict=True):
            ax.plot(curves[key]["x"], curves[key]["mse"], "-o", ms=4, label=label)
            ax.set_xlabel({"merge_ratio": "merge ratio", "sigma": "channel noise σ", "steps": "denoising steps"}[key])
            ax.set_title(titles[key])
            ax.set_yscale("log")
    axes[0].set_ylabel("MSE vs 12-step reference")
    axes[0].legend(fontsize=8)
    _finish(plt, fig, path, "MEG's Fig. 5 analogue — device decoders on meg-tiny (ToMe 0.5 in the edge UNet)", dpi=110)


def plot_policies(result: dict[str, Any], tradeoff: list[dict[str, Any]] | None, path: Path) -> None:
    plt = _plt()
    env = result["env"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for name, curve in result["curves"].items():
        h = curve["history"]
        epoch = [row["epoch"] for row in h]
        for ax, key in zip(axes[:3], ("mean_reward", "mean_latency_s", "mean_energy_j"), strict=True):
            ax.plot(epoch, [row[key] for row in h], label=name, lw=1.2)
    axes[1].axhline(env["latency_limit_s"], color="red", ls="--", label="limit")
    axes[2].axhline(env["energy_limit_j"], color="red", ls="--", label="limit")
    for ax, title in zip(axes[:3], ("reward (−log MSE)", "latency per request (s)", "energy per request (J)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    if tradeoff:
        axes[3].plot([r["latency_limit_s"] for r in tradeoff], [r["cvpo+margin_mean_mse"] for r in tradeoff], "-o", label="CVPO+margin")
        axes[3].plot([r["latency_limit_s"] for r in tradeoff], [r["oracle_mean_mse"] for r in tradeoff], "--", label="oracle")
        axes[3].set_xlabel("latency limit (s)")
        axes[3].set_ylabel("held-out mean MSE")
        axes[3].set_yscale("log")
        axes[3].set_title("distortion–cost trade-off")
        axes[3].legend(fontsize=8)
    _finish(plt, fig, path, "Planners on MEG's MDP (SDXL-1024 costs, meg-tiny distortion)", dpi=100)


# ------------------------------------------------------------------------------- command
def _print(results: dict[str, Any]) -> None:
    console = Console(width=150)
    if "fig3" in results:
        t = Table(title=f"Fig. 3 analogue: SDXL-1024 costs, meg-tiny MSE at σ = {results['fig3']['sigma']:g}")
        for col in ("scheme", "distance m", "SNR dB", "steps", "merge", "latency s", "energy J", "MSE"):
            t.add_column(col, justify="left" if col == "scheme" else "right")
        ends = {results["fig3"]["rows"][0]["distance_m"], results["fig3"]["rows"][-1]["distance_m"]}
        for r in results["fig3"]["rows"]:
            if r["distance_m"] in ends:
                t.add_row(r["scheme"], f"{r['distance_m']:.0f}", f"{r['snr_db']:+.1f}", str(r["steps"]), f"{r['merge_ratio']:g}",
                          f"{r['latency_s']:.2f}", f"{r['energy_j']:.0f}", f"{r['mse']:.2e}")
        console.print(t)
        for h in results["fig3"]["headline"]:
            console.print(f"{h['distance_m']:.0f} m: MEG {h['meg_latency_s']:.2f} s vs CEG {h['ceg_latency_s']:.2f} s "
                          f"({h['latency_reduction']:.0%} lower); MSE MEG {h['meg_mse']:.2e} vs MS {h['ms_mse']:.2e} -> "
                          f"{'met' if h['met'] else 'NOT met'}")
    if "fig5" in results:
        t = Table(title="Fig. 5 analogue: MSE vs merge ratio (σ, steps fixed)")
        t.add_column("decoder")
        first = next(iter(results["fig5"]["curves"].values()))
        for x in first["merge_ratio"]["x"]:
            t.add_column(f"r={x:g}", justify="right")
        for label, c in results["fig5"]["curves"].items():
            t.add_row(label, *(f"{v:.2e}" for v in c["merge_ratio"]["mse"]))
        console.print(t)
        best = results["fig5"]["best"]
        t = Table(title=f"Best device decoder per (steps, merge ratio) at σ = {results['fig5']['sigma']:g} (meg-tiny MSE)")
        t.add_column("steps")
        for x in best["merge_ratio"]:
            t.add_column(f"r={x:g}")
        for n, row in zip(best["steps"], best["decoder"], strict=True):
            t.add_row(f"{n:g}", *row)
        console.print(t)
    if "policies" in results:
        env = results["policies"]["env"]
        t = Table(title=f"Planners, {results['config']['episodes']} held-out episodes; limits {env['latency_limit_s']:g} s, "
                        f"{env['energy_limit_j']:g} J")
        for col in ("algo", "MSE", "× oracle", "latency s", "energy J", "lat. viol.", "energy viol."):
            t.add_column(col, justify="left" if col == "algo" else "right")
        for r in results["policies"]["rows"]:
            t.add_row(r["algo"], f"{r['mean_mse']:.2e}", f"{r['mse_vs_oracle']:.2f}", f"{r['mean_latency_s']:.2f}",
                      f"{r['mean_energy_j']:.0f}", f"{r['latency_violation_rate']:.1%}", f"{r['energy_violation_rate']:.1%}")
        console.print(t)
    if "tradeoff" in results:
        t = Table(title="Trade-off: CVPO+margin retrained per latency limit")
        for col in ("limit s", "MSE", "oracle MSE", "latency s", "lat. viol."):
            t.add_column(col, justify="right")
        for r in results["tradeoff"]:
            t.add_row(f"{r['latency_limit_s']:g}", f"{r['cvpo+margin_mean_mse']:.2e}", f"{r['oracle_mean_mse']:.2e}",
                      f"{r['cvpo+margin_mean_latency_s']:.2f}", f"{r['cvpo+margin_latency_violation_rate']:.1%}")
        console.print(t)
    if "tome" in results:
        tome = results["tome"]
        console.print(f"ToMe {tome['ratio']:g} at SDXL-1024: UNet pass {tome['sdxl_1024']['flops_saving']:.1%} fewer FLOPs")
        for r in tome["meg_tiny"]:
            line = (f"meg-tiny {r['side_px']} px: edge FLOPs {r['flops_saving']:+.1%} saved, CPU time "
                    f"{r['edge_s_median'] * 1e3:.0f} -> {r['edge_s_tome_median'] * 1e3:.0f} ms ({r['time_saving']:+.1%} saved)")
            if "mse_tome_vs_plain" in r:
                line += (f"; MSE ToMe vs none {r['mse_tome_vs_plain']:.2e}, vs reference {r['mse_vs_reference_plain']:.2e}"
                         f" -> {r['mse_vs_reference_tome']:.2e}")
            console.print(line)


@click.command("paper-meg")
@click.option("--parts", default=",".join(PARTS), show_default=True, help=f"Comma-separated parts: {', '.join(PARTS)}.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/results/paper-meg.json"), show_default=True, help="Write results here.")
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("benchmarks/results"), show_default=True, help="Write paper-meg-*.png here.")
@click.option("--episodes", type=click.IntRange(min=1), default=PaperMegConfig.episodes, show_default=True)
@click.option("--epochs-scale", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Multiply every training run's epochs (e.g. 0.1 for a quick look).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads.")
def bench_paper_meg(parts: str, json_path: Path, plot_dir: Path, episodes: int, epochs_scale: float, threads: int) -> None:
    """MEG's paper figures at SDXL-1024 cost scale with meg-tiny distortion: Fig. 3 (latency,
    energy vs distance), Fig. 5 (decoders), planners' training curves and held-out episodes,
    the distortion–cost trade-off, and ToMe in the edge UNet."""
    import torch

    torch.set_num_threads(threads)
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise click.BadParameter(f"unknown parts {unknown}; known: {', '.join(PARTS)}", param_hint="--parts")
    base = PaperMegConfig()
    config = dataclasses.replace(base, episodes=episodes,
                                 epochs={k: max(1, round(v * epochs_scale)) for k, v in base.epochs.items()},
                                 tradeoff_epochs=max(1, round(base.tradeoff_epochs * epochs_scale)))
    results: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() else {}
    results["config"] = dataclasses.asdict(config)
    plot_dir.mkdir(parents=True, exist_ok=True)
    if "fig3" in chosen:
        results["fig3"] = run_fig3(config)
        plot_fig3(results["fig3"], plot_dir / "paper-meg-fig3.png")
    if "fig5" in chosen:
        results["fig5"] = run_fig5(config)
        plot_fig5(results["fig5"], plot_dir / "paper-meg-fig5.png")
    if "policies" in chosen:
        results["policies"] = run_policies(config)
    if "tradeoff" in chosen:
        results["tradeoff"] = run_tradeoff(config)
    if "policies" in results and ("policies" in chosen or "tradeoff" in chosen):
        plot_policies(results["policies"], results.get("tradeoff"), plot_dir / "paper-meg-policies.png")
    if "tome" in chosen:
        results["tome"] = run_tome(config)
    _print(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    click.echo(f"wrote {json_path} and {plot_dir}/paper-meg-*.png")
