"""`meg bench codecs`: size, distortion and single-core speed of codec chains.

Tensors: the latent of a tiny seeded diffusers ``AutoencoderKL`` (built from a config, no
weights downloaded) of a smooth synthetic image — at 1024² (a 4×128×128 latent, the size
MEG sends for SDXL) and at 256² (4×32×32) — plus a smooth and a Gaussian-random tensor of
the large latent's shape. Speeds are MB (10⁶ bytes) of the float32 input per second,
median of repeated calls on one thread (``torch.set_num_threads(1)``): ``*_mb_s`` from the
calling thread's CPU time (what one core achieves, even on a shared machine),
``*_wall_mb_s`` from wall-clock time (equal to it on an idle machine).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from meg.codecs.chain import decode, encode
from meg.codecs.metrics import bits_per_element, mse, psnr_db, ratio_vs

__all__ = ["CodecBenchConfig", "bench_codecs", "benchmark_tensors", "run_codec_bench"]


@dataclass(frozen=True)
class CodecBenchConfig:
    """What `meg bench codecs` measures."""

    chains: tuple[str, ...] = (
        "none",
        "zstd:3",
        "fp16",
        "fp16,zstd:3",
        "fp16,zstd:3:shuffle",
        "bf16,zstd:3:shuffle",
        "int8",
        "int8,zstd:3",
        "int4,zstd:3",
        "int2,zstd:3",
        "merge:0.5,fp16,zstd:3:shuffle",
        "merge:0.5,int8",
        "merge:0.5,int8,zstd:3",
        "merge:0.75,int8,zstd:3",
        "merge:0.5,int4,zstd:3",
    )
    """Codec chains, each run on every tensor."""
    image_px: int = 1024
    """Side of the synthetic image of the large VAE latent (latent side = image_px / 8)."""
    small_image_px: int = 256
    """Side of the synthetic image of the small VAE latent."""
    min_time_s: float = 0.25
    """Time each of encode and decode at least this long per row."""
    min_repeats: int = 5
    """…and at least this many calls."""
    seed: int = 0
    """Seed of the VAE weights, the random tensor and the merge destinations."""


def _smooth_image(px: int) -> Tensor:
    """``[1, 3, px, px]`` in [−1, 1]: low-frequency gradients and waves."""
    y, x = torch.meshgrid(torch.linspace(0, 1, px), torch.linspace(0, 1, px), indexing="ij")
    return torch.stack([torch.sin(6 * x + 2 * y), torch.cos(5 * y - 3 * x * y), 2 * x - 1])[None]


def _tiny_vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    # diffusers initialises weights from the global generator: seed a forked copy of it
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae: Any = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        )
    return vae.eval()


def benchmark_tensors(config: CodecBenchConfig) -> dict[str, Tensor]:
    """The named float32 tensors the benchmark encodes."""
    vae = _tiny_vae(config.seed)
    tensors: dict[str, Tensor] = {}
    with torch.no_grad():
        for px in (config.image_px, config.small_image_px):
            latent = vae.encode(_smooth_image(px)).latent_dist.mode() * vae.config.scaling_factor
            tensors[f"vae-latent-{px // 8}"] = latent.contiguous()
    shape = tensors[f"vae-latent-{config.image_px // 8}"].shape
    side = torch.linspace(0, 4 * math.pi, shape[-1])
    waves = torch.stack([torch.sin(side * (c + 1))[:, None] * torch.cos(side * (c + 2))[None, :] for c in range(shape[1])])
    tensors[f"smooth-{shape[-1]}"] = waves[None].contiguous()
    generator = torch.Generator().manual_seed(config.seed)
    tensors[f"random-{shape[-1]}"] = torch.randn(tuple(shape), generator=generator)
    return tensors


def _median_call_s(fn: Callable[[], object], config: CodecBenchConfig) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) per call, medians over repeated calls."""
    fn()  # warm-up
    cpu: list[float] = []
    wall: list[float] = []
    start = time.perf_counter()
    while len(wall) < config.min_repeats or time.perf_counter() - start < config.min_time_s:
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def run_codec_bench(config: CodecBenchConfig, tensors: dict[str, Tensor], *, progress: bool = True) -> list[dict]:
    """One row per (tensor, chain): size, distortion and speed."""
    from tqdm import tqdm

    rows = []
    jobs = [(name, chain) for name in tensors for chain in config.chains]
    for name, chain in tqdm(jobs, desc="codecs", disable=not progress, leave=False):
        tensor = tensors[name]
        generator = torch.Generator().manual_seed(config.seed)
        encoded = encode(tensor, chain, generator=generator)
        decoded = decode(encoded)
        assert isinstance(decoded, Tensor)
        encode_s, encode_wall_s = _median_call_s(
            lambda t=tensor, c=chain, g=generator: encode(t, c, generator=g), config  # type: ignore[misc]
        )
        decode_s, decode_wall_s = _median_call_s(lambda e=encoded: decode(e), config)  # type: ignore[misc]
        megabytes = tensor.numel() * tensor.element_size() / 1e6
        psnr = psnr_db(tensor, decoded)
        rows.append(
            {
                "tensor": name,
                "shape": list(tensor.shape),
                "chain": encoded.chain,
                "payload_bytes": len(encoded.payload),
                "params_bytes": len(encoded.params),
                "bits_per_element": bits_per_element(encoded),
                "ratio_vs_fp32": ratio_vs(encoded, 32),
                "ratio_vs_fp16": ratio_vs(encoded, 16),
                "mse": mse(tensor, decoded),
                "psnr_db": psnr if math.isfinite(psnr) else None,  # JSON has no inf: None = exact
                "encode_ms": 1e3 * encode_s,
                "decode_ms": 1e3 * decode_s,
                "encode_mb_s": megabytes / max(encode_s, 1e-9),
                "decode_mb_s": megabytes / max(decode_s, 1e-9),
                "encode_wall_mb_s": megabytes / encode_wall_s,
                "decode_wall_mb_s": megabytes / decode_wall_s,
            }
        )
    return rows


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Codec chains: one thread, MB/s of float32 input (CPU time; wall in brackets)")
    for column in ("tensor", "chain", "bits/elem", "× vs fp16", "PSNR dB", "enc MB/s", "dec MB/s"):
        table.add_column(column, justify="left" if column in ("tensor", "chain") else "right", no_wrap=True)
    for row in rows:
        psnr = "exact" if row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        table.add_row(
            row["tensor"], row["chain"], f"{row['bits_per_element']:.3f}", f"{row['ratio_vs_fp16']:.2f}",
            psnr, f"{row['encode_mb_s']:.0f} ({row['encode_wall_mb_s']:.0f})",
            f"{row['decode_mb_s']:.0f} ({row['decode_wall_mb_s']:.0f})",
        )
    Console(width=max(120, Console().width)).print(table)


