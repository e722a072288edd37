"""`meg bench hybrid-served`: the Hybrid SR controller and recipe through the real services, K users at once.

A policy service (`PolicyService.DecideBatch`, the Hybrid SR controller) and an edge
(`meg serve edge`, its own process, meg-tiny with its SR models) run on loopback. K users are
drawn as in `meg bench hybrid` (seeded: target R̃ from the table's targets, λ_k ~ U[0, 1],
prompts from the held-out independent set). One `DecideBatch` call plans all K together; then
K device clients, each with its own gRPC channel and ONNX Runtime light SR, send their Hybrid
SR requests at the same moment over a 10 Mbit/s emulated link. Per user the table shows the
plan (S, D), the controller's predicted latency and quality (its measured table), the report's
modelled latency (`rtx-3080-ti` edge, `jetson-agx-orin` device, the link's airtime, from the
parts this run measured) and the wall time measured on this machine, where one CPU edge serves
the K requests (queueing included).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["run_hybrid_served"]


def run_hybrid_served(*, k: int = 10, seed: int = 0, edge_args: tuple[str, ...] = ()) -> dict[str, Any]:
    import grpc

    import meg.models  # noqa: F401  (registers meg-tiny)
    from meg.channel.link import LinkConfig
    from meg.models.evaluate import read_prompt_set
    from meg.models.registry import model_dir
    from meg.policy.hybrid_sr import (
        HybridSrPolicy,
        HybridTable,
        Problem,
        UserRequest,
    )
    from meg.recipes.plan import plan_from_proto
    from meg.services.background import EdgeProcess, start_policy
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.policy_server import PolicyServerConfig
    from meg.split.loading import load_pipeline
    from meg.v1 import generation_pb2 as gen_pb
    from meg.v1 import policy_service_pb2 as policy_pb
    from meg.v1 import policy_service_pb2_grpc as policy_grpc

    table = HybridTable.load()
    rng = np.random.default_rng(seed)
    targets = [int(rng.choice(table.targets)) for _ in range(k)]
    weights = [float(rng.uniform(0.0, 1.0)) for _ in range(k)]
    prompts, _ = read_prompt_set(model_dir("meg-tiny") / "prompts" / "independent.jsonl")
    chosen = [prompts[int(i)] for i in rng.choice(len(prompts), size=k, replace=False)]
    link = LinkConfig(mode="digital", snr_db=20.0, bandwidth_hz=2e6, rate_bps=10e6)

    policy = HybridSrPolicy()
    policy_server = start_policy(PolicyServerConfig(port=0), policy=policy)
    edge = EdgeProcess(["--model", "meg-tiny", "--queue-size", str(2 * k), *edge_args])
    try:
        edge.wait_ready(timeout_s=300)
        observations = [policy_pb.Observation(width=t, height=t, recipe=gen_pb.RECIPE_HYBRID_SR,
                                              limits=gen_pb.Limits(latency_weight=w)) for t, w in zip(targets, weights, strict=True)]  # fmt: skip
        with grpc.insecure_channel(policy_server.address) as channel:
            stub = policy_grpc.PolicyServiceStub(channel)
            began = time.perf_counter()
            answer = stub.DecideBatch(policy_pb.DecideBatchRequest(observations=observations), timeout=30)
            decide_s = time.perf_counter() - began
        plans = [plan_from_proto(p) for p in answer.plans]

        # what the controller predicted for those plans, from its table
        config = policy.config
        problem = Problem.build(table, [UserRequest(t, w) for t, w in zip(targets, weights, strict=True)], config)
        predicted = []
        for options, plan in zip(problem.options, plans, strict=True):
            (option,) = [o for o in options if o.sr_scale == int(plan.params["sr_scale"]) and o.steps == plan.steps]
            predicted.append(option)

        pipeline = load_pipeline("meg-tiny")
        clients = [DeviceClient(edge.address, ClientConfig(fallback=False, deadline_s=600.0), pipeline=pipeline) for _ in range(k)]
        for i, client in enumerate(clients):  # build each device's runtime and light SR session before the clock starts
            client.generate(DeviceRequest(prompt="a red circle", width=targets[i], height=targets[i], recipe="hybrid-sr",
                                          plan=plans[i], link=link))  # fmt: skip
        results: list[Any] = [None] * k
        walls = [0.0] * k
        barrier = threading.Barrier(k)

        def run(i: int) -> None:
            request = DeviceRequest(prompt=chosen[i], seed=seed * 1000 + i, width=targets[i], height=targets[i],
                                    recipe="hybrid-sr", plan=plans[i], link=link, request_id=f"user-{i}")  # fmt: skip
            barrier.wait()
            t0 = time.perf_counter()
            results[i] = clients[i].generate(request)
            walls[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        makespan = time.perf_counter() - started
        for client in clients:
            client.close()
    finally:
        edge.stop()
        policy_server.stop(0)

    rows = []
    for i in range(k):
        report = results[i].report
        rows.append({
            "user": i, "target_px": targets[i], "latency_weight": round(weights[i], 3), "prompt": chosen[i],
            "sr_scale": int(plans[i].params["sr_scale"]), "steps": plans[i].steps,
            "predicted_latency_s": predicted[i].latency_s, "predicted_quality": predicted[i].quality,
            "predicted_utility": predicted[i].quality - weights[i] * predicted[i].latency_s,
            "report_modelled_latency_s": report.latency_s.modelled_total, "measured_wall_s": walls[i],
            "measured_edge_queue_s": next((p.latency_s for p in report.parts if p.part == "edge.queue"), 0.0),
            "fallback": report.fallback.used, "served_by": report.served_by,
        })  # fmt: skip
    return {
        "k": k, "seed": seed, "decide_batch_s": decide_s, "makespan_s": makespan, "rows": rows,
        "mean": {key: float(np.mean([r[key] for r in rows])) for key in
                 ("predicted_latency_s", "report_modelled_latency_s", "measured_wall_s", "predicted_utility")},
        "settings": {"link": "10 Mbit/s digital", "edge": "meg serve edge, meg-tiny, one worker", "policy": policy.name,
                     "controller": {"latency_limit_s": config.latency_limit_s, "foreground_fraction": config.foreground_fraction}},
    }  # fmt: skip


@click.command("hybrid-served")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Concurrent users.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
def bench_hybrid_served(k: int, seed: int, json_path: Path | None) -> None:
    """K Hybrid SR users planned together by PolicyService.DecideBatch and served concurrently
    by one edge over gRPC: plan, predicted vs modelled latency, measured wall time."""
    result = run_hybrid_served(k=k, seed=seed)
    table = Table(title=f"Hybrid SR through the services: K = {k}, DecideBatch {result['decide_batch_s'] * 1e3:.0f} ms, "
                        f"all done in {result['makespan_s']:.1f} s")  # fmt: skip
    for column in ("user", "R̃ px", "λ", "S", "D", "pred. T s", "pred. Q", "report T s", "wall s", "queue s", "fallback"):
        table.add_column(column, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["user"]), str(r["target_px"]), f"{r['latency_weight']:.2f}", str(r["sr_scale"]), str(r["steps"]),
                      f"{r['predicted_latency_s']:.3f}", f"{r['predicted_quality']:.3f}", f"{r['report_modelled_latency_s']:.3f}",
                      f"{r['measured_wall_s']:.2f}", f"{r['measured_edge_queue_s']:.2f}", "yes" if r["fallback"] else "no")  # fmt: skip
    Console(width=160).print(table)
    m = result["mean"]
    click.echo(f"mean: predicted {m['predicted_latency_s']:.3f} s, report-modelled {m['report_modelled_latency_s']:.3f} s, "
               f"measured wall {m['measured_wall_s']:.2f} s")  # fmt: skip
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
