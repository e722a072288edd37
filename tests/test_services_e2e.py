"""Edge server, policy service and device client end to end: real servers on port 0,
the tiny-random pipeline (64×64, 2 steps), one pipeline shared by every server here."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from services_certs import write_test_certs

from meg.channel.link import LinkConfig
from meg.codecs.chain import encode
from meg.codecs.framing import frame_tensor
from meg.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from meg.policy.rule import RuleConfig
from meg.recipes.plan import MEG_TOME_RATIO, make_plan, plan_to_proto
from meg.services.background import RunningServer, ServiceLoop, start_edge, start_policy
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
from meg.services.edge import EdgeConfig
from meg.services.policy_server import PolicyServerConfig
from meg.services.security import TlsConfig, token_metadata
from meg.services.transport import channel_options
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.loading import load_pipeline
from meg.split.points import SplitPoint
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import edge_service_pb2_grpc as edge_grpc
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import tensor_pb2 as tensor_pb

TOKEN = "e2e-token"
STEPS = 2
PROMPT = "a red cube on a blue floor"


@pytest.fixture(scope="module")
def pipeline() -> Any:
    torch.manual_seed(0)
    return load_pipeline("tiny-random")


@pytest.fixture(scope="module")
def engine(pipeline: Any) -> SplitEngine:
    return SplitEngine(pipeline)


@pytest.fixture(scope="module")
def loop() -> Iterator[ServiceLoop]:
    service_loop = ServiceLoop()
    yield service_loop
    service_loop.close()


@pytest.fixture(scope="module")
def edge(pipeline: Any, loop: ServiceLoop) -> Iterator[RunningServer]:
    config = EdgeConfig(model="tiny-random", port=0, token=TOKEN, workers=1, queue_size=16, metrics_port=0)
    server = start_edge(config, pipeline=pipeline, loop=loop)
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def client(edge: RunningServer, pipeline: Any) -> Iterator[DeviceClient]:
    with DeviceClient(edge.address, ClientConfig(token=TOKEN, runtime="eager", deadline_s=60), pipeline=pipeline) as c:
        yield c


def _reference(engine: SplitEngine, seed: int, steps: int = STEPS) -> torch.Tensor:
    return engine.run_full(GenerationInputs(prompt=PROMPT, seed=seed, steps=steps))


def _start(**fields: Any) -> gen_pb.GenerationRequest:
    plan = fields.pop("plan", make_plan("decoder", steps=STEPS, codec_chain="none"))
    fields = {"prompt": PROMPT, "width": 64, "height": 64, "device_profile": "jetson-agx-orin", **fields}
    request = gen_pb.GenerationRequest(**fields)
    request.plan_override.CopyFrom(plan if isinstance(plan, gen_pb.Plan) else plan_to_proto(plan))
    return request


def _raw_call(address: str, messages: Sequence[edge_pb.GenerateRequest], *, metadata: Any = None,
              timeout_s: float = 30.0, on_message: Any = None,
              trailing: list[tuple[str, str]] | None = None) -> tuple[grpc.StatusCode, str, list[edge_pb.GenerateResponse]]:
    """Send `messages` on a raw stub (no client-side checks); return status, details, responses
    (and put a failed call's trailing metadata into `trailing`)."""
    received: list[edge_pb.GenerateResponse] = []
    with grpc.insecure_channel(address, options=channel_options(32 << 20)) as channel:
        call = edge_grpc.EdgeServiceStub(channel).Generate(
            iter(messages), timeout=timeout_s, metadata=token_metadata(TOKEN) if metadata is None else metadata
        )
        try:
            for message in call:
                received.append(message)
                if on_message is not None:
                    on_message(call, message)
        except grpc.RpcError as exc:
            if trailing is not None:
                trailing.extend(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
            return exc.code(), exc.details() or "", received
    return grpc.StatusCode.OK, "", received


def _uplink(chain: str = "none") -> tuple[Any, list[Any]]:
    encoded = encode(torch.arange(256, dtype=torch.float32).reshape(1, 4, 8, 8), chain)
    return frame_tensor(encoded, request_id="up", tensor_id=0, name="latents", chunk_size_bytes=256)


# -- equivalence ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["decoder", "step:1", "image"])
def test_lossless_ideal_link_equals_unsplit_reference(client: DeviceClient, engine: SplitEngine, split: str) -> None:
    result = client.generate(DeviceRequest(prompt=PROMPT, seed=3, plan=make_plan(split, steps=STEPS, codec_chain="none")))
    assert torch.equal(result.image, _reference(engine, seed=3))
    report = json.loads(result.report.to_json())  # the report is plain JSON
    assert report["fallback"] == {"used": False, "reason": None}
    assert report["plan"]["split"] == split and report["plan"]["steps"] == STEPS
    tensors = report["bytes"]["tensors"]
    crossing = engine.crossing(SplitPoint.parse(split), GenerationInputs(prompt=PROMPT, steps=STEPS))
    assert {t["name"] for t in tensors} == {spec.name for spec in crossing}
    assert all(t["encoded_bytes"] == t["raw_bytes"] for t in tensors)  # "none" is lossless and raw
    assert report["bytes"]["downlink"] > sum(t["raw_bytes"] for t in tensors)  # headers and framing on top
    assert report["bytes"]["uplink"] > len(PROMPT)
    parts = {(p["part"], p["measured"]) for p in report["parts"]}
    assert {("edge.compute", True), ("edge.compute", False), ("device.compute", True), ("device.compute", False),
            ("link.downlink", False)} <= parts
    assert report["latency_s"]["measured_wall"] > 0 and report["energy_j"]["modelled_total"] > 0


def test_remote_policy_over_tls_digital_link_and_onnxruntime(pipeline: Any, loop: ServiceLoop, engine: SplitEngine,
                                                    tmp_path: Path) -> None:
    certs = write_test_certs(tmp_path)
    policy_tls = TlsConfig(cert_file=certs["server_cert"], key_file=certs["server_key"])
    policy = start_policy(PolicyServerConfig(port=0, token="policy-token", tls=policy_tls), loop=loop)
    edge_config = EdgeConfig(model="tiny-random", port=0, policy_address=policy.address, policy_token="policy-token",
                             policy_tls=TlsConfig(ca_file=certs["ca"]))
    edge = start_edge(edge_config, pipeline=pipeline, loop=loop)
    try:
        config = ClientConfig(runtime="onnxruntime", onnx_dir=tmp_path)
        with DeviceClient(edge.address, config, pipeline=pipeline) as device:
            link = LinkConfig(mode="digital", snr_db=2.2, bandwidth_hz=1e6)
            result = device.generate(DeviceRequest(prompt=PROMPT, seed=5, link=link, distance_m=200.0), reference=True)
            lossless = device.generate(DeviceRequest(prompt=PROMPT, seed=5, plan=make_plan("decoder", steps=STEPS, codec_chain="none")),
                                       reference=True)
    finally:
        edge.stop(0)
        policy.stop(0)
    report = result.report.to_dict()
    rules = RuleConfig()
    band = sum(edge_db > 2.2 for edge_db in rules.snr_thresholds_db)  # the SNR band of 2.2 dB
    merge = rules.merge_levels[band]
    assert report["plan"]["policy"] == "rule" and report["plan"]["merge_ratio"] == merge > 0
    assert report["plan"]["tome_ratio"] == MEG_TOME_RATIO  # ToMe runs inside the edge UNet
    (latent,) = report["bytes"]["tensors"]
    assert latent["codec_chain"].startswith(f"merge:{merge:g}")
    assert latent["encoded_bytes"] < latent["raw_bytes"] * (1 - merge) / 2 * 1.1  # merged, fp16, side info
    assert report["channel"]["mode"] == "digital" and report["channel"]["downlink_airtime_s"] > 0
    assert report["device"]["runtime"] == "onnxruntime"
    assert 0 < report["quality"]["mse_vs_reference"] < 0.05
    assert result.image.shape == (1, 3, 64, 64)
    assert lossless.report.to_dict()["quality"]["max_abs_diff"] < 1e-4  # ONNX Runtime decodes like torch


def test_analog_link_adds_feature_noise(client: DeviceClient, engine: SplitEngine) -> None:
    link = LinkConfig(mode="analog", snr_db=10.0)
    result = client.generate(DeviceRequest(prompt=PROMPT, seed=3, link=link,
                                           plan=make_plan("decoder", steps=STEPS, codec_chain="none")), reference=True)
    report = result.report.to_dict()
    assert report["channel"]["mode"] == "analog"
    assert 5.0 < report["channel"]["feature_snr_db"] < 15.0
    assert report["channel"]["downlink_airtime_s"] > 0
    assert report["quality"]["mse_vs_reference"] > 0


# -- bad input ------------------------------------------------------------------------------


def _bad_cases() -> list[tuple[str, list[edge_pb.GenerateRequest], Any, grpc.StatusCode, str]]:
    start = edge_pb.GenerateRequest(start=_start())
    header, chunks = _uplink()
    corrupted = edge_pb.GenerateRequest()
    corrupted.tensor_chunk.CopyFrom(chunks[1])
    corrupted.tensor_chunk.data = bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:]
    bad_shape, bad_dtype, bad_raw = (edge_pb.GenerateRequest(tensor_header=header) for _ in range(3))
    del bad_shape.tensor_header.shape[:]
    bad_shape.tensor_header.shape.extend([1, -4, 8, 8])
    bad_dtype.tensor_header.dtype = 99
    bad_raw.tensor_header.shape[1] = 5  # shape no longer matches raw_bytes
    up = [edge_pb.GenerateRequest(tensor_header=header)]
    chunk_msgs = [edge_pb.GenerateRequest(tensor_chunk=c) for c in chunks]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("empty prompt", [edge_pb.GenerateRequest(start=_start(prompt=""))], None, invalid, r"prompt.*empty"),
        ("long prompt", [edge_pb.GenerateRequest(start=_start(prompt="x" * 5000))], None, invalid, r"prompt has 5000"),
        ("steps 0", [edge_pb.GenerateRequest(start=_start(plan=make_plan("decoder", steps=0)))], None, invalid,
         r"plan_override.steps = 0"),
        ("width 60", [edge_pb.GenerateRequest(start=_start(width=60))], None, invalid, r"width = 60"),
        ("unknown codec", [edge_pb.GenerateRequest(start=_start(plan=gen_pb.Plan(split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, codec_chain="gzip:9")))],
         None, invalid, r"gzip"),
        ("merge ratio disagrees with the chain", [edge_pb.GenerateRequest(start=_start(plan=gen_pb.Plan(
            split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, merge_ratio=0.25, codec_chain="merge:0.5")))],
         None, invalid, r"merge_ratio = 0.25 disagrees"),
        ("unknown plan parameter", [edge_pb.GenerateRequest(start=_start(plan=gen_pb.Plan(
            split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER), steps=2, params={"strength": 0.5})))],
         None, invalid, r"'strength'.*not settings of recipe 'meg'"),
        ("impossible split", [edge_pb.GenerateRequest(start=_start(plan=make_plan("unet:999", steps=2)))], None, invalid, r"unet:999"),
        ("other model", [edge_pb.GenerateRequest(start=_start(model="sd-turbo"))], None, grpc.StatusCode.NOT_FOUND,
         r"'sd-turbo' is not served here"),
        ("unknown profile", [edge_pb.GenerateRequest(start=_start(device_profile="toaster-9000"))], None, invalid, r"toaster-9000"),
        ("chunk first", chunk_msgs[:1], None, invalid, r"first message must be 'start'"),
        ("chunk before header", [start, *chunk_msgs[:1]], None, invalid, r"before its header"),
        ("negative shape", [start, bad_shape], None, invalid, r"tensor_header.shape.*negative"),
        ("unknown dtype", [start, bad_dtype], None, invalid, r"dtype"),
        ("shape vs raw_bytes", [start, bad_raw], None, invalid, r"tensor_header.raw_bytes"),
        ("duplicate chunk", [start, *up, chunk_msgs[0], chunk_msgs[0]], None, invalid, r"duplicate chunk"),
        ("corrupted chunk", [start, *up, chunk_msgs[0], corrupted, *chunk_msgs[2:]], None, grpc.StatusCode.DATA_LOSS, r"CRC32C"),
        ("oversized message", [start, edge_pb.GenerateRequest(tensor_chunk=tensor_pb.TensorChunk(data=b"\0" * (9 << 20)))],
         None, grpc.StatusCode.RESOURCE_EXHAUSTED, r""),
        ("unwanted uplink tensor", [start, *up, *chunk_msgs], None, invalid, r"'latents' is not taken"),
        ("missing token", [start], (), grpc.StatusCode.UNAUTHENTICATED, r"bearer token"),
        ("wrong token", [start], token_metadata("nope"), grpc.StatusCode.UNAUTHENTICATED, r"bearer token"),
    ]