@click.command("codecs")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the rows (and the configuration) to this JSON file.")
@click.option("--chain", "chains", multiple=True, help="Chain to measure (repeatable); default: a standard set.")
@click.option("--min-time", "min_time_s", type=float, default=CodecBenchConfig.min_time_s, show_default=True,
              help="Seconds to time each of encode and decode per row.")
@click.option("--image-px", type=int, default=CodecBenchConfig.image_px, show_default=True,
              help="Side of the synthetic image of the large VAE latent (multiple of 32).")
def bench_codecs(json_path: Path | None, chains: tuple[str, ...], min_time_s: float, image_px: int) -> None:
    """Bits per element, ratio vs fp16, PSNR and one-core encode/decode MB/s per codec chain.

    Runs every chain on VAE latents of a tiny seeded AutoencoderKL (from a config, offline)
    and on smooth and random tensors. Example: meg bench codecs --json codecs.json
    """
    defaults = CodecBenchConfig()
    config = CodecBenchConfig(
        chains=tuple(chains) or defaults.chains, min_time_s=min_time_s, image_px=image_px
    )
    torch.set_num_threads(1)
    tensors = benchmark_tensors(config)
    rows = run_codec_bench(config, tensors)
    _print_table(rows)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "benchmark": "codecs",
            "config": asdict(config),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "rows": rows,
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        click.echo(f"wrote {len(rows)} rows to {json_path}")
