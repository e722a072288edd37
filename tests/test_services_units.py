"""Service pieces that need no model: status mapping, limits, conversions, admission,
rule policy, and the policy service over real sockets with bearer auth, TLS and mTLS."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services_certs import write_test_certs

from meg.channel.link import LinkConfig
from meg.convert import channel_from_link_config, link_config_from_channel
from meg.errors import (
    AuthenticationError,
    ChannelError,
    CodecError,
    CorruptPayloadError,
    DeadlineExceededError,
    FramingError,
    InvalidInputError,
    ModelNotFoundError,
    ResourceExhaustedError,
    SplitError,
    UnavailableError,
)
from meg.policy.rule import RuleConfig
from meg.recipes.plan import make_plan, split_from_proto, split_to_proto
from meg.services.admission import WorkerPool
from meg.services.background import start_policy
from meg.services.limits import ServiceLimits, validate_plan, validate_request
from meg.services.policy_server import PolicyServerConfig
from meg.services.security import TlsConfig, channel_credentials, resolve_token, token_metadata
from meg.services.status import error_from_rpc, error_message, error_proto, grpc_code_for
from meg.split.points import SplitPoint
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb
from meg.v1 import policy_service_pb2_grpc as policy_grpc

# -- status mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code", "proto_code"),
    [
        (CorruptPayloadError("crc32c mismatch"), grpc.StatusCode.DATA_LOSS, gen_pb.ERROR_CODE_DATA_LOSS),
        (CodecError("unknown stage 'gzip'"), grpc.StatusCode.INVALID_ARGUMENT, gen_pb.ERROR_CODE_INVALID_ARGUMENT),
        (FramingError("gap"), grpc.StatusCode.INVALID_ARGUMENT, gen_pb.ERROR_CODE_INVALID_ARGUMENT),
        (SplitError("step:9"), grpc.StatusCode.INVALID_ARGUMENT, gen_pb.ERROR_CODE_INVALID_ARGUMENT),
        (ResourceExhaustedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, gen_pb.ERROR_CODE_RESOURCE_EXHAUSTED),
        (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED, gen_pb.ERROR_CODE_DEADLINE_EXCEEDED),
        (UnavailableError("gone"), grpc.StatusCode.UNAVAILABLE, gen_pb.ERROR_CODE_UNAVAILABLE),
        (ChannelError("lost"), grpc.StatusCode.UNAVAILABLE, gen_pb.ERROR_CODE_UNAVAILABLE),
        (AuthenticationError("token"), grpc.StatusCode.UNAUTHENTICATED, gen_pb.ERROR_CODE_UNAUTHENTICATED),
        (ModelNotFoundError("sd-9"), grpc.StatusCode.NOT_FOUND, gen_pb.ERROR_CODE_NOT_FOUND),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL, gen_pb.ERROR_CODE_INTERNAL),
    ],
)
def test_each_error_maps_to_one_status(exc: Exception, code: grpc.StatusCode, proto_code: int) -> None:
    assert grpc_code_for(exc) == code
    assert error_proto(exc).code == proto_code


def test_error_message_names_field_and_hides_internals() -> None:
    exc = InvalidInputError("width = 60 is not a multiple of 8", field="width")
    assert error_message(exc) == "width: width = 60 is not a multiple of 8"
    assert error_proto(exc).field == "width"
    assert "secret" not in error_message(RuntimeError("secret path /etc/x"))


class _FakeRpcError(grpc.RpcError):
    """Stands in for a failed call: the point is the translation, not the transport."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def test_error_from_rpc_round_trips_code_and_field() -> None:
    err = error_from_rpc(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: prompt is empty", (("meg-field", "prompt"),)))
    assert isinstance(err, InvalidInputError) and err.field == "prompt" and "prompt is empty" in err.message
    assert isinstance(error_from_rpc(_FakeRpcError(grpc.StatusCode.CANCELLED, "x")), UnavailableError)
    assert isinstance(error_from_rpc(_FakeRpcError(grpc.StatusCode.DATA_LOSS, "crc")), CorruptPayloadError)


# -- limits ---------------------------------------------------------------------------------


def _request(**fields: object) -> gen_pb.GenerationRequest:
    request = gen_pb.GenerationRequest(prompt="a red cube", width=64, height=64)
    for key, value in fields.items():
        setattr(request, key, value)
    return request


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt"),
        ({"width": 60}, "width"),
        ({"height": 68}, "height"),
        ({"width": 4096}, "width"),
        ({"width": 2048, "height": 2048}, "width"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"request_id": "bad id with spaces"}, "request_id"),
    ],
)
def test_request_limits_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_request(_request(**fields), ServiceLimits())
    assert info.value.field == field
    assert field.split(".")[-1] in str(info.value)


