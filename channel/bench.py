"""`meg bench channel`: complex symbols per second through each channel model on this machine.

Each row times one call on a batch of ``--symbols`` unit-energy symbols (fresh random
draws inside the call: gains, noise), after warm-up, and reports the median and best
wall time of ``--repeats`` runs, with the process CPU time beside it (a wall time far
above the CPU time per thread means other work competed for the cores). Same process,
same batch, so the rows compare like with like.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class ChannelBench:
    """Defaults of the channel benchmark."""

    symbols: int = 1 << 20
    """Symbols per timed call."""
    repeats: int = 7
    """Timed calls per model (median and best are reported)."""
    warmup: int = 2
    """Untimed calls first."""
    seed: int = 0
    """Seed of the generator."""
    threads: int = 1
    """torch intra-op threads; elementwise work on 2 shared cores runs best on one."""


_DEFAULTS = ChannelBench()


def _cases(symbols: int, seed: int) -> list[tuple[str, Callable[[], object]]]:
    import torch

    from meg.channel.awgn import AWGN
    from meg.channel.correlated import GaussMarkovFading
    from meg.channel.equalization import mmse_equalize, zf_equalize
    from meg.channel.modem import Modem
    from meg.channel.rayleigh import RayleighBlockFading, RayleighFading, RayleighFastFading
    from meg.channel.rician import RicianFading

    g = torch.Generator().manual_seed(seed)
    qpsk = Modem("qpsk")
    qam = Modem("16qam")
    bits = torch.randint(0, 2, (symbols * 4,), generator=g, dtype=torch.uint8)
    x = qpsk.modulate(bits[: symbols * 2])
    blocks = x.reshape(-1, 1024)
    noise_var = 0.1
    y, h = RayleighFastFading()(x, noise_var, generator=g, return_gains=True)
    state = GaussMarkovFading(0.9).initial((symbols,), generator=g)
    awgn, fast, block64 = AWGN(), RayleighFastFading(), RayleighFading(64)
    per_example, rician = RayleighBlockFading(), RicianFading(3.0)
    process = GaussMarkovFading(0.9)
    return [
        ("awgn", lambda: awgn(x, noise_var, generator=g)),
        ("rayleigh fast fading", lambda: fast(x, noise_var, generator=g)),
        ("rayleigh fast fading + gains", lambda: fast(x, noise_var, generator=g, return_gains=True)),
        ("rayleigh block fading (L=64)", lambda: block64(x, noise_var, generator=g)),
        ("rayleigh block fading (per 1024)", lambda: per_example(blocks, noise_var, generator=g)),
        ("rician fast fading (K=3)", lambda: rician(x, noise_var, generator=g)),
        ("gauss-markov step (rho=0.9)", lambda: process.step(state, generator=g)),
        ("zf equalisation", lambda: zf_equalize(y, h, noise_var)),
        ("mmse equalisation", lambda: mmse_equalize(y, h, noise_var)),
        ("qpsk modulate", lambda: qpsk.modulate(bits[: symbols * 2])),
        ("qpsk demodulate", lambda: qpsk.demodulate(y)),
        ("16qam modulate", lambda: qam.modulate(bits)),
        ("16qam demodulate", lambda: qam.demodulate(y)),
    ]


@click.command("channel")
@click.option("--symbols", default=_DEFAULTS.symbols, show_default=True, type=click.IntRange(min=1024), help="Symbols per call.")
@click.option("--repeats", default=_DEFAULTS.repeats, show_default=True, type=click.IntRange(min=1), help="Timed calls per model.")
@click.option("--warmup", default=_DEFAULTS.warmup, show_default=True, type=click.IntRange(min=0), help="Untimed calls first.")
@click.option("--seed", default=_DEFAULTS.seed, show_default=True, help="Generator seed.")
@click.option("--threads", default=_DEFAULTS.threads, show_default=True, type=click.IntRange(min=1),
              help="torch intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the rows to this JSON file.")
def bench_channel(symbols: int, repeats: int, warmup: int, seed: int, threads: int, json_path: Path | None) -> None:
    """Symbols per second through each channel model, modem and equaliser."""
    import torch
    from rich.progress import track

    torch.set_num_threads(threads)
    symbols = symbols // 1024 * 1024
    cases = _cases(symbols, seed)
    rows: list[dict[str, Any]] = []
    for name, call in track(cases, description="channel models", console=Console(stderr=True), transient=True):
        for _ in range(warmup):
            call()
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        median_s, best_s = statistics.median(times), min(times)
        # CPU time of this process (all threads): far below wall time when other work competes
        rows.append({"model": name, "symbols": symbols, "median_s": median_s, "best_s": best_s,
                     "cpu_median_s": statistics.median(cpu_times),
                     "msymbols_per_s_median": symbols / median_s / 1e6, "msymbols_per_s_best": symbols / best_s / 1e6})
    table = Table("model", "symbols", "median ms", "CPU ms", "Msym/s (median)", "Msym/s (best)",
                  title=f"Channel throughput, complex64, {torch.get_num_threads()} thread(s)")
    for row in rows:
        table.add_row(row["model"], f"{symbols:,}", f"{row['median_s'] * 1e3:.2f}", f"{row['cpu_median_s'] * 1e3:.2f}",
                      f"{row['msymbols_per_s_median']:.1f}", f"{row['msymbols_per_s_best']:.1f}")
    Console(width=max(Console().width, 110)).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"benchmark": "channel", "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor(), "config": asdict(ChannelBench(symbols, repeats, warmup, seed, threads))}
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
