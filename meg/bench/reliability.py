"""`meg bench reliability`: hostile clients, fuzzing and edge kills, in bounded time, one table.

- **Hostile streams**: an edge and a policy service, each its own process (tiny-random by
  default), get `--streams` mutated request streams built from recorded good ones (the
  exact messages a `DeviceClient` sent for a MEG request, an analog-link request and a
  preview–refine request that uplinks its preview): bit flips, truncated messages and
  streams, reordered, duplicated and missing messages, a wrong CRC, huge declared sizes,
  NaN/Inf floats, unknown enum values, oversized and invalid-UTF-8 prompts, random bytes, and
  streams that open and never send. Every answer's status is counted; INTERNAL or UNKNOWN
  is a failure. A good client generates in parallel all along and must succeed every time;
  the edge's resident memory before and after, and its health at the end, are recorded.
- **Kills**: `--kills` requests against three edge replicas, each request's replica
  SIGKILLed at a random point of its stream (then restarted); every request must complete
  (by retry on another replica, else by the device's fallback) and its report must say which.
- **Fuzz**: `meg fuzz` on every parser target for `--fuzz-runs` inputs each.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

__all__ = ["run_reliability_bench"]

GENERATE = "/meg.v1.EdgeService/Generate"
DECIDE = "/meg.v1.PolicyService/Decide"
DECIDE_BATCH = "/meg.v1.PolicyService/DecideBatch"


def _rss_mb(pid: int) -> float:
    from meg.services.background import proc_status_kb

    return proc_status_kb(pid, "VmRSS") / 1024


def _record_streams(address: str, pipeline: Any) -> list[list[bytes]]:
    """The messages a real device client sends for three requests, serialized."""
    from meg.channel.link import LinkConfig
    from meg.recipes.plan import make_plan
    from meg.recipes.preview_refine import preview_refine_plan
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest

    recorded: list[list[bytes]] = []
    with DeviceClient(address, ClientConfig(runtime="eager", fallback=False, model="tiny-random"), pipeline=pipeline) as client:
        original = client._request_stream

        def recording(request: Any, half: Any) -> Any:
            messages = list(original(request, half))
            recorded.append([m.SerializeToString() for m in messages])
            return iter(messages)

        client._request_stream = recording  # type: ignore[method-assign]
        client.generate(DeviceRequest(prompt="a red circle", seed=1, plan=make_plan("decoder", steps=1, codec_chain="fp16,zstd:3")))
        client.generate(DeviceRequest(prompt="a blue square", seed=2, plan=make_plan("decoder", steps=1, merge_ratio=0.5, codec_chain="int8"),
                                      link=LinkConfig(mode="analog", snr_db=10.0)))
        client.generate(DeviceRequest(prompt="a green star", seed=3, recipe="preview-refine",
                                      plan=preview_refine_plan(strength=0.5, steps=2, codec_chain="none")))  # fmt: skip
    return recorded


# -- mutations ----------------------------------------------------------------------------------


def _with(messages: list[bytes], i: int, edit: Callable[[Any], None]) -> list[bytes]:
    from meg.v1 import edge_service_pb2 as edge_pb

    m = edge_pb.GenerateRequest.FromString(messages[i])
    edit(m)
    return [*messages[:i], m.SerializeToString(), *messages[i + 1 :]]


def _index_of(messages: list[bytes], kind: str) -> int | None:
    from meg.v1 import edge_service_pb2 as edge_pb

    for i, raw in enumerate(messages):
        if edge_pb.GenerateRequest.FromString(raw).WhichOneof("kind") == kind:
            return i
    return None


def _mutate(messages: list[bytes], rng: random.Random) -> tuple[str, list[bytes]]:
    """One hostile variant of a good stream: (kind of mutation, messages)."""
    kind = rng.choice(["bitflip", "truncate-message", "truncate-stream", "reorder", "duplicate", "drop", "crc",
                       "huge-size", "nan", "unknown-enum", "long-prompt", "bad-utf8", "garbage", "empty"])  # fmt: skip
    ms = list(messages)
    i = rng.randrange(len(ms))
    if kind == "bitflip":
        raw = bytearray(ms[i])
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        ms[i] = bytes(raw)
    elif kind == "truncate-message":
        ms[i] = ms[i][: rng.randrange(max(1, len(ms[i])))]
    elif kind == "truncate-stream":
        ms = ms[: rng.randrange(len(ms))] if len(ms) > 1 else []
    elif kind == "reorder":
        rng.shuffle(ms)
    elif kind == "duplicate":
        ms.insert(i, ms[i])
    elif kind == "drop":
        del ms[i]
    elif kind == "crc":
        h = _index_of(ms, "tensor_header")
        if h is None:
            return _mutate(messages, rng)
        ms = _with(ms, h, lambda m: setattr(m.tensor_header, "crc32c", m.tensor_header.crc32c ^ 0x5A5A))
    elif kind == "huge-size":
        h = _index_of(ms, "tensor_header")
        if h is None:
            def huge_image(m: Any) -> None:
                m.start.width = m.start.height = 1 << 30
            ms = _with(ms, 0, huge_image)
        else:
            def huge(m: Any) -> None:
                m.tensor_header.encoded_bytes = 1 << 40
                m.tensor_header.shape[:] = [1 << 20, 1 << 20]
            ms = _with(ms, h, huge)
    elif kind == "nan":
        value = rng.choice([math.nan, math.inf, -math.inf])
        field = rng.choice(["guidance_scale", "snr", "limit", "ratio"])

        def poison(m: Any) -> None:
            if field == "guidance_scale":
                m.start.guidance_scale = value
            elif field == "snr":
                m.start.channel.snr_db = value
            elif field == "limit":
                m.start.limits.latency_s = value
            else:
                m.start.plan_override.tome_ratio = value
        ms = _with(ms, 0, poison)
    elif kind == "unknown-enum":
        def enum(m: Any) -> None:
            which = rng.randrange(3)
            if which == 0:
                m.start.recipe = 97
            elif which == 1:
                m.start.channel.mode = 55
            else:
                m.start.channel.fading = 77
        ms = _with(ms, 0, enum)
    elif kind == "long-prompt":
        ms = _with(ms, 0, lambda m: setattr(m.start, "prompt", "a red circle " * rng.choice([100, 10_000, 200_000])))
    elif kind == "bad-utf8":
        # GenerateRequest.start (field 1) wrapping GenerationRequest.prompt (field 2) with invalid UTF-8
        prompt = b"\x12\x04\xff\xfe\xc3\x28"
        ms[0] = b"\x0a" + bytes([len(prompt)]) + prompt
    elif kind == "garbage":
        ms = [rng.randbytes(rng.randint(1, 512)) for _ in range(rng.randint(1, 4))]
    else:  # a stream that opens and sends nothing
        ms = []
    return kind, ms


def _policy_mutation(rng: random.Random) -> tuple[str, str, bytes]:
    from meg.v1 import generation_pb2 as gen_pb
    from meg.v1 import policy_service_pb2 as policy_pb

    obs = policy_pb.Observation(width=256, height=256, recipe=gen_pb.RECIPE_MEG,
                                channel=gen_pb.ChannelState(snr_db=10.0), limits=gen_pb.Limits(latency_s=3.0))  # fmt: skip
    kind = rng.choice(["bitflip", "nan", "unknown-enum", "garbage", "big-batch", "truncate"])
    good = policy_pb.DecideRequest(observation=obs).SerializeToString()
    if kind == "bitflip":
        raw = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return kind, DECIDE, bytes(raw)
    if kind == "nan":
        bad = policy_pb.Observation()
        bad.CopyFrom(obs)
        bad.channel.snr_db = rng.choice([math.nan, math.inf])
        bad.previous_latency_s = rng.choice([math.nan, -math.inf, 1.0])
        return kind, DECIDE, policy_pb.DecideRequest(observation=bad).SerializeToString()
    if kind == "unknown-enum":
        bad = policy_pb.Observation()
        bad.CopyFrom(obs)
        bad.recipe = 99  # type: ignore[assignment]
        return kind, DECIDE, policy_pb.DecideRequest(observation=bad).SerializeToString()
    if kind == "big-batch":
        return kind, DECIDE_BATCH, policy_pb.DecideBatchRequest(observations=[obs] * rng.choice([0, 1, 64, 257, 5000])).SerializeToString()
    if kind == "truncate":
        return kind, DECIDE, good[: rng.randrange(len(good))]
    return kind, rng.choice([DECIDE, DECIDE_BATCH]), rng.randbytes(rng.randint(1, 256))


# -- the hostile run ------------------------------------------------------------------------------


def run_hostile(*, streams: int = 10_000, seed: int = 0, workers: int = 8, deadline_s: float = 5.0) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from meg.recipes.plan import make_plan
    from meg.services.background import EdgeProcess, ServiceProcess
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.transport import channel_options
    from meg.split.loading import load_pipeline

    rng = random.Random(seed)
    edge = EdgeProcess(["--model", "tiny-random", "--queue-size", "64", "--workers", "2", "--torch-threads", "1"])
    policy = ServiceProcess(["serve", "policy"], ["--checkpoint", "rule"], health_service="meg.v1.PolicyService")
    try:
        edge.wait_ready()
        policy.wait_ready()
        pipeline = load_pipeline("tiny-random")
        good_streams = _record_streams(edge.address, pipeline)
        statuses: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = {}
        slow: list[tuple[str, float]] = []
        untyped: list[dict[str, str]] = []
        lock = threading.Lock()
        stop = threading.Event()
        good = {"ok": 0, "failed": 0, "errors": []}

        def good_client() -> None:
            plan = make_plan("decoder", steps=1, codec_chain="fp16,zstd:3")
            with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False, model="tiny-random"), pipeline=pipeline) as c:
                n = 0
                while not stop.is_set():
                    try:
                        c.generate(DeviceRequest(prompt="a red circle", seed=n, plan=plan))
                        good["ok"] += 1  # type: ignore[operator]
                    except Exception as exc:  # noqa: BLE001 - counted as a failure of the good client
                        good["failed"] += 1  # type: ignore[operator]
                        good["errors"].append(repr(exc)[:200])  # type: ignore[attr-defined]
                    n += 1

        edge_channel = grpc.insecure_channel(edge.address, options=channel_options(64 << 20))
        policy_channel = grpc.insecure_channel(policy.address, options=channel_options(64 << 20))
        generate = edge_channel.stream_stream(GENERATE)
        unary = {name: policy_channel.unary_unary(name) for name in (DECIDE, DECIDE_BATCH)}
        jobs: list[tuple[str, str, Any]] = []
        for k in range(streams):
            if k % 5 == 4:
                kind, method, payload = _policy_mutation(rng)
                jobs.append((f"policy:{kind}", method, payload))
            else:
                kind, messages = _mutate(rng.choice(good_streams), rng)
                jobs.append((f"edge:{kind}", GENERATE, messages))

        def send(job: tuple[str, str, Any]) -> None:
            kind, method, payload = job
            started = time.perf_counter()
            try:
                if method == GENERATE:
                    for _ in generate(iter(payload), timeout=deadline_s):
                        pass
                else:
                    unary[method](payload, timeout=deadline_s)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name  # type: ignore[attr-defined]
                if code in ("INTERNAL", "UNKNOWN"):
                    with lock:
                        untyped.append({"kind": kind, "code": code, "details": str(exc.details())[:300]})  # type: ignore[attr-defined]
            took = time.perf_counter() - started
            with lock:
                statuses[code] += 1
                by_kind.setdefault(kind, Counter())[code] += 1
                if took > deadline_s + 1:
                    slow.append((kind, took))

        thread = threading.Thread(target=good_client, daemon=True)
        thread.start()
        started = time.perf_counter()
        warm = max(1, len(jobs) // 20)  # the first 5% warm the edge up (allocator, code paths); memory is measured after them
        with Progress() as progress, ThreadPoolExecutor(workers) as pool:
            task = progress.add_task("hostile streams", total=len(jobs))
            for _ in pool.map(send, jobs[:warm]):
                progress.advance(task)
            rss_before = _rss_mb(edge.proc.pid)
            curve = [(warm, round(rss_before, 1))]
            step = max(1, (len(jobs) - warm) // 10)
            for lo in range(warm, len(jobs), step):  # memory after every tenth of the run
                for _ in pool.map(send, jobs[lo : lo + step]):
                    progress.advance(task)
                curve.append((min(len(jobs), lo + step), round(_rss_mb(edge.proc.pid), 1)))
        elapsed = time.perf_counter() - started
        stop.set()
        thread.join(timeout=60)
        rss_after = _rss_mb(edge.proc.pid)
        health = {}
        for name, address, service in (("edge", edge.address, "meg.v1.EdgeService"), ("policy", policy.address, "meg.v1.PolicyService")):
            with grpc.insecure_channel(address) as ch:
                answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                health[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        edge_channel.close()
        policy_channel.close()
        internal_log = [line for line in (edge.stderr_tail(1 << 30) + policy.stderr_tail(1 << 30)).splitlines()
                        if "internal_error" in line][:20]  # fmt: skip
    finally:
        edge.stop()
        policy.stop()
    bad = {k: v for k, v in statuses.items() if k in ("INTERNAL", "UNKNOWN")}
    return {
        "streams": streams, "wall_s": round(elapsed, 1), "statuses": dict(statuses), "internal_or_unknown": sum(bad.values()), "untyped": untyped, "internal_log": internal_log,
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "over_deadline": len(slow),
        "good_client": good, "edge_rss_mb": {"before_after_warmup": round(rss_before, 1), "after": round(rss_after, 1),
                                             "growth": round(rss_after - rss_before, 1),
                                             "after_streams": curve},
        "health_after": health,
    }  # fmt: skip


# -- kills ---------------------------------------------------------------------------------------


def run_kills(*, kills: int = 100, seed: int = 0) -> dict[str, Any]:
    """`kills` requests against three replicas; during each, the replica serving it (the one
    whose `meg_requests_in_system` is 1: requests go one at a time) is SIGKILLed a random time
    after its plan arrived, and restarted on its port in the background."""
    from meg.recipes.plan import make_plan
    from meg.services.background import EdgeProcess
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.split.loading import load_pipeline

    rng = random.Random(seed)
    args = ["--model", "tiny-random", "--torch-threads", "1"]
    replicas = [EdgeProcess(args, replica_id=f"edge-{k}") for k in range(3)]
    restarts: list[threading.Thread] = []
    outcomes: Counter[str] = Counter()
    named = 0
    try:
        for r in replicas:
            r.wait_ready()
        pipeline = load_pipeline("tiny-random")
        config = ClientConfig(runtime="eager", model="tiny-random", connect_timeout_s=30, retries=2)

        def restart(index: int, victim: EdgeProcess) -> None:
            fresh = EdgeProcess(args, replica_id=victim.replica_id, port=victim.port)
            fresh.wait_ready(timeout_s=120)
            replicas[index] = fresh

        with DeviceClient([r.address for r in replicas], config, pipeline=pipeline) as client, Progress() as progress:
            task = progress.add_task("edge kills", total=kills)
            for n in range(kills):
                fired = threading.Event()
                delay = rng.uniform(0.0, 0.03)

                def on_event(message: Any, fired: threading.Event = fired, delay: float = delay) -> None:
                    if fired.is_set() or not message.HasField("plan"):
                        return
                    fired.set()
                    busy = [r for r in replicas if r.proc.poll() is None and r.metric("meg_requests_in_system") >= 1]
                    if not busy:
                        return
                    victim = busy[0]
                    time.sleep(delay)
                    victim.kill()
                    th = threading.Thread(target=restart, args=(replicas.index(victim), victim), daemon=True)
                    th.start()
                    restarts.append(th)

                plan = make_plan("decoder", steps=rng.choice([4, 8, 16]), codec_chain="none")
                report = client.generate(DeviceRequest(prompt="a red circle", seed=n, plan=plan), on_event=on_event).report
                outcomes["fallback" if report.fallback.used else ("retried" if report.retries else "finished before the kill")] += 1
                named += bool(report.served_by)
                progress.advance(task)
                # keep at least two replicas up before the next request
                while sum(r.proc.poll() is None for r in replicas) < 2:
                    time.sleep(0.2)
    finally:
        for th in restarts:
            th.join(timeout=150)
        for r in replicas:
            r.stop()
    return {"requests": kills, "completed": sum(outcomes.values()), "outcomes": dict(outcomes), "reports_naming_where": named}


def run_reliability_bench(*, streams: int = 10_000, kills: int = 100, fuzz_runs: int = 100_000, seed: int = 0) -> dict[str, Any]:
    from meg.fuzz import TARGETS
    from meg.fuzz.cli import run_target

    return {
        "hostile": run_hostile(streams=streams, seed=seed) if streams else None,
        "kills": run_kills(kills=kills, seed=seed) if kills else None,
        "fuzz": [run_target(t, runs=fuzz_runs) for t in TARGETS] if fuzz_runs else None,
    }


@click.command("reliability")
@click.option("--streams", type=click.IntRange(min=0), default=10_000, show_default=True, help="Hostile request streams (0: skip).")
@click.option("--kills", type=click.IntRange(min=0), default=100, show_default=True, help="Requests whose replica is killed (0: skip).")
@click.option("--fuzz-runs", type=click.IntRange(min=0), default=100_000, show_default=True, help="Inputs per fuzz target (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
def bench_reliability(streams: int, kills: int, fuzz_runs: int, seed: int, json_path: Path | None) -> None:
    """Hostile streams against the edge and policy service (with a good client alongside),
    edge replicas killed mid-request, and every fuzz target: one table."""
    result = run_reliability_bench(streams=streams, kills=kills, fuzz_runs=fuzz_runs, seed=seed)
    table = Table(title="meg bench reliability")
    table.add_column("check")
    table.add_column("result", justify="right")
    h = result["hostile"]
    if h:
        table.add_row("hostile streams (edge + policy)", str(h["streams"]))
        table.add_row("  statuses", ", ".join(f"{k} {v}" for k, v in sorted(h["statuses"].items())))
        table.add_row("  INTERNAL or UNKNOWN", str(h["internal_or_unknown"]))
        table.add_row("  calls over their deadline + 1 s", str(h["over_deadline"]))
        table.add_row("  good client alongside (ok / failed)", f"{h['good_client']['ok']} / {h['good_client']['failed']}")
        table.add_row("  edge memory growth (MB)", f"{h['edge_rss_mb']['growth']:+.1f} ({h['edge_rss_mb']['before_after_warmup']:.0f} → {h['edge_rss_mb']['after']:.0f})")
        table.add_row("  health after", ", ".join(f"{k} {v}" for k, v in h["health_after"].items()))
    k = result["kills"]
    if k:
        table.add_row("edge kills: requests completed", f"{k['completed']} / {k['requests']}")
        table.add_row("  by", ", ".join(f"{a} {b}" for a, b in sorted(k["outcomes"].items())))
    for f in result["fuzz"] or []:
        table.add_row(f"fuzz {f['target']}", f"{f['runs']} inputs, {f['crashes']} crashes, {f['hangs']} hangs, "
                      f"peak {f['peak_rss_mb']} MB (idle {f['idle_rss_mb']} MB)")  # fmt: skip
    Console(width=140).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