def test_bad_inputs_are_refused_while_a_good_request_succeeds(edge: RunningServer, client: DeviceClient,
                                                              engine: SplitEngine) -> None:
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(client.generate, DeviceRequest(prompt=PROMPT, seed=11, plan=make_plan("decoder", steps=6, codec_chain="none")))
        for label, messages, metadata, code, pattern in _bad_cases():
            got, details, responses = _raw_call(edge.address, messages, metadata=metadata)
            assert got == code, f"{label}: {got} {details}"
            assert re.search(pattern, details), f"{label}: {details!r}"
            errors = [r.error for r in responses if r.HasField("error")]
            if errors and code != grpc.StatusCode.UNAUTHENTICATED:
                assert errors[-1].message == details
        result = good.result(timeout=60)
    assert result.report.to_dict()["fallback"]["used"] is False
    assert torch.equal(result.image, _reference(engine, seed=11, steps=6))


def test_mutual_tls_edge_refuses_a_client_without_certificate(pipeline: Any, loop: ServiceLoop, engine: SplitEngine,
                                                              tmp_path: Path) -> None:
    certs = write_test_certs(tmp_path)
    server_tls = TlsConfig(cert_file=certs["server_cert"], key_file=certs["server_key"], ca_file=certs["ca"])
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, tls=server_tls), pipeline=pipeline, loop=loop)
    request = DeviceRequest(prompt=PROMPT, seed=3, plan=make_plan("decoder", steps=STEPS, codec_chain="none"))
    try:
        with_cert = TlsConfig(ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"])
        without_cert = TlsConfig(ca_file=certs["ca"])
        with DeviceClient(edge.address, ClientConfig(runtime="eager", tls=with_cert), pipeline=pipeline) as device:
            good = device.generate(request)
        no_fallback = ClientConfig(runtime="eager", tls=without_cert, fallback=False, connect_timeout_s=1.0)
        with DeviceClient(edge.address, no_fallback, pipeline=pipeline) as device, \
                pytest.raises(UnavailableError, match="no healthy edge"):
            device.generate(request)
    finally:
        edge.stop(0)
    assert good.report.to_dict()["fallback"]["used"] is False
    assert torch.equal(good.image, _reference(engine, seed=3))


# -- load -----------------------------------------------------------------------------------


def test_sixteen_concurrent_clients_complete(client: DeviceClient, engine: SplitEngine) -> None:
    plan = make_plan("decoder", steps=STEPS, codec_chain="fp16,zstd:3")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda seed: client.generate(DeviceRequest(prompt=PROMPT, seed=seed, plan=plan)), range(16)))
    assert all(not r.report.to_dict()["fallback"]["used"] for r in results)
    assert len({r.report.to_dict()["request_id"] for r in results}) == 16
    assert not torch.equal(results[0].image, results[1].image)  # different seeds, different images
    assert torch.allclose(results[4].image, _reference(engine, seed=4), atol=2e-2)  # fp16 on the wire


