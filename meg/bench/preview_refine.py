"""`meg bench preview-refine`: multi-round sessions, DiffusionX's comparison (PAPERS.md §3).

Each session has 3–6 rounds (seeded); its final prompt is one held-out prompt of the
strength profile (`meg.policy.preview_strength.run_profile`), whose judge fidelities were
measured for the preview, the edge's from-scratch image and the refine at every strength.
Every earlier round costs what any round costs (the FLOPs do not depend on the words), so
the session's time is modelled from the measured FLOPs on the named device profiles and
the link; the final fidelity is the measured one of its final prompt.

Methods: the edge model every round (the paper's SD v1.5 role, decoder split: latent down,
device decodes), the preview model only (Tiny-SD role), preview + refine at each fixed
strength, with the predictor, and with the per-request oracle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["PreviewRefineBenchConfig", "bench_preview_refine", "run_bench"]

PAPER = {"time_vs_sd15": -0.158, "time_vs_tiny_sd": 0.009}
"""DiffusionX's reported numbers: session time vs SD v1.5 every round, vs Tiny-SD only."""


@dataclass(frozen=True)
class PreviewRefineBenchConfig:
    sessions: int = 200
    min_rounds: int = 3
    max_rounds: int = 6
    seed: int = 0
    device_profile: str = "jetson-agx-orin"
    edge_profile: str = "rtx-3080-ti"
    link_bps: float = 10e6
    """Link rate both ways (10 Mbit/s, as in the Hybrid SR paper)."""
    latent_bytes: int = 2 * 4 * 16 * 16
    """The fp16 latent that crosses (meg-tiny at 128 px: [1, 4, 16, 16])."""


def _method_rows(records: list[dict[str, Any]], strengths: dict[str, np.ndarray], rounds: np.ndarray,
                 config: PreviewRefineBenchConfig) -> list[dict[str, Any]]:
    from meg.devices import load_profile

    device, edge = load_profile(config.device_profile), load_profile(config.edge_profile)
    flops = records[0]["flops"]
    link_s = config.latent_bytes * 8 / config.link_bps
    preview_s = device.compute_latency_s(flops["preview_device"])  # the device split: its decode included
    edge_round_s = edge.compute_latency_s(flops["scratch_edge"]) + link_s + device.compute_latency_s(flops["decode_device"])
    decode_s = device.compute_latency_s(flops["decode_device"])
    fid_scratch = np.asarray([r["scratch_fidelity"] for r in records])
    fid_preview = np.asarray([r["preview_fidelity"] for r in records])
    rows = [
        {"method": "edge every round", "time_s": rounds * edge_round_s, "edge_flops": rounds * flops["scratch_edge"],
         "fidelity": fid_scratch},
        {"method": "preview only", "time_s": rounds * preview_s, "edge_flops": np.zeros(len(records)), "fidelity": fid_preview},
    ]
    for name, s in strengths.items():
        refine_s = np.asarray([edge.compute_latency_s(flops[f"refine_edge:{float(v)}"]) for v in s])
        refine_flops = np.asarray([flops[f"refine_edge:{float(v)}"] for v in s])
        fid = np.asarray([r["refine_fidelity"][str(float(v))] for r, v in zip(records, s, strict=True)])
        rows.append({"method": name, "time_s": rounds * preview_s + 2 * link_s + refine_s + decode_s,
                     "edge_flops": refine_flops, "fidelity": fid, "strength": s})
    out = []
    base_time = rows[0]["time_s"].mean()
    base_flops = rows[0]["edge_flops"].mean()
    preview_time = rows[1]["time_s"].mean()
    for row in rows:
        out.append({
            "method": row["method"],
            "mean_time_s": float(row["time_s"].mean()),
            "time_vs_edge_every_round": float(row["time_s"].mean() / base_time - 1),
            "time_vs_preview_only": float(row["time_s"].mean() / preview_time - 1),
            "edge_flops_per_session": float(row["edge_flops"].mean()),
            "edge_flops_vs_edge_every_round": float(row["edge_flops"].mean() / base_flops - 1),
            "final_fidelity": float(row["fidelity"].mean()),
            **({"mean_strength": float(np.mean(row["strength"]))} if "strength" in row else {}),
        })
    return out


