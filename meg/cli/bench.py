"""`meg bench ...`: benchmark scripts that print a table and write JSON."""

from __future__ import annotations

import click

from meg.cli import LazyGroup

# name -> ("module:attribute", one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "e2e": ("meg.bench.e2e:bench_e2e", "Every split point over MEG's channels: bytes, latency, energy, quality."),
    "grpc": ("meg.bench.grpc:bench_grpc", "Framed-tensor gRPC streaming vs raw loopback TCP."),
    "channel": ("meg.channel.bench:bench_channel", "Symbols per second through each channel model."),
    "codecs": ("meg.codecs.bench:bench_codecs", "Codec chains: bits/element, ratio vs fp16, PSNR, one-core MB/s."),
    "split": ("meg.split.bench:bench_split", "Per split point: bytes, FLOPs, modelled latency, torch vs ONNX."),
    "engine": ("meg.split.bench_engine:bench_engine", "Split engine: run_full and per-split edge/device wall time."),
    "policy": ("meg.policy.bench:bench_policy", "Policy decide() latency: rule-based and learned planners."),
    "paper-meg": ("meg.bench.paper_meg:bench_paper_meg",
                  "MEG's paper figures: SDXL-1024 costs, meg-tiny distortion, planners, decoders, ToMe."),
    "preview-refine": ("meg.bench.preview_refine:bench_preview_refine",
                       "Preview-refine sessions: edge every round, preview only, refine at fixed/predicted/oracle s."),
    "sr": ("meg.bench.sr:bench_sr", "Hybrid SR: light vs bicubic vs diffusion SR, partition IoU, seams, FLOPs."),
    "hybrid": ("meg.bench.hybrid:bench_hybrid", "Hybrid SR controller: SA vs exact vs the paper's baselines, K users."),
    "hybrid-served": ("meg.bench.hybrid_served:bench_hybrid_served",
                      "Hybrid SR: K users planned by DecideBatch and served concurrently over gRPC."),
    "cell": ("meg.bench.cell:bench_cell", "Cells of 10…1000 devices and 1…8 edges, simulated (SimPy) from measured service times."),
    "reliability": ("meg.bench.reliability:bench_reliability",
                    "Hostile streams, edge replicas killed mid-request and every fuzz target: one table."),
    "serve": ("meg.bench.serve:bench_serve", "One edge under closed-loop device clients, step-level batching off and on."),
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks. Each prints a table on stdout and writes rows to --json PATH.

    Numbers are measured on this machine in one run, so ratios compare like with like.
    """
