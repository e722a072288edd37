"""TLS and mutual TLS refuse every peer they should: wrong CA, expired certificates, the
wrong host name, no client certificate; the good peer is served (standard health RPC)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services_certs import write_bad_certs, write_test_certs

from meg.services.background import ServiceLoop, start_policy
from meg.services.policy_server import PolicyServerConfig
from meg.services.security import TlsConfig, channel_credentials


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    good = write_test_certs(folder)
    return {**good, **write_bad_certs(folder, good)}


@pytest.fixture(scope="module")
def loop() -> Iterator[ServiceLoop]:
    service_loop = ServiceLoop()
    yield service_loop
    service_loop.close()


def _check(address: str, tls: TlsConfig, *, server_name: str | None = None) -> grpc.StatusCode:
    options: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with grpc.secure_channel(address.replace("127.0.0.1", "localhost"), channel_credentials(tls), options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _serve(loop: ServiceLoop, cert: Path, key: Path, ca: Path | None = None) -> Any:
    return start_policy(PolicyServerConfig(port=0, tls=TlsConfig(cert_file=cert, key_file=key, ca_file=ca)), loop=loop)


def test_server_tls_refuses_a_client_trusting_another_ca_and_serves_the_right_one(certs: dict[str, Path],
                                                                                  loop: ServiceLoop) -> None:
    server = _serve(loop, certs["server_cert"], certs["server_key"])
    try:
        assert _check(server.address, TlsConfig(ca_file=certs["ca"])) == grpc.StatusCode.OK
        assert _check(server.address, TlsConfig(ca_file=certs["other_ca"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_an_expired_server_certificate_is_refused(certs: dict[str, Path], loop: ServiceLoop) -> None:
    server = _serve(loop, certs["expired_cert"], certs["expired_key"])
    try:
        assert _check(server.address, TlsConfig(ca_file=certs["ca"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_a_certificate_for_another_host_name_is_refused(certs: dict[str, Path], loop: ServiceLoop) -> None:
    server = _serve(loop, certs["wrong_host_cert"], certs["wrong_host_key"])
    try:
        assert _check(server.address, TlsConfig(ca_file=certs["ca"])) == grpc.StatusCode.UNAVAILABLE
        # the name it was issued for is accepted (so the refusal above is the host name's)
        assert _check(server.address, TlsConfig(ca_file=certs["ca"]), server_name="edge.example") == grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_mutual_tls_refuses_missing_expired_and_foreign_client_certificates(certs: dict[str, Path], loop: ServiceLoop) -> None:
    server = _serve(loop, certs["server_cert"], certs["server_key"], ca=certs["ca"])
    try:
        good = TlsConfig(ca_file=certs["ca"], cert_file=certs["client_cert"], key_file=certs["client_key"])
        assert _check(server.address, good) == grpc.StatusCode.OK
        assert _check(server.address, TlsConfig(ca_file=certs["ca"])) == grpc.StatusCode.UNAVAILABLE  # no certificate
        expired = TlsConfig(ca_file=certs["ca"], cert_file=certs["expired_client_cert"], key_file=certs["expired_client_key"])
        assert _check(server.address, expired) == grpc.StatusCode.UNAVAILABLE
        foreign = TlsConfig(ca_file=certs["ca"], cert_file=certs["foreign_client_cert"], key_file=certs["foreign_client_key"])
        assert _check(server.address, foreign) == grpc.StatusCode.UNAVAILABLE  # issued by another CA
    finally:
        server.stop(0)