def test_overload_beyond_the_queue_is_resource_exhausted(pipeline: Any, loop: ServiceLoop) -> None:
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, workers=1, queue_size=1), pipeline=pipeline, loop=loop)
    try:
        slow = [edge_pb.GenerateRequest(start=_start(plan=make_plan("decoder", steps=12, codec_chain="none")))]
        trailers: list[list[tuple[str, str]]] = [[] for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda i: _raw_call(edge.address, slow, metadata=(), timeout_s=60, trailing=trailers[i]),
                                     range(6)))  # fmt: skip
    finally:
        edge.stop(0)
    codes = [code for code, _, _ in outcomes]
    # each refusal says when to come back: trailing metadata retry-after-ms, a positive integer
    for (code, _, _), trailer in zip(outcomes, trailers, strict=True):
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hints = [int(v) for k, v in trailer if k == "retry-after-ms"]
            assert len(hints) == 1 and hints[0] >= 50, trailer
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all("at capacity" in details for code, details, _ in outcomes if code != grpc.StatusCode.OK)


# -- faults ---------------------------------------------------------------------------------


def test_edge_killed_mid_stream_falls_back_then_restarted_edge_serves(pipeline: Any, loop: ServiceLoop,
                                                                      engine: SplitEngine) -> None:
    edge = start_edge(EdgeConfig(model="tiny-random", port=0), pipeline=pipeline, loop=loop)
    port = edge.port
    config = ClientConfig(runtime="eager", connect_timeout_s=10)
    killed = threading.Event()

    def kill_on_plan(message: edge_pb.GenerateResponse) -> None:
        if message.HasField("plan") and not killed.is_set():
            killed.set()
            edge.stop(0)

    with DeviceClient(f"127.0.0.1:{port}", config, pipeline=pipeline) as device:
        request = DeviceRequest(prompt=PROMPT, seed=9, plan=make_plan("decoder", steps=STEPS, codec_chain="none"))
        result = device.generate(request, on_event=kill_on_plan)
        assert killed.is_set()
        assert result.report.to_dict()["fallback"]["used"] is True
        assert result.report.to_dict()["fallback"]["reason"]
        assert result.report.to_dict()["plan"]["split"] == "device" and result.report.to_dict()["bytes"]["downlink"] == 0
        assert torch.equal(result.image, _reference(engine, seed=9))  # same maths, all on the device

        restarted = start_edge(EdgeConfig(model="tiny-random", port=port), pipeline=pipeline, loop=loop)
        try:
            again = device.generate(request)
        finally:
            restarted.stop(0)
    assert again.report.to_dict()["fallback"]["used"] is False
    assert torch.equal(again.image, result.image)


