"""Shared gRPC plumbing: message-size options, server construction, health, reflection.

gRPC's default 4 MiB receive limit is set explicitly on both sides (chunks are at most
1 MiB, so 8 MiB leaves room for headers); a larger message is refused with
RESOURCE_EXHAUSTED by gRPC itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from collections.abc import Sequence
from typing import Any

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meg.errors import InvalidInputError, UnavailableError
from meg.services.security import BearerTokenInterceptor, TlsConfig, server_credentials

__all__ = [
    "BoundServer",
    "bind_server",
    "channel_options",
    "enable_health_and_reflection",
    "message_options",
    "set_serving",
    "stop_signal",
]


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


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_server(
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    token: str | None = None,
    tls: TlsConfig | None = None,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    insecure: bool = False,
) -> tuple[aio.Server, int]:
    """An aio server (not started) bound to `host:port` (0 picks a free port).

    A non-loopback `host` needs TLS or a token unless `insecure` says the caller means it
    (`InvalidInputError` naming the host otherwise): an open edge on a network serves anyone.
    """
    if not (tls is not None or token or insecure or is_loopback(host)):
        raise InvalidInputError(
            f"refusing to serve on {host!r} without TLS or a token: anyone who can reach it could use it; "
            "pass --tls-cert/--tls-key or --token (or $MEG_AUTH_TOKEN), or --insecure to serve openly anyway",
            field="host",
        )
    chain = list(interceptors)
    if token:
        chain.insert(0, BearerTokenInterceptor(token))
    server = aio.server(interceptors=chain, options=message_options(max_message_bytes))
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6 literal
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




class BoundServer:
    """A gRPC server bound to a port with its health service and, when
    `config.metrics_port` is set, a Prometheus endpoint; the edge and policy servers add
    what they serve. `config` needs `host`, `metrics_port` and `grace_s`; `servicer`
    needs `metrics` (a `ServiceMetrics`)."""

    service_name: str
    """Full name of the served gRPC service, as the health service reports it."""

    def __init__(self, server: aio.Server, port: int, config: Any, servicer: Any, health: Any) -> None:
        self.grpc_server = server
        self.port = port
        self.config = config
        self.servicer = servicer
        self.health = health
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def _open(self) -> None:
        """Start accepting calls and, if asked for, serving /metrics."""
        await self.grpc_server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.servicer.metrics.serve_http(self.config.metrics_port, self.config.host)

    async def _close(self, grace_s: float | None) -> None:
        """Health NOT_SERVING, then let in-flight calls finish within `grace_s`
        (default `config.grace_s`) and close."""
        await set_serving(self.health, [self.service_name], False)
        await self.grpc_server.stop(self.config.grace_s if grace_s is None else grace_s)


def stop_signal() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM (handlers installed on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