def measure_here(model: str, prompts: list[str], grid: tuple[float, ...], *, refine_steps: int = 4,
                 preview_steps: int = 2) -> dict[str, float]:
    """Mean wall seconds on this machine (one torch thread, edge and device alike) of a
    preview round (previewer + decode), an edge round (edge UNet from scratch + decode) and
    a refine at each strength (img2img + decode)."""
    import contextlib
    import time
    from collections.abc import Iterator
    from dataclasses import replace

    import torch

    import meg.models  # noqa: F401
    from meg.recipes.preview_refine import preview_engine
    from meg.split.engine import GenerationInputs
    from meg.split.loading import load_pipeline

    pipeline = load_pipeline(model)
    engine, _ = preview_engine(pipeline, model)
    size = engine.native_size_px
    totals: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        started = time.perf_counter()
        with torch.no_grad():
            yield
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

    for i, prompt in enumerate(prompts):
        base = GenerationInputs(prompt=prompt, seed=i, steps=refine_steps, height=size, width=size)
        with timed("preview"):
            latent = engine.generate_latents(replace(base, steps=preview_steps), unet=engine.device_unet)
            engine.decode(engine.vae, latent)
        with timed("edge_round"):
            engine.decode(engine.vae, engine.generate_latents(base))
        for s in grid:
            with timed(f"refine:{s}"):
                engine.decode(engine.vae, engine.run_img2img(base, latent, s))
    return {k: v / len(prompts) for k, v in totals.items()}


def measured_rows(times: dict[str, float], strengths: dict[str, np.ndarray], rounds: np.ndarray) -> list[dict[str, Any]]:
    """Mean measured session time per method from `measure_here`'s per-operation times."""
    rows = [("edge every round", rounds * times["edge_round"]), ("preview only", rounds * times["preview"])]
    for name, s in strengths.items():
        rows.append((name, rounds * times["preview"] + np.asarray([times[f"refine:{float(v)}"] for v in s])))
    base = float(rows[0][1].mean())
    preview = float(rows[1][1].mean())
    return [{"method": name, "mean_time_s": float(t.mean()), "time_vs_edge_every_round": float(t.mean()) / base - 1,
             "time_vs_preview_only": float(t.mean()) / preview - 1} for name, t in rows]