def test_round_robin_spreads_requests_and_skips_a_stopped_edge(pipeline: Any, loop: ServiceLoop) -> None:
    edges = [start_edge(EdgeConfig(model="tiny-random", port=0), pipeline=pipeline, loop=loop) for _ in range(2)]
    plan = make_plan("decoder", steps=1, codec_chain="none")

    def served(edge: RunningServer) -> float:
        registry = edge.server.servicer.metrics.registry
        return registry.get_sample_value("meg_requests_total", {"service": "edge"}) or 0.0

    try:
        with DeviceClient([e.address for e in edges], ClientConfig(runtime="eager"), pipeline=pipeline) as device:
            first = [device.generate(DeviceRequest(prompt=PROMPT, seed=s, plan=plan)) for s in range(4)]
            assert all(served(e) >= 1 for e in edges)
            edges[0].stop(0)
            after = [device.generate(DeviceRequest(prompt=PROMPT, seed=s, plan=plan)) for s in range(3)]
    finally:
        edges[1].stop(0)
    assert not any(r.report.to_dict()["fallback"]["used"] for r in first + after)


def test_packet_lost_on_the_link_falls_back_and_says_why(pipeline: Any, loop: ServiceLoop) -> None:
    # No retransmissions over Rayleigh fading at the Shannon rate: each packet is lost with
    # probability 1 - 1/e, so the seeded link loses one of the answer's packets.
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, link=LinkConfig(max_retries=0)), pipeline=pipeline, loop=loop)
    try:
        link = LinkConfig(mode="digital", fading="rayleigh", snr_db=2.2)
        request = DeviceRequest(prompt=PROMPT, link=link, plan=make_plan("decoder", steps=1, codec_chain="none"))
        with DeviceClient(edge.address, ClientConfig(runtime="eager"), pipeline=pipeline) as device:
            result = device.generate(request)
    finally:
        edge.stop(0)
    assert result.report.to_dict()["fallback"]["used"] is True
    assert "lost after 1 attempts" in result.report.to_dict()["fallback"]["reason"]


