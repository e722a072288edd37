"""`meg bench meg-headline`: MEG against conventional edge generation at SDXL 1024×1024.

MEG's headline (PAPERS.md §1): with the UNet on the edge and only the (merged) latent on
the link, end-to-end latency is more than 40% below conventional edge generation (CEG: the
edge generates and decodes, and sends the image), over MEG's noisy 1 MHz link at 200–300 m.
This benchmark evaluates both with the project's cost model (`meg.policy.costs.CostModel`:
FLOPs of an SDXL-shaped UNet, VAE decoder and text encoders counted on the meta device, the
`rtx-3080-ti` edge and `jetson-agx-orin` device profiles, Shannon-rate airtime of the bits
that cross at MEG's path-loss SNR), over distances and step counts. It is a model, not a
measurement on SDXL hardware: the profiles are our own (the paper's κ, ε are unpublished).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["HeadlineRow", "run_headline"]


@dataclass(frozen=True)
class HeadlineRow:
    distance_m: float
    snr_db: float
    steps: int
    merge_ratio: float
    ceg_latency_s: float
    meg_latency_s: float
    latency_reduction: float
    """1 − MEG / CEG."""
    ceg_energy_j: float
    meg_energy_j: float
    ceg_bits: float
    meg_bits: float


def run_headline(*, resolution: int = 1024, steps: tuple[int, ...] = (4, 8, 12),
                 distances_m: tuple[float, ...] = (200.0, 225.0, 250.0, 275.0, 300.0),
                 merge_ratios: tuple[float, ...] = (0.0, 0.5), table: str = "meg-tiny") -> list[HeadlineRow]:
    """One row per (distance, steps, merge ratio)."""
    from meg.channel.pathloss import MEG_LINK_BUDGET
    from meg.devices import load_profile
    from meg.policy.costs import SPLIT_CODES, CostModel, crossing_bits
    from meg.policy.distortion import load_table

    flops = load_table(table).cost_flops["by_resolution"][str(resolution)]
    costs = CostModel(load_profile("rtx-3080-ti"), load_profile("jetson-agx-orin"), {resolution**2: flops},
                      bandwidth_hz=MEG_LINK_BUDGET.bandwidth_hz)
    pixels = float(resolution**2)
    image, decoder = SPLIT_CODES.index("image"), SPLIT_CODES.index("decoder")
    rows = []
    for distance in distances_m:
        snr = float(MEG_LINK_BUDGET.snr_db(distance))
        for n in steps:
            ceg = costs(np.array(image), np.array(n), np.array(0.0), np.array(snr), np.array(pixels))
            for ratio in merge_ratios:
                meg = costs(np.array(decoder), np.array(n), np.array(ratio), np.array(snr), np.array(pixels))
                rows.append(HeadlineRow(
                    distance_m=distance, snr_db=snr, steps=n, merge_ratio=ratio,
                    ceg_latency_s=float(ceg.latency_s), meg_latency_s=float(meg.latency_s),
                    latency_reduction=1.0 - float(meg.latency_s) / float(ceg.latency_s),
                    ceg_energy_j=float(ceg.energy_j), meg_energy_j=float(meg.energy_j),
                    ceg_bits=float(crossing_bits(np.array(image), np.array(pixels), np.array(0.0))),
                    meg_bits=float(crossing_bits(np.array(decoder), np.array(pixels), np.array(ratio)))))
    return rows


def _plot(rows: list[HeadlineRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for n in sorted({r.steps for r in rows}):
        ceg = [r for r in rows if r.steps == n and r.merge_ratio == rows[0].merge_ratio]
        ax.plot([r.distance_m for r in ceg], [r.ceg_latency_s for r in ceg], "--", label=f"CEG, {n} steps")
        for ratio in sorted({r.merge_ratio for r in rows}):
            sel = [r for r in rows if r.steps == n and r.merge_ratio == ratio]
            ax.plot([r.distance_m for r in sel], [r.meg_latency_s for r in sel], "-o", ms=3,
                    label=f"MEG, {n} steps, merge {ratio:g}")
    ax.set_xlabel("edge–device distance (m)")
    ax.set_ylabel("modelled end-to-end latency (s)")
    ax.set_yscale("log")
    ax.set_title("SDXL 1024², 1 MHz link: MEG vs CEG (modelled)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("meg-headline")
@click.option("--resolution", type=int, default=1024, show_default=True, help="Square image side (the table's cost FLOPs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG here.")
def bench_headline(resolution: int, json_path: Path | None, plot_path: Path | None) -> None:
    """MEG (decoder split, merged latent) vs conventional edge generation (image split) at
    SDXL resolution over MEG's link: modelled latency, energy and bits (cost model, not SDXL
    hardware)."""
    rows = run_headline(resolution=resolution)
    table = Table(title=f"MEG vs CEG, SDXL-shaped model at {resolution}², 1 MHz link (modelled)")
    for column in ("distance m", "SNR dB", "steps", "merge", "CEG s", "MEG s", "reduction", "CEG J", "MEG J",
                   "CEG kbit", "MEG kbit"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r.distance_m:.0f}", f"{r.snr_db:+.1f}", str(r.steps), f"{r.merge_ratio:g}",
                      f"{r.ceg_latency_s:.2f}", f"{r.meg_latency_s:.2f}", f"{r.latency_reduction:.0%}",
                      f"{r.ceg_energy_j:.0f}", f"{r.meg_energy_j:.0f}", f"{r.ceg_bits / 1e3:.0f}",
                      f"{r.meg_bits / 1e3:.0f}")
    Console(width=140).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if plot_path is not None:
        _plot(rows, plot_path)
