"""Bytes that are not a `GenerateRequest` are the client's fault: INVALID_ARGUMENT, and the
edge keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from meg.recipes.plan import make_plan, plan_to_proto
from meg.services.background import RunningServer
from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import generation_pb2 as gen_pb

GENERATE = "/meg.v1.EdgeService/Generate"


def _start_bytes() -> bytes:
    request = gen_pb.GenerationRequest(prompt="a red circle", seed=1)
    request.plan_override.CopyFrom(plan_to_proto(make_plan("decoder", steps=1)))
    return edge_pb.GenerateRequest(start=request).SerializeToString()


@pytest.mark.parametrize("stream", [
    [b"\xff\xff\xff"],                      # not protobuf at all
    [b"\x0a\x05\x12\x03abc\x00\x00"],       # a field that runs past the message's end
    [_start_bytes()[:-3]],                  # a truncated start
    [_start_bytes(), b"\x12\xff"],          # a good start, then a broken header message
])
def test_malformed_request_messages_are_invalid_argument(edge: RunningServer, pipeline: Any,
                                                         stream: list[bytes]) -> None:
    with grpc.insecure_channel(edge.address) as channel:
        call = channel.stream_stream(GENERATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter(stream), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "meg.v1.GenerateRequest" in (info.value.details() or "")
    # and the edge serves the next client as before
    with DeviceClient(edge.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as client:
        result = client.generate(DeviceRequest(prompt="a blue square", plan=make_plan("decoder", steps=1)))
    assert not result.report.fallback.used


@pytest.mark.parametrize(("method", "payload"), [
    ("Decide", b"\xff\xff\xff"),
    ("Decide", b"\x0a\x05\x0a\x03"),  # an observation that runs past the message's end
    ("DecideBatch", b"\xff\x01"),
])
def test_malformed_policy_requests_are_invalid_argument(method: str, payload: bytes) -> None:
    from meg.services.background import ServiceLoop, start_policy
    from meg.services.policy_server import PolicyServerConfig
    from meg.v1 import policy_service_pb2 as policy_pb

    loop = ServiceLoop()
    policy = start_policy(PolicyServerConfig(port=0), loop=loop)
    try:
        with grpc.insecure_channel(policy.address) as channel:
            raw = channel.unary_unary(f"/meg.v1.PolicyService/{method}", request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as info:
                raw(payload, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid meg.v1." in (info.value.details() or "")
            # and it keeps answering good requests
            good = channel.unary_unary("/meg.v1.PolicyService/Decide",
                                       request_serializer=policy_pb.DecideRequest.SerializeToString,
                                       response_deserializer=policy_pb.DecideResponse.FromString)
            answer = good(policy_pb.DecideRequest(observation=policy_pb.Observation()), timeout=10)
            assert answer.plan.steps >= 1
    finally:
        policy.stop(0)
        loop.close()


def test_a_stream_that_opens_and_never_sends_is_closed_by_its_deadline(edge: Any) -> None:
    import threading
    import time

    import grpc

    from meg.v1 import edge_service_pb2_grpc as edge_grpc

    release = threading.Event()

    def silent() -> Any:
        release.wait(30)
        return
        yield  # a generator that sends nothing until released

    with grpc.insecure_channel(edge.address) as channel:
        stub = edge_grpc.EdgeServiceStub(channel)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as err:
                for _ in stub.Generate(silent(), timeout=1.0):
                    pass
        finally:
            release.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="meg.v1.EdgeService"), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_stops_reading_does_not_hold_up_the_others(pipeline: Any) -> None:
    # a large answer (an uncompressed 512 px image) to a client that reads one message and
    # stalls: HTTP/2 flow control holds the edge's writes; the other client is served, and the
    # stalled stream ends with its deadline
    import threading
    import time

    import grpc

    from meg.services.background import ServiceLoop, start_edge
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.edge import EdgeConfig
    from meg.v1 import edge_service_pb2_grpc as edge_grpc

    loop = ServiceLoop()
    server = start_edge(EdgeConfig(port=0, model="tiny-random", workers=2), pipeline=pipeline, loop=loop)
    try:
        request = gen_pb.GenerationRequest(prompt="a red circle", seed=1, width=512, height=512)
        request.plan_override.CopyFrom(plan_to_proto(make_plan("image", steps=1)))
        stalled_code: list[Any] = []

        def stall() -> None:
            with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
                call = edge_grpc.EdgeServiceStub(ch).Generate(iter([edge_pb.GenerateRequest(start=request)]), timeout=4.0)
                try:
                    next(call)  # the plan; then never read again
                    time.sleep(6.0)
                    for _ in call:
                        pass
                    stalled_code.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    stalled_code.append(exc.code())

        th = threading.Thread(target=stall)
        th.start()
        time.sleep(0.5)
        with DeviceClient(server.address, ClientConfig(runtime="eager", fallback=False), pipeline=pipeline) as device:
            started = time.monotonic()
            for seed in range(3):
                device.generate(DeviceRequest(prompt="a blue square", seed=seed, plan=make_plan("decoder", steps=1)))
            assert time.monotonic() - started < 4.0  # served while the other stream is stalled
        th.join(timeout=30)
        assert stalled_code == [grpc.StatusCode.DEADLINE_EXCEEDED]
    finally:
        server.stop(0)
        loop.close()