def test_deadline_falls_back_to_the_device(pipeline: Any, loop: ServiceLoop) -> None:
    # A 2 kbit/s link in real time makes the ~1.3 kB answer take seconds: past the deadline.
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, realtime=True), pipeline=pipeline, loop=loop)
    try:
        slow_link = LinkConfig(mode="digital", rate_bps=2000.0, snr_db=40.0)
        request = DeviceRequest(prompt=PROMPT, link=slow_link, plan=make_plan("decoder", steps=STEPS, codec_chain="none"))
        with DeviceClient(edge.address, ClientConfig(runtime="eager", deadline_s=1.0), pipeline=pipeline) as device:
            result = device.generate(request)
        assert result.report.to_dict()["fallback"]["used"] is True
        assert "DeadlineExceeded" in result.report.to_dict()["fallback"]["reason"]
        with DeviceClient(edge.address, ClientConfig(runtime="eager", deadline_s=1.0, fallback=False),
                          pipeline=pipeline) as device, pytest.raises(DeadlineExceededError):
            device.generate(request)
    finally:
        edge.stop(0)


def test_client_cancellation_stops_the_edge_work(edge: RunningServer) -> None:
    servicer = edge.server.servicer
    real_run_edge = servicer.context.engine.run_edge
    outcome: list[BaseException | None] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        try:
            result = real_run_edge(*args, **kwargs)
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(None)
        return result

    def cancel_on_first_progress(call: Any, message: edge_pb.GenerateResponse) -> None:
        if message.HasField("progress") and message.progress.stage == "denoise":
            call.cancel()

    servicer.context.engine.run_edge = spy
    try:
        start = [edge_pb.GenerateRequest(start=_start(plan=make_plan("decoder", steps=60, codec_chain="none")))]
        code, _, _ = _raw_call(edge.address, start, on_message=cancel_on_first_progress)
        deadline = time.monotonic() + 30
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        servicer.context.engine.run_edge = real_run_edge
    assert code == grpc.StatusCode.CANCELLED
    assert isinstance(outcome[0], DeadlineExceededError)
    assert re.search(r"stopped before step (\d+) of 60", str(outcome[0]))


