"""`meg bench split`: what every split point costs, modelled and measured.

For each split point of one generation: the bytes that cross the cut (raw fp16), the FLOPs
on each side (``torch.utils.flop_counter``), the latency the device profiles predict for
them, the measured time of the device partition in eager torch and in ONNX Runtime (same
thread count, warm-up runs, median of repeats), and the largest pixel difference of the
split output from the unsplit reference.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table

from meg.errors import InvalidInputError, MegError

__all__ = ["SplitBenchConfig", "SplitBenchRow", "bench_split", "interleaved_median_s", "run_split_bench"]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("MEG_CACHE_DIR", Path.home() / ".cache" / "meg")) / "onnx"


@dataclass(frozen=True)
class SplitBenchConfig:
    """What `meg bench split` runs."""

    model: str = "tiny-random"
    """Pipeline to split (`meg.split.loading.load_pipeline` argument)."""
    prompt: str = "a red cube on a blue floor"
    """Prompt of the benchmarked generation."""
    steps: int = 4
    """Denoising steps."""
    warmup: int = 2
    """Untimed device-partition runs per runtime and split."""
    repeats: int = 7
    """Timed runs per runtime and split; the median is reported."""
    edge_profile: str = "rtx-3080-ti"
    """Profile that models the edge partition."""
    device_profiles: tuple[str, ...] = ("jetson-agx-orin", "phone-class", "this-machine")
    """Profiles that model the device partition."""
    exporter: str = "auto"
    """ONNX exporter (`meg.split.onnx_export.ExportOptions.exporter`)."""
    onnx_dir: Path | None = None
    """Export folder; default ``$MEG_CACHE_DIR/onnx/MODEL-HxW`` (content-hash cached)."""
    splits: tuple[str, ...] = ()
    """Split points to run (canonical text); empty: every split point of the pipeline."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """onnxruntime execution providers (a missing one is an error, see `OnnxRuntime`)."""
    threads: int = 1
    """Threads of torch and of onnxruntime alike. One by default: on a shared machine a
    thread pool that spins on busy cores makes timings noise."""


@dataclass(frozen=True)
class SplitBenchRow:
    """One split point."""

    split: str
    crossing_bytes_fp16: int
    edge_gflops: float
    device_gflops: float
    torch_s: float
    onnx_s: float
    onnx_speedup: float
    max_abs_diff: float
    max_abs_diff_onnx: float
    modelled_latency_s: dict[str, float] = field(default_factory=dict)
    """Edge-profile latency of the edge FLOPs + device-profile latency of the device FLOPs,
    per device profile (transmission excluded)."""


def interleaved_median_s(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time of each callable, timed in alternation (a, b, a, b, …).

    Alternating makes a load change on a shared machine hit every contender alike, where
    timing one after the other would hand the quieter period to one of them.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidInputError(f"need repeats >= 1 and warmup >= 0, got {repeats!r}, {warmup!r}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_split_bench(config: SplitBenchConfig = SplitBenchConfig(), *, console: Console | None = None) -> tuple[list[SplitBenchRow], dict[str, Any]]:
    """Run the benchmark; return the rows and the run's metadata (threads, exporter, …)."""
    if config.threads < 1:
        raise InvalidInputError(f"threads must be >= 1, got {config.threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, console or Console())
    finally:
        torch.set_num_threads(previous)


def _run(config: SplitBenchConfig, console: Console) -> tuple[list[SplitBenchRow], dict[str, Any]]:
    from rich.progress import Progress

    from meg.devices import load_profile
    from meg.split.engine import GenerationInputs, SplitEngine
    from meg.split.flops import partition_flops
    from meg.split.loading import load_pipeline
    from meg.split.onnx_cli import parts_for_split
    from meg.split.onnx_export import ExportOptions, export_partitions
    from meg.split.points import SplitPoint
    from meg.split.runtime import DeviceRuntime, OnnxRuntime, TorchRuntime

    pipeline = load_pipeline(config.model)
    engine = SplitEngine(pipeline)
    inputs = GenerationInputs(prompt=config.prompt, steps=config.steps)
    edge = load_profile(config.edge_profile)
    devices = [load_profile(name) for name in config.device_profiles]
    points = engine.split_points(inputs.steps)
    if config.splits:
        points = [SplitPoint.parse(text) for text in config.splits]
    # Export only what the chosen splits run on the device (`image` runs nothing there).
    parts = sorted({part for p in points if p.kind != "image" for part in parts_for_split(str(p))})
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.model).name or config.model)
    onnx_dir = config.onnx_dir or _default_cache_dir() / f"{safe_model}-{inputs.height}x{inputs.width}"
    records = {}
    if parts:
        with console.status(f"exporting the device partitions ({', '.join(parts)}) to ONNX"):
            records = export_partitions(
                out_dir=onnx_dir, height=inputs.height, width=inputs.width, parts=parts,
                unet=engine.device_unet, vae=engine.device_vae, options=ExportOptions(exporter=config.exporter),  # type: ignore[arg-type]
            )
    threads = config.threads
    runtimes: dict[str, DeviceRuntime] = {"torch": TorchRuntime(engine.device_unet, engine.device_vae)}
    if parts:
        runtimes["onnx"] = OnnxRuntime(onnx_dir, providers=config.providers, intra_op_threads=threads)
    reference = engine.run_full(inputs)
    rows: list[SplitBenchRow] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("split points", total=len(points))
        for split in points:
            crossing = engine.run_edge(inputs, split)
            flops = partition_flops(engine, split, inputs)
            # `image` runs nothing on the device: both columns time the same no-op hand-over.
            contenders = runtimes if "onnx" in runtimes else {**runtimes, "onnx": runtimes["torch"]}
            diffs = {
                name: float((engine.run_device(crossing, inputs, split, runtime=runtime) - reference).abs().max())
                for name, runtime in contenders.items()
            }
            times = interleaved_median_s(
                {name: partial(engine.run_device, crossing, inputs, split, runtime=runtime)
                 for name, runtime in contenders.items()},
                warmup=config.warmup, repeats=config.repeats,
            )
            edge_s = edge.compute_latency_s(flops.edge_flops)
            rows.append(SplitBenchRow(
                split=str(split),
                crossing_bytes_fp16=sum(spec.nbytes_fp16 for spec in engine.crossing(split, inputs)),
                edge_gflops=flops.edge_flops / 1e9,
                device_gflops=flops.device_flops / 1e9,
                torch_s=times["torch"],
                onnx_s=times["onnx"],
                onnx_speedup=times["torch"] / times["onnx"] if times["onnx"] > 0 else float("nan"),
                max_abs_diff=diffs["torch"],
                max_abs_diff_onnx=diffs["onnx"],
                modelled_latency_s={d.name: edge_s + d.compute_latency_s(flops.device_flops) for d in devices},
            ))
            progress.advance(task)
    meta = {
        "model": config.model,
        "inputs": {"steps": inputs.steps, "height": inputs.height, "width": inputs.width,
                   "guidance_scale": inputs.guidance_scale},
        "threads": threads,
        "onnx_providers": list(runtimes["onnx"].providers) if "onnx" in runtimes else [],
        "onnx_export": {p: {"exporter": r.exporter, "export_s": r.export_s, "cached": r.cached} for p, r in records.items()},
        "edge_profile": edge.name,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    return rows, meta


def _render(rows: list[SplitBenchRow], meta: dict[str, Any]) -> tuple[Table, Table]:
    """Two tables that fit a terminal: measurements (max|Δ|: the larger of the torch and
    onnx differences from the unsplit image), then modelled latencies."""
    measured = Table(title=f"split points of {meta['model']} ({meta['inputs']['steps']} steps, "
                           f"{meta['inputs']['height']}x{meta['inputs']['width']}, threads: {meta['threads']})")
    measured.add_column("split", no_wrap=True)
    for column in ("bytes fp16", "edge GFLOP", "dev GFLOP", "torch ms", "onnx ms", "speed-up", "max|Δ|"):
        measured.add_column(column, justify="right")
    for r in rows:
        measured.add_row(
            r.split, f"{r.crossing_bytes_fp16:,}", f"{r.edge_gflops:.3f}", f"{r.device_gflops:.3f}",
            f"{r.torch_s * 1e3:.1f}", f"{r.onnx_s * 1e3:.1f}", f"{r.onnx_speedup:.2f}x",
            f"{max(r.max_abs_diff, r.max_abs_diff_onnx):.0e}",
        )
    devices = list(rows[0].modelled_latency_s) if rows else []
    modelled = Table(title=f"modelled compute latency, ms (edge {meta['edge_profile']} + device; no transmission)")
    modelled.add_column("split", no_wrap=True)
    for name in devices:
        modelled.add_column(name, justify="right")
    for r in rows:
        modelled.add_row(r.split, *(f"{r.modelled_latency_s[d] * 1e3:.1f}" for d in devices))
    return measured, modelled


_DEFAULTS = SplitBenchConfig()


@click.command("split")
@click.option("--model", default=_DEFAULTS.model, show_default=True, help="tiny-random, meg-tiny or a local diffusers folder.")
@click.option("--steps", default=_DEFAULTS.steps, show_default=True, help="Denoising steps.")
@click.option("--repeats", default=_DEFAULTS.repeats, show_default=True, help="Timed runs per runtime (median).")
@click.option("--warmup", default=_DEFAULTS.warmup, show_default=True, help="Untimed runs per runtime.")
@click.option("--threads", type=int, default=_DEFAULTS.threads, show_default=True, help="Threads for torch and onnxruntime alike.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default=_DEFAULTS.exporter, show_default=True)
@click.option("--onnx-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="ONNX export folder (cached).")
@click.option("--splits", default="", help="Comma-separated split points (default: all).")
@click.option("--providers", default=",".join(_DEFAULTS.providers), show_default=True,
              help="Comma-separated onnxruntime execution providers, in priority order.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
def bench_split(model: str, steps: int, repeats: int, warmup: int, threads: int, exporter: str,
                onnx_dir: Path | None, splits: str, providers: str, json_path: Path | None) -> None:
    """Per split point: crossing bytes, FLOPs, modelled latency, torch vs ONNX Runtime time."""
    config = SplitBenchConfig(model=model, steps=steps, repeats=repeats, warmup=warmup, exporter=exporter, onnx_dir=onnx_dir,
                              threads=threads, providers=tuple(p.strip() for p in providers.split(",") if p.strip()),
                              splits=tuple(s.strip() for s in splits.split(",") if s.strip()))
    console = Console()
    try:
        rows, meta = run_split_bench(config, console=console)
    except MegError as exc:
        raise click.ClickException(str(exc)) from exc
    for table in _render(rows, meta):
        console.print(table)
    console.print(f"onnxruntime providers: {', '.join(meta['onnx_providers'])}; export: "
                  + ", ".join(f"{p} {e['exporter']} {e['export_s']:.1f} s{' (cached)' if e['cached'] else ''}"
                              for p, e in meta["onnx_export"].items()))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        console.print(f"wrote {json_path}")
