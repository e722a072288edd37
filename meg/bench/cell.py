"""`meg bench cell`: a discrete-event simulation (SimPy) of cells past one machine.

Devices share one radio and send MEG requests (decoder split) to a pool of edges. The model:

- **Device** (closed loop): uplinks its request, waits for the edge, receives the latent over
  the radio, decodes (`device_s`), plus the client's fixed overhead (`client_s`), thinks
  (`think_s`) and asks again.
- **Radio**: `none` (loopback: no airtime), `tdma` (one transfer at a time at the full link
  rate) or `ofdma` (`resource_blocks` concurrent transfers, each at rate / blocks). The rate
  is MEG's 1 MHz link at a distance (Shannon rate of its link budget) unless given.
- **Edge**: each of `edges` servers does `per_request_s` of work per request outside the UNet
  and `steps` UNet calls per request. Without batching a worker runs one request start to
  end (FIFO). With step-level batching, calls of different requests share forward passes
  (continuous batching, as `meg.split.batching`): a pass of b calls takes `forward_s(b)`,
  interpolated from a measured or modelled curve, and a request's next call joins the next
  pass after its previous one.

Service times come from a calibration (`calibrate`: the UNet forward time per batch size,
the edge's other work per request and the device's decode, all measured on this machine with
the model of `meg bench serve`), or for GPU edges from a device profile: forward(b) =
launch + b × FLOPs per call / (peak × efficiency).

Before the simulation is used at scale it is checked against `meg bench serve` (the same
workload on loopback with 1, 4 and 16 clients): the client's overhead is fitted at one
client without batching, every other row is a prediction.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["CellConfig", "EdgeTimes", "calibrate", "simulate"]


@dataclass(frozen=True)
class EdgeTimes:
    """What one edge spends per request (seconds)."""

    forward_s: dict[int, float]
    """UNet forward time by number of calls batched (each call is a request's step, with CFG rows)."""
    per_request_s: float
    """Edge work per request outside the UNet (text encoding, scheduler, encoding, framing)."""
    steps: int
    device_s: float = 0.0
    """Device work per request (receive, decode); with `client_s` it is fitted as one number."""
    client_s: float = 0.0
    """The client's and transport's fixed overhead per request (fitted on one client)."""
    downlink_bytes: int = 0
    uplink_bytes: int = 0

    def forward(self, calls: int) -> float:
        sizes = sorted(self.forward_s)
        if calls in self.forward_s:
            return self.forward_s[calls]
        if calls > sizes[-1]:  # extrapolate with the last segment's slope
            a, b = sizes[-2], sizes[-1]
            return self.forward_s[b] + (calls - b) * (self.forward_s[b] - self.forward_s[a]) / (b - a)
        return float(np.interp(calls, sizes, [self.forward_s[s] for s in sizes]))


@dataclass(frozen=True)
class CellConfig:
    devices: int
    edges: int = 1
    batch_max: int = 1
    """1: no batching (a worker runs one request start to end)."""
    radio: str = "none"
    """none, tdma or ofdma."""
    rate_bps: float = 0.0
    resource_blocks: int = 8
    think_s: float = 0.0
    duration_s: float = 120.0
    warmup_s: float = 20.0
    seed: int = 0


def simulate(times: EdgeTimes, cfg: CellConfig) -> dict[str, float]:
    """Run one cell; returns throughput (requests/s), latency percentiles (s) and the edges' busy share."""
    import simpy

    if cfg.radio not in ("none", "tdma", "ofdma"):
        raise ValueError(f"radio must be none, tdma or ofdma, got {cfg.radio!r}")
    env = simpy.Environment()
    rng = np.random.default_rng(cfg.seed)
    radio = None
    if cfg.radio != "none":
        if cfg.rate_bps <= 0:
            raise ValueError("a radio needs rate_bps > 0")
        radio = simpy.Resource(env, capacity=1 if cfg.radio == "tdma" else cfg.resource_blocks)
    per_transfer_bps = cfg.rate_bps / (cfg.resource_blocks if cfg.radio == "ofdma" else 1)
    latencies: list[float] = []
    busy = [0.0] * cfg.edges
    queues: list[Any] = [simpy.Store(env) for _ in range(cfg.edges)]

    def airtime(nbytes: int) -> Generator[Any, Any, None]:
        if radio is None or nbytes <= 0:
            return
        with radio.request() as slot:
            yield slot
            yield env.timeout(8 * nbytes / per_transfer_bps)

    def fifo_edge(k: int) -> Generator[Any, Any, None]:
        # one worker runs each request start to end
        while True:
            done = yield queues[k].get()
            work = times.per_request_s + times.steps * times.forward(1)
            yield env.timeout(work)
            if env.now > cfg.warmup_s:
                busy[k] += work
            done.succeed()

    def batching_edge(k: int) -> Generator[Any, Any, None]:
        # worker threads do each request's own work (text encoding, ...) on the host while one
        # batcher runs the forward passes: a pass takes up to batch_max waiting calls
        pending: list[list[Any]] = []
        wake = [env.event()]

        def admit() -> Generator[Any, Any, None]:
            while True:
                done = yield queues[k].get()
                yield env.timeout(times.per_request_s)
                pending.append([times.steps, done])
                if not wake[0].triggered:
                    wake[0].succeed()

        env.process(admit())
        while True:
            if not pending:
                wake[0] = env.event()
                yield wake[0]
            batch = pending[: cfg.batch_max]
            del pending[: len(batch)]
            t = times.forward(len(batch))
            yield env.timeout(t)
            if env.now > cfg.warmup_s:
                busy[k] += t
            for entry in batch:
                entry[0] -= 1
                if entry[0] == 0:
                    entry[1].succeed()
                else:
                    pending.append(entry)  # its next step joins the next pass

    def device(i: int) -> Generator[Any, Any, None]:
        yield env.timeout(float(rng.uniform(0.0, 0.05)))
        n = 0
        while True:
            began = env.now
            yield from airtime(times.uplink_bytes)
            done = env.event()
            yield queues[(i + n) % cfg.edges].put(done)
            yield done
            yield from airtime(times.downlink_bytes)
            yield env.timeout(times.device_s + times.client_s)
            if began >= cfg.warmup_s:
                latencies.append(env.now - began)
            n += 1
            if cfg.think_s > 0:
                yield env.timeout(float(rng.exponential(cfg.think_s)))

    edge_fn: Callable[[int], Generator[Any, Any, None]] = fifo_edge if cfg.batch_max == 1 else batching_edge
    for k in range(cfg.edges):
        env.process(edge_fn(k))
    for i in range(cfg.devices):
        env.process(device(i))
    env.run(until=cfg.warmup_s + cfg.duration_s)
    if not latencies:
        return {"throughput_rps": 0.0, "p50_s": math.nan, "p95_s": math.nan, "p99_s": math.nan, "busy_share": 0.0}
    q = np.quantile(latencies, [0.5, 0.95, 0.99])
    return {"throughput_rps": len(latencies) / cfg.duration_s, "p50_s": float(q[0]), "p95_s": float(q[1]),
            "p99_s": float(q[2]), "busy_share": sum(busy) / (cfg.edges * cfg.duration_s)}  # fmt: skip


# -- calibration ---------------------------------------------------------------------------------


def calibrate(*, model: str = "meg-tiny", size: int = 128, steps: int = 4, tome_ratio: float = 0.5,
              codec_chain: str = "zstd:3", batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 12, 16),
              repeats: int = 5) -> EdgeTimes:  # fmt: skip
    """Measure, on one torch thread, what `meg bench serve`'s requests cost this machine."""
    import torch

    import meg.models  # noqa: F401  (registers meg-tiny)
    from meg.recipes.plan import make_plan
    from meg.split.batching import RowGenerators
    from meg.split.engine import GenerationInputs, SplitEngine
    from meg.split.features import send_feature
    from meg.split.loading import load_pipeline

    torch.set_num_threads(1)
    pipeline = load_pipeline(model)
    engine = SplitEngine(pipeline)
    plan = make_plan("decoder", steps=steps, codec_chain=codec_chain, tome_ratio=tome_ratio)
    inputs = GenerationInputs("a red circle at the top left", seed=1, height=size, width=size, steps=steps, guidance_scale=2.5)
    cond = engine.encode_text(inputs)
    h = size // engine.vae_scale_factor
    forward: dict[int, float] = {}
    with torch.no_grad():
        for b in batch_sizes:
            x = torch.randn(2 * b, 4, h, h)
            emb = cond.prompt_embeds.repeat(b, 1, 1)
            samples = []
            for r in range(repeats + 1):
                gens = RowGenerators([(torch.Generator().manual_seed(r * 100 + i), 2) for i in range(b)],
                                     use_rand=engine.tome.config.use_rand)  # fmt: skip
                t0 = time.perf_counter()
                with engine.tome.applied(tome_ratio, generator=gens, latent_hw=(h, h)):
                    engine.unet(x, torch.full((2 * b,), 500), emb)
                samples.append(time.perf_counter() - t0)
            forward[b] = statistics.median(samples[1:])
    # the edge's whole request without batching, minus its UNet calls
    engine.run_edge(inputs, plan.split, tome_ratio=tome_ratio)
    totals = []
    for r in range(repeats):
        t0 = time.perf_counter()
        crossing = engine.run_edge(inputs, plan.split, tome_ratio=tome_ratio)
        sent = send_feature(crossing["latents"], plan.codec_chain, None, seed=r)
        totals.append(time.perf_counter() - t0)
    per_request = max(0.0, statistics.median(totals) - steps * forward[1])
    return EdgeTimes(forward_s=forward, per_request_s=per_request, steps=steps, device_s=0.0,
                     downlink_bytes=sent.encoded.bits_on_wire // 8, uplink_bytes=200)  # fmt: skip


def fit_client(times: EdgeTimes, serve: dict[str, Any]) -> EdgeTimes:
    """`times` with the device's and client's fixed time per request fitted on `meg bench
    serve`'s one-client row without batching (its p50 minus the edge's calibrated work)."""
    (one,) = [r for r in serve["rows"] if r["mode"] == "off" and r["ues"] == 1]
    edge = times.per_request_s + times.steps * times.forward(1)
    return EdgeTimes(**{**asdict(times), "client_s": max(0.0, one["p50_s"] - edge - times.device_s)})


def validate(times: EdgeTimes, serve: dict[str, Any], *, duration_s: float = 300.0) -> list[dict[str, Any]]:
    """The simulation against `meg bench serve`'s rows (same workload, loopback); the client's
    fixed overhead is fitted on its one-client row without batching."""
    rows = serve["rows"]
    fitted = fit_client(times, serve)
    out = []
    for r in rows:
        if r["ues"] > 16:
            continue
        batch_max = 1 if r["mode"] == "off" else int(serve["settings"]["batch_max"])
        sim = simulate(fitted, CellConfig(devices=r["ues"], batch_max=batch_max, duration_s=duration_s))
        out.append({
            "mode": r["mode"], "ues": r["ues"], "fitted_here": r["mode"] == "off" and r["ues"] == 1,
            "measured_rps": r["throughput_rps"], "simulated_rps": sim["throughput_rps"],
            "measured_p50_s": r["p50_s"], "simulated_p50_s": sim["p50_s"],
            "rps_error": sim["throughput_rps"] / r["throughput_rps"] - 1, "p50_error": sim["p50_s"] / r["p50_s"] - 1,
        })  # fmt: skip
    return out


def capacity(times: EdgeTimes, *, edges: int, batch_max: int, radio: str, rate_bps: float, p95_target_s: float,
             think_s: float, max_devices: int = 1000, duration_s: float = 120.0) -> int:  # fmt: skip
    """Most devices the cell serves with p95 latency ≤ `p95_target_s` (bisection over device counts)."""
    def ok(n: int) -> bool:
        sim = simulate(times, CellConfig(devices=n, edges=edges, batch_max=batch_max, radio=radio, rate_bps=rate_bps,
                                         think_s=think_s, duration_s=duration_s))  # fmt: skip
        return bool(sim["p95_s"] <= p95_target_s)

    if not ok(1):
        return 0
    lo, hi = 1, max_devices
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def run_cell_bench(*, serve_json: Path, calibration: EdgeTimes | None = None, distance_m: float = 200.0,
                   p95_target_s: float = 2.0, think_s: float = 5.0, gpus: tuple[int, ...] = (1, 2, 4, 8),
                   devices: tuple[int, ...] = (10, 30, 100, 300, 1000)) -> dict[str, Any]:  # fmt: skip
    from meg.channel.pathloss import MEG_LINK_BUDGET

    serve = json.loads(Path(serve_json).read_text())
    s = serve["settings"]
    times = calibration or calibrate(size=int(s["size_px"]), tome_ratio=0.5)
    checks = validate(times, serve)
    times = fit_client(times, serve)
    rate = MEG_LINK_BUDGET.rate_bps(distance_m)
    sweep = []
    for radio in ("tdma", "ofdma"):
        for n in devices:
            for batch_max in (1, int(s["batch_max"])):
                sim = simulate(times, CellConfig(devices=n, edges=1, batch_max=batch_max, radio=radio, rate_bps=rate,
                                                 think_s=think_s))  # fmt: skip
                sweep.append({"radio": radio, "devices": n, "edges": 1, "batching": batch_max > 1, **sim})
    cap = []
    for radio in ("tdma", "ofdma"):
        for g in gpus:
            for batch_max in (1, int(s["batch_max"])):
                cap.append({"radio": radio, "edges": g, "batching": batch_max > 1,
                            "devices_at_target": capacity(times, edges=g, batch_max=batch_max, radio=radio, rate_bps=rate,
                                                          p95_target_s=p95_target_s, think_s=think_s)})  # fmt: skip
    return {"times": asdict(times), "validation": checks, "sweep": sweep, "capacity": cap,
            "settings": {"distance_m": distance_m, "rate_bps": rate, "p95_target_s": p95_target_s, "think_s": think_s,
                         "serve_json": str(serve_json), "edge": "this CPU (one torch thread), measured curve"}}  # fmt: skip


@click.command("cell")
@click.option("--serve-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("benchmarks/results/serve.json"), show_default=True,
              help="A `meg bench serve` result: the simulation is checked against it before the sweep.")  # fmt: skip
@click.option("--distance-m", type=float, default=200.0, show_default=True, help="Devices' distance on MEG's 1 MHz link.")
@click.option("--p95-target-s", type=float, default=2.0, show_default=True, help="Latency target of the capacity table.")
@click.option("--think-s", type=float, default=5.0, show_default=True, help="Mean think time between a device's requests.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
def bench_cell(serve_json: Path, distance_m: float, p95_target_s: float, think_s: float, json_path: Path | None) -> None:
    """Cells of 10…1000 devices sharing MEG's radio (TDMA or OFDMA) and 1…8 edges, simulated
    from service times measured here; first checked against `meg bench serve`."""
    result = run_cell_bench(serve_json=serve_json, distance_m=distance_m, p95_target_s=p95_target_s, think_s=think_s)
    console = Console(width=150)
    v = Table(title="Simulation vs meg bench serve (loopback, closed loop)")
    for column in ("batching", "clients", "measured req/s", "simulated", "error", "measured p50 s", "simulated", "error", "note"):
        v.add_column(column, justify="right")
    for r in result["validation"]:
        v.add_row(r["mode"], str(r["ues"]), f"{r['measured_rps']:.2f}", f"{r['simulated_rps']:.2f}", f"{r['rps_error']:+.1%}",
                  f"{r['measured_p50_s']:.3f}", f"{r['simulated_p50_s']:.3f}", f"{r['p50_error']:+.1%}",
                  "fitted" if r["fitted_here"] else "")  # fmt: skip
    console.print(v)
    c = Table(title=f"Capacity: devices per cell at p95 ≤ {p95_target_s} s (think {think_s} s, {distance_m:.0f} m, "
                    f"{result['settings']['rate_bps'] / 1e6:.2f} Mbit/s)")  # fmt: skip
    for column in ("radio", "edges", "batching", "devices"):
        c.add_column(column, justify="right")
    for r in result["capacity"]:
        c.add_row(r["radio"], str(r["edges"]), "on" if r["batching"] else "off", str(r["devices_at_target"]))
    console.print(c)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")