def test_graceful_stop_drains_the_request_in_flight(pipeline: Any, loop: ServiceLoop) -> None:
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, grace_s=30), pipeline=pipeline, loop=loop)
    stopper: list[threading.Thread] = []

    def stop_on_plan(message: edge_pb.GenerateResponse) -> None:
        if message.HasField("plan") and not stopper:
            stopper.append(threading.Thread(target=edge.stop))
            stopper[0].start()

    config = ClientConfig(runtime="eager", connect_timeout_s=0.5)
    with DeviceClient(edge.address, config, pipeline=pipeline) as device:
        request = DeviceRequest(prompt=PROMPT, plan=make_plan("decoder", steps=6, codec_chain="none"))
        drained = device.generate(request, on_event=stop_on_plan)
        stopper[0].join(timeout=30)
        after = device.generate(request)
    assert drained.report.to_dict()["fallback"]["used"] is False
    assert after.report.to_dict()["fallback"]["used"] is True  # the stopped edge takes no new request


# -- health, reflection, metrics -------------------------------------------------------------


def test_health_turns_serving_only_once_the_model_is_loaded(pipeline: Any, loop: ServiceLoop) -> None:
    release = threading.Event()

    def slow_loader() -> Any:
        release.wait(30)
        return pipeline

    edge = start_edge(EdgeConfig(model="tiny-random", port=0), loop=loop, loader=slow_loader, wait_ready=False)
    try:
        with grpc.insecure_channel(edge.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="meg.v1.EdgeService")
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, details, _ = _raw_call(edge.address, [edge_pb.GenerateRequest(start=_start())], metadata=())
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            release.set()
            loop.run(edge.server.wait_until_ready(30))
            assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            services = {s.name for s in answer.list_services_response.service}
            assert {"meg.v1.EdgeService", "grpc.health.v1.Health"} <= services
    finally:
        release.set()
        edge.stop(0)


