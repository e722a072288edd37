"""`meg bench engine`: wall-clock time of the unsplit run and of each split's partitions."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click


@dataclass(frozen=True)
class EngineBenchConfig:
    """Defaults of `meg bench engine`."""

    model: str = "tiny-random"
    """Model name or local diffusers folder."""
    steps: int = 4
    """Denoising steps."""
    size: int = 64
    """Image height = width in pixels."""
    repeats: int = 5
    """Timed runs per row (after one warm-up run); the median and minimum are reported."""
    threads: int = 1
    """torch intra-op threads (one avoids thread-pool spinning on a shared CPU)."""


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


_D = EngineBenchConfig()


@click.command("engine")
@click.option("--model", default=_D.model, show_default=True, help="Model name or local diffusers folder.")
@click.option("--steps", default=_D.steps, show_default=True, type=int, help="Denoising steps.")
@click.option("--size", default=_D.size, show_default=True, type=int, help="Image side in pixels.")
@click.option("--repeats", default=_D.repeats, show_default=True, type=int, help="Timed runs per row.")
@click.option("--threads", default=_D.threads, show_default=True, type=int, help="torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows here.")
def bench_engine(model: str, steps: int, size: int, repeats: int, threads: int, json_path: Path | None) -> None:
    """Time run_full and each split point's edge and device partitions (torch, CPU)."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from meg.split.engine import GenerationInputs, SplitEngine
    from meg.split.loading import load_pipeline

    config = EngineBenchConfig(model, steps, size, repeats, threads)
    torch.set_num_threads(threads)
    engine = SplitEngine(load_pipeline(model))
    inputs = GenerationInputs("a red cube on a blue floor", height=size, width=size, steps=steps)
    reference = engine.run_full(inputs)
    full_median, full_min = _time(lambda: engine.run_full(inputs), repeats)
    rows: list[dict[str, Any]] = [{"split": "unsplit", "edge_s": 0.0, "device_s": full_median, "total_min_s": full_min,
             "crossing_bytes_fp16": 0, "max_abs_diff": 0.0}]
    for split in tqdm(engine.split_points(steps), desc="split points"):
        crossing = engine.run_edge(inputs, split)
        edge_median, edge_min = _time(partial(engine.run_edge, inputs, split), repeats)
        device_median, device_min = _time(partial(engine.run_device, crossing, inputs, split), repeats)
        image = engine.run_device(crossing, inputs, split)
        rows.append({
            "split": str(split),
            "edge_s": edge_median,
            "device_s": device_median,
            "total_min_s": edge_min + device_min,
            "crossing_bytes_fp16": sum(s.nbytes_fp16 for s in engine.crossing(split, inputs)),
            "max_abs_diff": float((image - reference).abs().max()),
        })

    table = Table(title=f"{model}, {size}×{size}, {steps} steps, {threads} thread(s), median of {repeats}")
    for column in ("split", "edge s", "device s", "edge+device min s", "crossing bytes (fp16)", "max |Δ| vs unsplit"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for row in rows:
        table.add_row(row["split"], f"{row['edge_s']:.3f}", f"{row['device_s']:.3f}", f"{row['total_min_s']:.3f}",
                      f"{row['crossing_bytes_fp16']:,}", f"{row['max_abs_diff']:.1e}")
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"config": asdict(config), "rows": rows}, indent=2))
