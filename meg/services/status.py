"""The one boundary where MEG exceptions become gRPC status codes, and back.

Domain code raises `meg.errors` exceptions. The servicers catch them here and answer with
a status code and a message that names the bad value (and the field it came from); the
device client turns a failed RPC back into one exception of the same tree, so callers
handle one exception type whatever the transport did.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from meg.errors import (
    AuthenticationError,
    CancelledByClient,
    ChannelError,
    CorruptPayloadError,
    DeadlineExceededError,
    InvalidInputError,
    MegError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "FIELD_METADATA_KEY",
    "REPLICA_METADATA_KEY",
    "RETRY_AFTER_METADATA_KEY",
    "error_from_rpc",
    "error_message",
    "error_proto",
    "grpc_code_for",
    "proto_code_for",
]

# Trailing-metadata key carrying the request/header field at fault.
FIELD_METADATA_KEY = "meg-field"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED answer from a full edge: when to try again (ms)."""
REPLICA_METADATA_KEY = "meg-replica"
"""Initial metadata naming the edge replica that answers a call."""

# Most specific first: CorruptPayloadError is an InvalidInputError, but it is DATA_LOSS.
_MAPPING: tuple[tuple[type[MegError], grpc.StatusCode, Any], ...] = (
    (CorruptPayloadError, grpc.StatusCode.DATA_LOSS, gen_pb.ERROR_CODE_DATA_LOSS),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT, gen_pb.ERROR_CODE_INVALID_ARGUMENT),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, gen_pb.ERROR_CODE_RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED, gen_pb.ERROR_CODE_DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE, gen_pb.ERROR_CODE_UNAVAILABLE),
    (ChannelError, grpc.StatusCode.UNAVAILABLE, gen_pb.ERROR_CODE_UNAVAILABLE),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED, gen_pb.ERROR_CODE_UNAUTHENTICATED),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND, gen_pb.ERROR_CODE_NOT_FOUND),
    (CancelledByClient, grpc.StatusCode.CANCELLED, gen_pb.ERROR_CODE_CANCELLED),
)

# Client side: status code -> exception class (the first entry per code wins).
_FROM_CODE: dict[grpc.StatusCode, type[MegError]] = {
    grpc.StatusCode.DATA_LOSS: CorruptPayloadError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
}


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    """Status code for an exception raised while serving a request.

    Anything that is not a `MegError` is a bug on the server's side: INTERNAL.
    """
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    for cls, code, _ in _MAPPING:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def proto_code_for(exc: BaseException) -> Any:
    """`meg.v1.ErrorCode` value for an exception (the in-stream `Error` message)."""
    if isinstance(exc, asyncio.CancelledError):
        return gen_pb.ERROR_CODE_CANCELLED
    for cls, _, proto_code in _MAPPING:
        if isinstance(exc, cls):
            return proto_code
    return gen_pb.ERROR_CODE_INTERNAL


def error_message(exc: BaseException) -> str:
    """Message sent to the peer: the exception's own text, prefixed by its field if any.

    Internal errors are not described beyond their type, so that server internals do not
    leak to clients; the server logs the full traceback.
    """
    if isinstance(exc, MegError):
        return f"{exc.field}: {exc.message}" if exc.field else exc.message
    return f"internal error ({type(exc).__name__})"


def error_proto(exc: BaseException) -> gen_pb.Error:
    """The in-stream `meg.v1.Error` for an exception."""
    field = exc.field if isinstance(exc, MegError) and exc.field else ""
    return gen_pb.Error(code=proto_code_for(exc), message=error_message(exc), field=field)


def error_from_rpc(err: grpc.RpcError) -> MegError:
    """Translate a failed RPC into the `meg.errors` exception for its status code.

    Codes without a domain meaning (CANCELLED, UNKNOWN, INTERNAL, ...) become
    `UnavailableError`: from the caller's side the peer did not deliver.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    field = None
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == FIELD_METADATA_KEY:
            field = value if isinstance(value, str) else value.decode()
    cls = _FROM_CODE.get(code, UnavailableError)
    return cls(f"{code.name}: {details}", field=field)
