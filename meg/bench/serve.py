"""`meg bench serve`: one edge under closed-loop load, step-level batching off and on.

For each mode an edge server runs as its own process (`meg serve edge`, with
`--batch-max 1` or `--batch-max N`) on loopback with Prometheus metrics; this process plays
the devices: `--ues` closed-loop device clients, each a `DeviceClient` with its own gRPC
channel and ONNX Runtime decoder, sending MEG requests back to back (a fixed plan, so both
modes run the same work). Each load level runs a warm-up, then a measured window: requests
finished inside the window count for throughput; their client-side wall time gives p50 /
p95 / p99 (each client's first request, the start-up burst, is left out); their reports
give the edge's queue wait and compute; the edge's `/metrics` give the batch-size histogram
and the time spent in UNet forward passes (without batching: the requests' edge compute). Both modes run
in one invocation, so their ratio compares like with like.

The emulated devices share this machine's CPU with the edge (on a real deployment each
decodes on its own hardware): their threads run at `--device-nice` (10) so that the edge gets
the CPU it would have on a machine of its own, and the edge runs `--torch-threads` (1) so
that its intra-op threads do not spin against the devices'.

The images of the first requests of every client at one load level are kept in both modes
and compared (same seeds): batching must not change them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

if TYPE_CHECKING:
    from meg.services.background import EdgeProcess

__all__ = ["ServeRow", "run_serve_bench"]

_PROMPTS = ("a red circle at the top left", "a large blue square", "a small green star on a white background",
            "two yellow crosses", "a purple ring at the bottom right", "an orange triangle and a red circle")  # fmt: skip


@dataclass
class ServeRow:
    mode: str
    """"off" (one request at a time per worker) or "on" (step-level batching)."""
    ues: int
    completed: int
    window_s: float
    throughput_rps: float
    p50_s: float
    p95_s: float
    p99_s: float
    queue_wait_p50_s: float
    edge_compute_p50_s: float
    """The request's edge model work as its report measures it (with batching: its share of batched passes, waits included)."""
    unet_busy_share: float
    """Fraction of the window the edge spent inside UNet forward passes."""
    edge_overhead: float
    """(window − the edge's model compute in it) / that compute: the edge's time spent on
    anything but model work (serving, framing, idling), per second of model work; meaningful
    when the edge is saturated."""
    batch_sizes: dict[str, int] = field(default_factory=dict)
    errors: int = 0


