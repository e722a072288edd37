"""Shared gRPC plumbing: message-size options, server construction, health, reflection.

gRPC's default 4 MiB receive limit is set explicitly on both sides (chunks are at most
1 MiB, so 8 MiB leaves room for headers); a larger message is refused with
RESOURCE_EXHAUSTED by gRPC itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meg.errors import UnavailableError
from meg.services.security import BearerTokenInterceptor, TlsConfig, server_credentials

__all__ = ["bind_server", "channel_options", "enable_health_and_reflection", "message_options", "set_serving"]


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Send and receive limits for a server or channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int, *, reconnect_backoff_ms: int = 200) -> list[tuple[str, int]]:
    """Client channel options: message limits and a short reconnect back-off, so that a
    restarted edge is used again within a fraction of a second."""
    return [
        *message_options(max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms),
        ("grpc.max_reconnect_backoff_ms", 5 * reconnect_backoff_ms),
    ]


def bind_server(
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    token: str | None = None,
    tls: TlsConfig | None = None,
    interceptors: Sequence[aio.ServerInterceptor] = (),
) -> tuple[aio.Server, int]:
    """An aio server (not started) bound to `host:port` (0 picks a free port)."""
    chain = list(interceptors)
    if token:
        chain.insert(0, BearerTokenInterceptor(token))
    server = aio.server(interceptors=chain, options=message_options(max_message_bytes))
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, server_credentials(tls))
        if tls is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise UnavailableError(f"cannot bind {address!r} (in use or not a local address)", field="port")
    return server, bound


def enable_health_and_reflection(
    server: aio.Server, service_names: Sequence[str], *, reflect: bool = True
) -> health.aio.HealthServicer:
    """Add the standard health service (every name starts NOT_SERVING) and reflection."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if reflect:
        reflection.enable_server_reflection((*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, names: Sequence[str], serving: bool) -> None:
    """Mark the overall server ("") and each service SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *names):
        await servicer.set(name, status)