def run_bench(train_profile: Path, heldout_profile: Path, config: PreviewRefineBenchConfig = PreviewRefineBenchConfig(),
              predictor_dir: Path | None = None, measure: int = 0) -> dict[str, Any]:
    """The comparison as a dict (rows per method, predictor agreement with the oracle); with
    ``measure`` > 0 also the session times measured here on that many held-out prompts."""
    from meg.policy.preview_strength import (
        StrengthPredictor,
        load_profile_records,
        train_strength,
        xy,
    )

    _, train = load_profile_records(train_profile)
    header, heldout = load_profile_records(heldout_profile)
    predictor = StrengthPredictor.load(predictor_dir) if predictor_dir is not None else train_strength(train)
    n = min(config.sessions, len(heldout))
    heldout = heldout[:n]
    rng = np.random.default_rng(config.seed)
    rounds = rng.integers(config.min_rounds, config.max_rounds + 1, size=n).astype(float)
    x, oracle = xy(heldout)
    predicted = predictor.predict(x)
    grid = predictor.grid
    strengths = {f"refine s={s}": np.full(n, s) for s in grid}
    strengths["refine, predictor"] = predicted
    strengths["refine, oracle"] = oracle
    rows = _method_rows(heldout, strengths, rounds, config)
    measured: dict[str, Any] = {}
    if measure > 0:
        times = measure_here(str(header.get("model", "meg-tiny")), [r["prompt"] for r in heldout[:measure]], grid)
        measured = {"prompts": measure, "per_operation_s": times, "rows": measured_rows(times, strengths, rounds)}
    return {
        "config": asdict(config), "profile": header, "sessions": n, "mean_rounds": float(rounds.mean()),
        "predictor": {"grid": list(grid), "margin": predictor.margin,
                      "within_0.1_of_oracle": float(np.mean(np.abs(predicted - oracle) <= 0.1 + 1e-9)),
                      "below_oracle": float(np.mean(predicted < oracle - 1e-9)),
                      "oracle_histogram": {str(s): int(np.sum(oracle == s)) for s in grid},
                      "predicted_histogram": {str(s): int(np.sum(predicted == s)) for s in grid}},
        "rows": rows, "measured_here": measured, "paper": PAPER,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        ax.scatter(row["mean_time_s"], row["final_fidelity"], label=row["method"])
    ax.set_xlabel("mean session time, modelled (s)")
    ax.set_ylabel("final judge fidelity")
    ax.set_title(f"preview-refine, {result['sessions']} sessions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("preview-refine")
@click.option("--train-profile", type=click.Path(exists=True, path_type=Path),
              default=Path("runs/preview-strength/profile-independent_val.json"), show_default=True)
@click.option("--heldout-profile", type=click.Path(exists=True, path_type=Path),
              default=Path("runs/preview-strength/profile-independent.json"), show_default=True)
@click.option("--predictor", "predictor_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A shipped predictor folder (default: fit on --train-profile).")
@click.option("--sessions", type=int, default=PreviewRefineBenchConfig.sessions, show_default=True)
@click.option("--measure", type=int, default=20, show_default=True,
              help="Held-out prompts whose operations are also timed here (0: modelled only).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/results/preview_refine.json"), show_default=True)
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("benchmarks/results/preview_refine.png"), show_default=True)
def bench_preview_refine(train_profile: Path, heldout_profile: Path, predictor_dir: Path | None, sessions: int,
                         measure: int, json_path: Path, png_path: Path) -> None:
    """Sessions of 3-6 rounds: edge every round, preview only, preview + refine (fixed s,
    predictor, oracle); modelled time, edge FLOPs, final fidelity. Table, JSON, PNG."""
    config = PreviewRefineBenchConfig(sessions=sessions)
    import torch

    torch.set_num_threads(1)
    result = run_bench(train_profile, heldout_profile, config, predictor_dir, measure)
    click.echo(f"{'method':<22} {'time s':>8} {'vs edge':>8} {'vs prev':>8} {'edge GF':>8} {'vs edge':>8} {'fidelity':>8}")
    for r in result["rows"]:
        click.echo(f"{r['method']:<22} {r['mean_time_s']:>8.4f} {r['time_vs_edge_every_round']:>+8.1%} "
                   f"{r['time_vs_preview_only']:>+8.1%} {r['edge_flops_per_session'] / 1e9:>8.3f} "
                   f"{r['edge_flops_vs_edge_every_round']:>+8.1%} {r['final_fidelity']:>8.3f}")
    if result["measured_here"]:
        click.echo(f"measured here ({measure} prompts, one thread, edge and device on this CPU):")
        for r in result["measured_here"]["rows"]:
            click.echo(f"{r['method']:<22} {r['mean_time_s']:>8.4f} {r['time_vs_edge_every_round']:>+8.1%} "
                       f"{r['time_vs_preview_only']:>+8.1%}")
    p = result["predictor"]
    click.echo(f"predictor within 0.1 of the oracle on {p['within_0.1_of_oracle']:.1%} of {result['sessions']} held-out "
               f"requests (below it on {p['below_oracle']:.1%}); margin {p['margin']}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, png_path)
    click.echo(f"wrote {json_path} and {png_path}")
