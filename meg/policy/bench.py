"""`meg bench policy`: latency of `Policy.decide` (Observation proto → Plan proto), in process."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click


@click.command("policy")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Learned planner checkpoint(s) to time besides the rule-based one.")
@click.option("--calls", default=2000, show_default=True, type=click.IntRange(min=10), help="Timed decide() calls.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the rows here.")
def bench_policy(checkpoints: tuple[Path, ...], calls: int, threads: int, json_path: Path | None) -> None:
    """Time decide() on a sweep of observations (SNR −20…+10 dB, 512/768 px)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from meg.policy.serving import load_policy, rule_policy
    from meg.v1 import generation_pb2, policy_service_pb2

    torch.set_num_threads(threads)
    policies = [rule_policy(), *(load_policy(c) for c in checkpoints)]
    observations = [
        policy_service_pb2.Observation(
            channel=generation_pb2.ChannelState(snr_db=-20.0 + 30.0 * (i % 31) / 30.0, bandwidth_hz=1e6),
            previous_latency_s=2.0, previous_energy_j=500.0, width=512 + 256 * (i % 2), height=512 + 256 * (i % 2))
        for i in range(64)]
    rows: list[dict[str, Any]] = []
    for policy in policies:
        for o in observations[:10]:  # warm-up
            policy.decide(o)
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            policy.decide(observations[i % len(observations)])
            times.append(time.perf_counter() - t0)
        times.sort()
        rows.append({"policy": policy.name, "calls": calls, "threads": threads,
                     "median_us": 1e6 * statistics.median(times), "p99_us": 1e6 * times[int(0.99 * (len(times) - 1))],
                     "mean_us": 1e6 * statistics.fmean(times)})
    table = Table(title="Policy.decide latency (in process, this machine)")
    for col in ("policy", "calls", "median µs", "p99 µs", "mean µs"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        table.add_row(r["policy"], str(r["calls"]), f"{r['median_us']:.0f}", f"{r['p99_us']:.0f}", f"{r['mean_us']:.0f}")
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