def test_metrics_count_requests_errors_and_bytes(edge: RunningServer, client: DeviceClient) -> None:
    client.generate(DeviceRequest(prompt=PROMPT, plan=make_plan("decoder", steps=STEPS, codec_chain="none")))
    _raw_call(edge.address, [edge_pb.GenerateRequest(start=_start(width=60))])
    text = urllib.request.urlopen(f"http://127.0.0.1:{edge.server.metrics_port}/metrics", timeout=5).read().decode()
    requests = float(re.search(r'meg_requests_total\{service="edge"\} (\S+)', text).group(1))
    invalid = float(re.search(r'meg_errors_total\{code="INVALID_ARGUMENT",service="edge"\} (\S+)', text).group(1))
    sent = float(re.search(r'meg_bytes_sent_total\{service="edge"\} (\S+)', text).group(1))
    assert requests >= 2 and invalid >= 1 and sent > 1000
    assert "meg_request_latency_seconds_bucket" in text


# -- command line ---------------------------------------------------------------------------


def test_meg_generate_writes_image_and_report(edge: RunningServer, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meg.cli import cli

    args = ["--edge", edge.address, "--prompt", PROMPT, "--token", TOKEN, "--runtime", "eager", "--model", "tiny-random", "--split", "step:1",
            "--steps", str(STEPS), "--codec", "fp16,zstd:3", "--distance-m", "300", "--mode", "digital",
            "--reference", "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["split"] == "step:1" and report["fallback"]["used"] is False
    assert abs(report["channel"]["snr_db"] - (-4.4)) < 0.1  # MEG's link budget at 300 m
    assert report["quality"]["mse_vs_reference"] < 1e-3
    assert (tmp_path / "image.png").stat().st_size > 0
    assert "MSE vs reference" in result.output

    refused = CliRunner().invoke(cli, ["generate", *args[:6], "--width", "60", "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "width" in refused.output


class _CorruptingEdge(edge_grpc.EdgeServiceServicer):
    """An edge that answers with a corrupted latent: the point is the device's checks."""

    async def Generate(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        first = await anext(aiter(request_iterator))
        yield edge_pb.GenerateResponse(plan=first.start.plan_override)
        header, chunks = frame_tensor(encode(torch.zeros(1, 4, 8, 8), "none"), request_id="x", tensor_id=0,
                                      name="latents", chunk_size_bytes=512)
        yield edge_pb.GenerateResponse(tensor_header=header)
        yield edge_pb.GenerateResponse(tensor_chunk=chunks[0])
        bad = tensor_pb.TensorChunk()
        bad.CopyFrom(chunks[1])
        bad.data = b"\xff" * len(bad.data)
        yield edge_pb.GenerateResponse(tensor_chunk=bad)
        yield edge_pb.GenerateResponse(report=gen_pb.EdgeReport(request_id="x"))


def test_device_refuses_corrupted_tensors_and_falls_back(pipeline: Any, loop: ServiceLoop, engine: SplitEngine) -> None:
    from meg.services.transport import bind_server, enable_health_and_reflection, set_serving

    async def start() -> tuple[Any, int]:
        server, port = bind_server("127.0.0.1", 0, max_message_bytes=8 << 20)
        edge_grpc.add_EdgeServiceServicer_to_server(_CorruptingEdge(), server)
        health = enable_health_and_reflection(server, ["meg.v1.EdgeService"])
        await set_serving(health, ["meg.v1.EdgeService"], True)
        await server.start()
        return server, port

    server, port = loop.run(start())
    try:
        request = DeviceRequest(prompt=PROMPT, seed=2, plan=make_plan("decoder", steps=STEPS, codec_chain="none"))
        with DeviceClient(f"127.0.0.1:{port}", ClientConfig(runtime="eager"), pipeline=pipeline) as device:
            result = device.generate(request)
    finally:
        loop.run(server.stop(0))
    assert result.report.to_dict()["fallback"]["used"] is True
    assert "CRC32C" in result.report.to_dict()["fallback"]["reason"]
    assert torch.equal(result.image, _reference(engine, seed=2))


def test_edge_uses_the_shipped_cvpo_policy_by_address(pipeline: Any, loop: ServiceLoop) -> None:
    from meg.policy import load_policy

    policy = start_policy(PolicyServerConfig(port=0), policy=load_policy("cvpo"), loop=loop)
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, policy_address=policy.address), pipeline=pipeline, loop=loop)
    try:
        with DeviceClient(edge.address, ClientConfig(runtime="eager"), pipeline=pipeline) as device:
            link = LinkConfig(mode="digital", snr_db=2.2, bandwidth_hz=1e6)
            report = device.generate(DeviceRequest(prompt=PROMPT, seed=1, link=link, distance_m=200.0,
                                                   latency_limit_s=5.0, energy_limit_j=1000.0)).report.to_dict()
    finally:
        edge.stop(0)
        policy.stop(0)
    assert report["plan"]["policy"] == "cvpo"
    assert not report["fallback"]["used"]
    (decide,) = [p for p in report["parts"] if p["part"] == "policy.decide"]
    assert decide["measured"] and 0 < decide["latency_s"] < 1.0


def test_a_dead_or_slow_policy_service_leaves_planning_to_the_edge_and_the_report_says_so(pipeline: Any,
                                                                                         loop: ServiceLoop) -> None:
    from meg.services.background import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    edge = start_edge(EdgeConfig(model="tiny-random", port=0, policy_address=dead, policy_timeout_s=0.5),
                      pipeline=pipeline, loop=loop)  # fmt: skip
    try:
        with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as device:
            report = device.generate(DeviceRequest(prompt=PROMPT, seed=1)).report
    finally:
        edge.stop(0)
    assert not report.fallback.used
    assert report.plan["policy"].endswith("(policy service unavailable)"), report.plan["policy"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_server_on_the_network_without_tls_or_token_is_refused_unless_insecure(host: str) -> None:
    from meg.services.edge import create_edge_server
    from meg.services.policy_server import create_policy_server
    from meg.services.transport import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]") and not is_loopback(host)

    async def build(make: Any, config: Any) -> None:
        server, _ = await make(config)
        await server.grpc_server.stop(None)

    with pytest.raises(InvalidInputError, match=r"refusing to serve on .* without TLS or a token.*--insecure") as err:
        asyncio.run(build(create_edge_server, EdgeConfig(host=host, port=0, model="tiny-random")))
    assert err.value.field == "host"
    with pytest.raises(InvalidInputError, match="--insecure"):
        asyncio.run(build(create_policy_server, PolicyServerConfig(host=host, port=0)))
    # a token, or the explicit --insecure, allows it
    asyncio.run(build(create_edge_server, EdgeConfig(host=host, port=0, model="tiny-random", token="t")))
    asyncio.run(build(create_policy_server, PolicyServerConfig(host=host, port=0, insecure=True)))
