"""Exceptions raised by MEG.

Domain code raises these; only the service boundary (`meg.services.status`) maps them to
gRPC status codes. Every exception names the bad value in its message and, where it
comes from one request field or header field, in ``field``.

    MegError
    ├── InvalidInputError (ValueError)      → INVALID_ARGUMENT
    │   ├── CodecError                      malformed codec chain, parameters or payload
    │   │   └── CorruptPayloadError         → DATA_LOSS: checksum or structure mismatch
    │   ├── FramingError                    bad header, chunk order, duplicates, gaps
    │   ├── NonFiniteError                  NaN/Inf where finite values are required
    │   └── SplitError                      unknown or impossible split point
    ├── ResourceExhaustedError              → RESOURCE_EXHAUSTED: oversized, queue full
    ├── DeadlineExceededError               → DEADLINE_EXCEEDED
    ├── UnavailableError                    → UNAVAILABLE: peer gone, no provider
    ├── AuthenticationError                 → UNAUTHENTICATED
    ├── ModelNotFoundError (FileNotFoundError) → NOT_FOUND
    ├── ChannelError                        → UNAVAILABLE: packet lost after all retries
    └── CancelledByClient                   → CANCELLED: the client sent `Cancel`

Only `meg.services.status` translates between these and gRPC status codes, both ways
(server: exception → status; client: failed RPC → exception). The command line maps them
to exit codes in one handler (`meg.cli`).
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CancelledByClient",
    "ChannelError",
    "CodecError",
    "CorruptPayloadError",
    "DeadlineExceededError",
    "FramingError",
    "InvalidInputError",
    "MegError",
    "ModelNotFoundError",
    "NonFiniteError",
    "ResourceExhaustedError",
    "SplitError",
    "UnavailableError",
]


class MegError(Exception):
    """Base of every exception MEG raises on purpose.

    Args:
        message: what is wrong, naming the bad value.
        field: the request/header field the bad value came from, if any.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInputError(MegError, ValueError):
    """A caller-supplied value is malformed or out of range."""


class CodecError(InvalidInputError):
    """A codec chain, its parameters or its payload cannot be used."""


class CorruptPayloadError(CodecError):
    """Bytes failed their checksum or do not have the structure the header promises."""


class FramingError(InvalidInputError):
    """A tensor header or chunk sequence violates the framing contract."""


class NonFiniteError(InvalidInputError):
    """A tensor holds NaN or infinite values where finite values are required."""


class SplitError(InvalidInputError):
    """A split point is unknown or does not exist in this pipeline."""


class ResourceExhaustedError(MegError):
    """A size or capacity limit would be exceeded (message size, queue, element count).

    A full queue sets `retry_after_s`, which the services send as trailing metadata
    `retry-after-ms`.
    """

    retry_after_s: float | None = None


class DeadlineExceededError(MegError):
    """The request's deadline passed before the work could finish."""


class UnavailableError(MegError):
    """A peer, model or execution provider needed for the work is not available."""


class AuthenticationError(MegError):
    """The caller's credentials are missing or wrong."""


class ModelNotFoundError(MegError, FileNotFoundError):
    """A model name or folder does not exist locally (nothing is downloaded)."""


class ChannelError(MegError):
    """The emulated link failed to deliver data (e.g. a packet lost after all retries)."""


class CancelledByClient(MegError):
    """The client cancelled the request (the `Cancel` message on the request stream)."""