def _batch_hist(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in after.items():
        if key.startswith("meg_unet_batch_forwards_total{"):
            size = key.split('batch_size="')[1].split('"')[0]
            delta = int(round(value - before.get(key, 0.0)))
            if delta:
                out[size] = delta
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _load_level(edge: EdgeProcess, ues: int, *, pipeline: Any, warmup_s: float, window_s: float, size: int, plan: Any,
                keep_images: int, images: dict[tuple[int, int], Any],
                scrapes: list[dict[str, float]], device_nice: int) -> tuple[list[dict[str, float]], int, float]:  # fmt: skip
    """Run `ues` closed-loop clients; return the per-request records finished inside the window
    (and append the edge's metrics at the window's start and end to `scrapes`)."""
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest

    clients = [DeviceClient(edge.address, ClientConfig(fallback=False, deadline_s=600.0), pipeline=pipeline) for _ in range(ues)]
    records: list[dict[str, float]] = []
    errors = [0]
    lock = threading.Lock()
    window = (0.0, 0.0)

    def run(i: int) -> None:
        if device_nice:  # Linux: the calling thread only
            os.setpriority(os.PRIO_PROCESS, 0, device_nice)
        client = clients[i]
        j = 0
        while time.monotonic() < window[1]:
            request = DeviceRequest(prompt=_PROMPTS[(i + j) % len(_PROMPTS)], seed=1000 * i + j, width=size, height=size,
                                    plan=plan, request_id=f"ue{i}-{j}")  # fmt: skip
            began = time.monotonic()
            try:
                result = client.generate(request)
            except Exception:  # noqa: BLE001 - counted; the bench goes on
                with lock:
                    errors[0] += 1
                j += 1
                continue
            ended = time.monotonic()
            if j < keep_images:
                images[(i, j)] = result.image
            if j >= 1 and window[0] <= ended <= window[1]:  # each client's first request is the start-up burst
                parts = {p.part: p for p in result.report.parts if p.measured}
                device_s = sum(p.latency_s for name, p in parts.items() if name.startswith("device."))
                with lock:
                    records.append({"wall_s": ended - began, "queue_s": parts["edge.queue"].latency_s,
                                    "edge_s": parts["edge.compute"].latency_s, "device_s": device_s})  # fmt: skip
            j += 1

    for client in clients:  # connect and build each device runtime before the clock starts
        client.generate(DeviceRequest(prompt=_PROMPTS[0], seed=0, width=size, height=size, plan=plan))
    start = time.monotonic()
    window = (start + warmup_s, start + warmup_s + window_s)
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(ues)]
    for th in threads:
        th.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    scrapes.append(edge.scrape())
    time.sleep(max(0.0, window[1] - time.monotonic()))
    scrapes.append(edge.scrape())
    for th in threads:
        th.join()
    for client in clients:
        client.close()
    return records, errors[0], window_s


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def run_serve_bench(*, ues: tuple[int, ...] = (1, 4, 16, 64), window_s: float = 20.0, warmup_s: float = 4.0,
                    batch_max: int = 16, batch_wait_ms: float = 5.0, model: str = "meg-tiny", size: int = 128,
                    steps: int = 4, tome_ratio: float = 0.5, codec_chain: str = "zstd:3", torch_threads: int = 1,
                    device_nice: int = 10, keep_images: int = 2) -> dict[str, Any]:  # fmt: skip
    """Both modes at every load level; returns {"rows": [...], "images": {...}, "settings": {...}}."""
    import torch

    import meg.models  # noqa: F401  (registers meg-tiny)
    from meg.recipes.plan import make_plan
    from meg.services.background import EdgeProcess, metric_sum
    from meg.split.loading import load_pipeline

    plan = make_plan("decoder", steps=steps, codec_chain=codec_chain, tome_ratio=tome_ratio)
    # each emulated device decodes with one thread (its ONNX Runtime session takes torch's count)
    torch.set_num_threads(1)
    pipeline = load_pipeline(model)
    rows: list[ServeRow] = []
    kept: dict[str, dict[tuple[int, int], Any]] = {}
    image_level = 16 if 16 in ues else max(ues)
    with Progress() as progress:
        task = progress.add_task("serve bench", total=2 * len(ues))
        for mode, n in (("off", 1), ("on", batch_max)):
            edge = EdgeProcess(["--model", model, "--queue-size", str(4 * max(ues)), "--batch-max", str(n),
                                "--batch-wait-ms", str(batch_wait_ms), "--torch-threads", str(torch_threads)])
            try:
                edge.wait_ready()
                for level in ues:
                    progress.update(task, description=f"batching {mode}, {level} clients")
                    images: dict[tuple[int, int], Any] = {}
                    scrapes: list[dict[str, float]] = []
                    records, errors, window = _load_level(edge, level, pipeline=pipeline, warmup_s=warmup_s, window_s=window_s,
                                                          size=size, plan=plan, keep_images=keep_images if level == image_level else 0,
                                                          images=images, scrapes=scrapes, device_nice=device_nice)  # fmt: skip
                    before, after = scrapes
                    if level == image_level:
                        kept[mode] = images
                    busy = metric_sum(after, "meg_unet_busy_seconds_total") - metric_sum(before, "meg_unet_busy_seconds_total")
                    edge_s = [r["edge_s"] for r in records]
                    if n == 1:  # without the batcher the request's edge compute is all its own
                        busy = sum(edge_s)
                    wall = [r["wall_s"] for r in records]
                    p50 = _quantile(wall, 0.5)
                    rows.append(ServeRow(
                        mode=mode, ues=level, completed=len(records), window_s=window, throughput_rps=len(records) / window,
                        p50_s=p50, p95_s=_quantile(wall, 0.95), p99_s=_quantile(wall, 0.99),
                        queue_wait_p50_s=_quantile([r["queue_s"] for r in records], 0.5),
                        edge_compute_p50_s=_quantile(edge_s, 0.5), unet_busy_share=busy / window,
                        edge_overhead=(window - busy) / busy if busy > 0 else float("nan"),
                        batch_sizes=_batch_hist(before, after), errors=errors,
                    ))  # fmt: skip
                    progress.advance(task)
            finally:
                edge.stop()
    same = sorted(set(kept.get("off", {})) & set(kept.get("on", {})))
    diffs = [float((kept["off"][k] - kept["on"][k]).abs().max()) for k in same]
    return {
        "rows": [asdict(r) for r in rows],
        "images": {"compared": len(same), "ues": image_level, "max_abs_diff": max(diffs) if diffs else None},
        "settings": {"model": model, "size_px": size, "plan": f"decoder, {steps} steps, ToMe {tome_ratio}, {codec_chain}",
                     "batch_max": batch_max, "batch_wait_ms": batch_wait_ms, "window_s": window_s, "warmup_s": warmup_s,
                     "torch_threads": torch_threads, "device_nice": device_nice, "cpu_count": os.cpu_count(),
                     "torch": torch.__version__},
    }  # fmt: skip


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, style in (("off", "o--"), ("on", "s-")):
        rs = [r for r in rows if r["mode"] == mode]
        x = [r["ues"] for r in rs]
        axes[0].plot(x, [r["throughput_rps"] for r in rs], style, label=f"batching {mode}")
        axes[1].plot(x, [r["p50_s"] for r in rs], style, label=f"p50, batching {mode}")
        axes[1].plot(x, [r["p99_s"] for r in rs], style, alpha=0.5, label=f"p99, batching {mode}")
    for ax, title in zip(axes[:2], ("throughput (requests/s)", "latency (s)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("closed-loop device clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    hist: Counter[int] = Counter()
    for r in rows:
        if r["mode"] == "on":
            hist.update({int(k): v for k, v in r["batch_sizes"].items()})
    axes[2].bar(list(hist), list(hist.values()))
    axes[2].set_title("UNet calls per forward pass (batching on, all levels)")
    axes[2].set_xlabel("calls batched")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command("serve")
@click.option("--ues", default="1,4,16,64", show_default=True, help="Comma-separated numbers of closed-loop device clients.")
@click.option("--window-s", type=float, default=20.0, show_default=True, help="Measured seconds per load level.")
@click.option("--warmup-s", type=float, default=4.0, show_default=True, help="Unmeasured seconds before each window.")
@click.option("--batch-max", type=click.IntRange(min=2), default=16, show_default=True, help="Batching on: most calls per forward pass.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels.")
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--tome-ratio", type=float, default=0.5, show_default=True, help="ToMe ratio in the edge UNet (MEG's 0.5).")
@click.option("--codec", "codec_chain", default="zstd:3", show_default=True,
              help="Codec chain of the latent (lossless by default, so images compare exactly).")
@click.option("--torch-threads", type=int, default=1, show_default=True, help="The edge's torch threads (0: torch's default).")
@click.option("--device-nice", type=click.IntRange(0, 19), default=10, show_default=True,
              help="Niceness of the emulated devices' threads, so the edge gets the CPU it would have on its own machine (0: equal).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG here.")
def bench_serve(ues: str, window_s: float, warmup_s: float, batch_max: int, batch_wait_ms: float, model: str, size: int,
                steps: int, tome_ratio: float, codec_chain: str, torch_threads: int, device_nice: int, json_path: Path | None,
                plot_path: Path | None) -> None:  # fmt: skip
    """Closed-loop device clients against one edge over gRPC, step-level batching off and on:
    throughput, p50/p95/p99, queue wait, batch sizes, the edge's UNet share, and whether
    batching changed any image."""
    try:
        levels = tuple(int(u) for u in ues.split(",") if u.strip())
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {ues!r}", param_hint="--ues") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter(f"need at least one level ≥ 1, got {ues!r}", param_hint="--ues")
    result = run_serve_bench(ues=levels, window_s=window_s, warmup_s=warmup_s, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                             model=model, size=size, steps=steps, tome_ratio=tome_ratio, codec_chain=codec_chain,
                             torch_threads=torch_threads, device_nice=device_nice)  # fmt: skip
    table = Table(title=f"meg bench serve: {result['settings']['plan']}, {size} px, one edge")
    for column in ("batching", "clients", "done", "req/s", "×off", "p50 s", "p95 s", "p99 s", "queue p50 s", "UNet share",
                   "edge overhead", "batch sizes", "errors"):  # fmt: skip
        table.add_column(column, justify="right")
    off = {r["ues"]: r["throughput_rps"] for r in result["rows"] if r["mode"] == "off"}
    for r in result["rows"]:
        ratio = r["throughput_rps"] / off[r["ues"]] if off.get(r["ues"]) else float("nan")
        table.add_row(r["mode"], str(r["ues"]), str(r["completed"]), f"{r['throughput_rps']:.2f}", f"{ratio:.2f}",
                      f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}", f"{r['p99_s']:.3f}", f"{r['queue_wait_p50_s']:.3f}",
                      f"{r['unet_busy_share']:.2f}", f"{r['edge_overhead']:.2f}",
                      " ".join(f"{k}:{v}" for k, v in r["batch_sizes"].items()), str(r["errors"]))  # fmt: skip
    Console(width=180).print(table)
    images = result["images"]
    click.echo(f"images: {images['compared']} requests compared at {images['ues']} clients, "
               f"max |off − on| = {images['max_abs_diff']}")  # fmt: skip
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if plot_path is not None:
        _plot(result, plot_path)
