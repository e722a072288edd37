"""Bearer-token authentication and TLS / mutual TLS credentials from certificate files.

The token check is a server interceptor: it compares the `authorization: Bearer ...`
metadata with the configured token in constant time (`hmac.compare_digest`) and rejects
the call with UNAUTHENTICATED before any servicer code runs. The standard health service
stays open, because load balancers and gRPC's client-side health checks carry no
per-call credentials.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from meg.errors import InvalidInputError

__all__ = [
    "TOKEN_ENV_VAR",
    "BearerTokenInterceptor",
    "TlsConfig",
    "channel_credentials",
    "resolve_token",
    "server_credentials",
    "token_metadata",
]

TOKEN_ENV_VAR = "MEG_AUTH_TOKEN"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def resolve_token(flag_value: str | None) -> str | None:
    """The auth token: the flag's value, else `$MEG_AUTH_TOKEN`, else None (auth off)."""
    token = flag_value or os.environ.get(TOKEN_ENV_VAR) or None
    if token is not None and (not token.isprintable() or " " in token):
        raise InvalidInputError("auth token must be printable and contain no spaces", field="token")
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` as a bearer token (empty when there is no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str, *, open_prefixes: Sequence[str] = _OPEN_PREFIXES) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open_prefixes = tuple(open_prefixes)

    def _authorised(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        # compare_digest takes time independent of where the strings differ
        return hmac.compare_digest(presented, self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(self._open_prefixes) or self._authorised(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny_like(handler)


def _deny_like(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that aborts UNAUTHENTICATED."""
    message = "missing or wrong bearer token in the 'authorization' metadata"

    async def deny(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files (PEM). On the server, `ca_file` turns on mutual TLS; on a client,
    `ca_file` is the root the server is checked against and `cert_file`/`key_file` are the
    client's own certificate for mutual TLS."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    server_name_override: str | None = None
    """Client only: host name the server certificate must carry, when it differs from the address."""


def _read(path: Path | None, field: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {field} {str(path)!r}: {exc.strerror}", field=field) from exc


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials; with `ca_file` set, clients must present a certificate it signed."""
    cert, key = _read(tls.cert_file, "tls.cert_file"), _read(tls.key_file, "tls.key_file")
    if cert is None or key is None:
        raise InvalidInputError("TLS on the server needs both cert_file and key_file", field="tls.cert_file")
    ca = _read(tls.ca_file, "tls.ca_file")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca_file`; present `cert_file`/`key_file` when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "tls.ca_file"),
        private_key=_read(tls.key_file, "tls.key_file"),
        certificate_chain=_read(tls.cert_file, "tls.cert_file"),
    )
