"""PNG plot of BER curves: measured points over closed-form lines, one panel per channel."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from meg.channel.ber import BerPoint
from meg.channel.theory import ber_theory

__all__ = ["plot_ber"]

_COLOURS = {"bpsk": "tab:blue", "qpsk": "tab:orange", "16qam": "tab:green", "64qam": "tab:red"}
_TITLES = {"awgn": "AWGN", "rayleigh": "Rayleigh fading", "rician": "Rician fading"}


def plot_ber(rows: Sequence[BerPoint], path: Path, *, rician_k: float = 3.0, title: str | None = None) -> Path:
    """Write a semilog BER-vs-Eb/N0 plot of ``rows`` to ``path`` (PNG) and return the path.

    Markers are measurements (points with no errors are left out: log scale), lines the
    exact theory on a fine grid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fadings = list(dict.fromkeys(row.fading for row in rows))
    fig, axes = plt.subplots(1, len(fadings), figsize=(5.5 * len(fadings), 4.5), squeeze=False, sharey=True)
    floor = 1.0
    for axis, fading in zip(axes[0], fadings, strict=True):
        panel = [row for row in rows if row.fading == fading]
        for modulation in dict.fromkeys(row.modulation for row in panel):
            curve = [row for row in panel if row.modulation == modulation]
            colour = _COLOURS.get(modulation)
            snr = np.array([row.snr_db for row in curve])
            grid = np.linspace(snr.min(), snr.max(), 200)
            theory = ber_theory(modulation, grid, fading, rician_k)  # type: ignore[arg-type]
            # BPSK and Gray QPSK share one curve: dash QPSK so both stay visible
            style = "--" if modulation == "qpsk" else "-"
            axis.semilogy(grid, theory, style, color=colour, linewidth=1.2, label=f"{modulation} theory")
            measured = [(row.snr_db, row.ber) for row in curve if row.errors > 0]
            if measured:
                x, y = zip(*measured, strict=True)
                axis.semilogy(x, y, "o", color=colour, markersize=4, label=f"{modulation} simulated")
                floor = min(floor, min(y))
        axis.set_title(_TITLES.get(fading, fading) + (f" (K = {rician_k:g})" if fading == "rician" else ""))
        axis.set_xlabel("Eb/N0 (dB)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel("bit error rate")
    axes[0][0].set_ylim(max(floor / 3, 1e-7), 0.6)
    bits = max(row.bits for row in rows)
    fig.suptitle(title or f"Gray-mapped modems, coherent detection, {bits:,} bits per point")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