def test_channel_and_plan_limits_name_the_field() -> None:
    request = _request()
    request.channel.snr_db = float("inf")
    with pytest.raises(InvalidInputError, match="channel.snr_db") as info:
        validate_request(request, ServiceLimits())
    assert info.value.field == "channel.snr_db"
    def wire_plan(split: str, steps: int, **fields: Any) -> gen_pb.Plan:
        return gen_pb.Plan(split=split_to_proto(SplitPoint.parse(split)), steps=steps, **fields)

    for plan, field in [
        (wire_plan("decoder", 0), "plan.steps"),
        (wire_plan("decoder", 101), "plan.steps"),
        (wire_plan("decoder", 2, merge_ratio=0.9), "plan.merge_ratio"),
        (wire_plan("decoder", 2, tome_ratio=-0.1), "plan.tome_ratio"),
        (wire_plan("step:3", 2), "plan.split.index"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            validate_plan(plan, ServiceLimits())
        assert info.value.field == field
    validate_plan(wire_plan("step:1", 2), ServiceLimits())
    validate_request(_request(width=0, height=0), ServiceLimits())  # 0: the edge's default


# -- conversions ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["device", "step:3", "decoder", "image", "unet:2"])
def test_split_round_trips_through_proto(text: str) -> None:
    point = SplitPoint.parse(text)
    assert split_from_proto(split_to_proto(point)) == point


def test_unknown_split_kind_is_named() -> None:
    with pytest.raises(SplitError, match="99") as info:
        split_from_proto(gen_pb.SplitPoint(kind=99))
    assert info.value.field == "plan.split.kind"


def test_link_config_round_trips_and_zero_means_default() -> None:
    link = LinkConfig(mode="digital", snr_db=-4.4, bandwidth_hz=1e6, fading="rayleigh", rate_bps=1e7)
    assert link_config_from_channel(channel_from_link_config(link, distance_m=300.0)) == link
    defaults = link_config_from_channel(gen_pb.ChannelState(snr_db=0.0))
    assert defaults.snr_db == 0.0 and defaults.bandwidth_hz == LinkConfig().bandwidth_hz
    with pytest.raises(InvalidInputError) as info:
        link_config_from_channel(gen_pb.ChannelState(mode=42))
    assert info.value.field == "channel.mode"


# -- admission ------------------------------------------------------------------------------


def test_pool_refuses_beyond_capacity_and_frees_places() -> None:
    async def scenario() -> list[int]:
        pool = WorkerPool(workers=1, queue_size=1)
        first, second = pool.admit(), pool.admit()
        with pytest.raises(ResourceExhaustedError, match="queue_size = 1"):
            pool.admit()
        result = await pool.run(first, lambda: 41 + 1)
        first.release()
        first.release()  # idempotent
        third = pool.admit()
        second.release()
        third.release()
        pool.shutdown()
        return [result, pool.in_system]

    assert asyncio.run(scenario()) == [42, 0]


def test_cancelled_work_keeps_its_place_until_the_thread_returns() -> None:
    import threading

    async def scenario() -> tuple[int, int]:
        pool = WorkerPool(workers=1, queue_size=0)
        release = threading.Event()
        slot = pool.admit()
        task = asyncio.ensure_future(pool.run(slot, release.wait))
        await asyncio.sleep(0.05)
        task.cancel()
        slot.release()
        during = pool.in_system  # the thread still runs: the place is held
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pool.in_system == 0:
                break
        pool.shutdown()
        return during, pool.in_system

    assert asyncio.run(scenario()) == (1, 0)


# -- policy service over sockets: auth, TLS, mTLS, health, metrics ---------------------------


def _decide(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> policy_pb.DecideResponse:
    stub = policy_grpc.PolicyServiceStub(channel)
    observation = policy_pb.Observation(channel=gen_pb.ChannelState(snr_db=-4.4))
    return stub.Decide(policy_pb.DecideRequest(observation=observation), timeout=5, metadata=metadata)


def test_bearer_token_is_required_and_health_stays_open() -> None:
    with start_policy(PolicyServerConfig(port=0, token="s3cret", metrics_port=0)) as server, \
            grpc.insecure_channel(server.address) as channel:
        for metadata in ((), token_metadata("wrong"), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as info:
                _decide(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
        response = _decide(channel, token_metadata("s3cret"))
        assert response.plan.merge_ratio == RuleConfig().merge_levels[-1]  # -4.4 dB: the poorest band
        assert response.decision_latency_s >= 0
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="meg.v1.PolicyService"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
        assert 'meg_requests_total{service="policy"} 1.0' in metrics


def test_token_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEG_AUTH_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    assert resolve_token("flag") == "flag"
    with pytest.raises(InvalidInputError):
        resolve_token("has space")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_test_certs(tmp_path_factory.mktemp("certs"))


def test_tls_and_mutual_tls(certs: dict[str, Path]) -> None:
    server_tls = TlsConfig(cert_file=certs["server_cert"], key_file=certs["server_key"])
    mutual_tls = TlsConfig(cert_file=certs["server_cert"], key_file=certs["server_key"], ca_file=certs["ca"])
    trust_only = channel_credentials(TlsConfig(ca_file=certs["ca"]))
    with_cert = channel_credentials(TlsConfig(ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"]))

    with start_policy(PolicyServerConfig(port=0, tls=server_tls)) as server:
        with grpc.secure_channel(server.address, trust_only) as channel:
            assert _decide(channel).plan.steps > 0
        with grpc.insecure_channel(server.address) as plaintext, pytest.raises(grpc.RpcError) as info:
            _decide(plaintext)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    with start_policy(PolicyServerConfig(port=0, tls=mutual_tls)) as server:
        with grpc.secure_channel(server.address, trust_only) as channel, pytest.raises(grpc.RpcError) as info:
            _decide(channel)  # no client certificate: the handshake fails
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(server.address, with_cert) as channel:
            assert _decide(channel).plan.steps > 0


def test_unreadable_certificate_file_is_named(tmp_path: Path) -> None:
    from meg.services.security import server_credentials

    with pytest.raises(InvalidInputError, match="missing.pem") as info:
        server_credentials(TlsConfig(cert_file=tmp_path / "missing.pem", key_file=tmp_path / "missing.key"))
    assert info.value.field == "tls.cert_file"


def test_report_dict_is_json_ready() -> None:
    from meg.convert import channel_to_dict

    plan = make_plan("step:1", steps=2, codec_chain="fp16,zstd:3").to_dict()
    channel = channel_to_dict(channel_from_link_config(LinkConfig(mode="analog", snr_db=2.2)))
    assert json.loads(json.dumps({"plan": plan, "channel": channel}))["plan"]["split"] == "step:1"
    assert channel["mode"] == "analog"


def test_public_surface_resolves() -> None:
    import meg.services as services

    assert sorted(services.__all__) == sorted(services._WHERE)
    for name in services.__all__:
        assert getattr(services, name).__name__ == name
