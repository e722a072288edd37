"""Zero-copy receive path for `TensorChunk` answers of `EdgeService.Generate`.

Most bytes the device receives are tensor chunks (1 MiB each). Parsing them with
protobuf copies the payload twice more than needed (into the parser's arena, then out
through the ``data`` accessor). :func:`decode_generate_response` reads a serialized
``GenerateResponse`` that is exactly one ``tensor_chunk`` with a strict, minimal reader of
the protobuf wire format and returns a :class:`ChunkView` whose ``data`` is a
``memoryview`` slice of the received bytes: no copy. Anything else (plans, progress,
headers, reports, errors) and anything the reader is not certain about (unknown or
repeated outer fields, unknown inner fields, a wrong wire type, over-long varints,
values out of range, invalid UTF-8, truncation) goes through ``GenerateResponse.FromString``
instead, so bytes that protobuf rejects are rejected with protobuf's own ``DecodeError``,
and bytes it accepts give the same values either way.

:func:`generate_call` builds the ``Generate`` stream callable with this deserializer; the
device client and ``meg bench grpc`` use it.

:func:`tune_malloc` keeps glibc from handing the memory of freed ~1 MiB message buffers
back to the kernel after every message: otherwise each new buffer is faulted in page by
page again, which on a virtual machine costs more than the copies. The device client and
the edge server apply it to their processes (no environment variables needed).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from meg.errors import FramingError
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import tensor_pb2

__all__ = [
    "GENERATE_METHOD",
    "ChunkView",
    "MallocTuning",
    "decode_generate_response",
    "generate_call",
    "parse_chunk_view",
    "tune_malloc",
]

GENERATE_METHOD = "/meg.v1.EdgeService/Generate"

# GenerateResponse.tensor_chunk = 4, length-delimited
_OUTER_TAG = (4 << 3) | 2
# TensorChunk: request_id = 1 (LEN), tensor_id = 2, sequence = 3, last = 4 (VARINT), data = 5 (LEN)
_TAG_REQUEST_ID = (1 << 3) | 2
_TAG_TENSOR_ID = (2 << 3) | 0
_TAG_SEQUENCE = (3 << 3) | 0
_TAG_LAST = (4 << 3) | 0
_TAG_DATA = (5 << 3) | 2
_UINT32_LIMIT = 1 << 32
_MAX_LENGTH_VARINT_BYTES = 5  # lengths below 2**31 fit; longer encodings go to protobuf
_MAX_VARINT_BYTES = 10
_EMPTY = memoryview(b"")


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received ``TensorChunk`` whose ``data`` points into the received message.

    Same attribute names as ``meg.v1.TensorChunk``, so :class:`meg.codecs.framing.TensorAssembler`
    accepts either. ``data`` is a read-only 1-D ``memoryview`` of bytes (``len(data)`` bytes);
    it keeps the whole received message alive while it is referenced.
    """

    request_id: str
    tensor_id: int
    sequence: int
    last: bool
    data: memoryview

    def to_proto(self) -> tensor_pb2.TensorChunk:
        """The equivalent protobuf message (copies ``data``)."""
        return tensor_pb2.TensorChunk(request_id=self.request_id, tensor_id=self.tensor_id,
                                      sequence=self.sequence, last=self.last, data=bytes(self.data))

    def to_response(self) -> edge_pb.GenerateResponse:
        """The ``GenerateResponse`` this view was read from, as protobuf parses it (copies ``data``)."""
        return edge_pb.GenerateResponse(tensor_chunk=self.to_proto())


def _varint(raw: bytes, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    """Decode a varint of at most ``max_bytes`` bytes at ``raw[pos:end]``.

    Returns (value, next position), or (-1, pos) when it runs past ``end`` or is longer.
    The value is not truncated: callers reject what is out of their range.
    """
    value = 0
    shift = 0
    limit = min(end, pos + max_bytes)
    while pos < limit:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def parse_chunk_view(raw: bytes) -> ChunkView | None:
    """A :class:`ChunkView` when ``raw`` is a ``GenerateResponse`` holding exactly one
    ``tensor_chunk`` in a form this reader is sure of; None otherwise (parse with protobuf).

    Args:
        raw: one serialized ``GenerateResponse`` (``bytes``; never modified).
    """
    end = len(raw)
    # the outer message: field 4 once, spanning the rest of the bytes, and nothing else
    if end < 2 or raw[0] != _OUTER_TAG:
        return None
    length, pos = _varint(raw, 1, end, _MAX_LENGTH_VARINT_BYTES)
    if length < 0 or pos + length != end:
        return None
    request_id = ""
    data = (0, -1)
    tensor_id = sequence = last = 0
    while pos < end:
        tag = raw[pos]  # every known tag is one byte; longer tags go to protobuf
        pos += 1
        if tag in (_TAG_REQUEST_ID, _TAG_DATA):
            length, pos = _varint(raw, pos, end, _MAX_LENGTH_VARINT_BYTES)
            if length < 0 or pos + length > end:
                return None
            if tag == _TAG_DATA:
                data = (pos, pos + length)  # proto3: the last occurrence wins
            else:
                try:  # protobuf checks every occurrence, not only the one it keeps
                    request_id = raw[pos:pos + length].decode("utf-8")
                except UnicodeDecodeError:
                    return None  # protobuf rejects it: let it say so
            pos += length
        elif tag in (_TAG_TENSOR_ID, _TAG_SEQUENCE, _TAG_LAST):
            value, pos = _varint(raw, pos, end, _MAX_VARINT_BYTES)
            if value < 0 or value >= (2 if tag == _TAG_LAST else _UINT32_LIMIT):
                return None
            if tag == _TAG_TENSOR_ID:
                tensor_id = value
            elif tag == _TAG_SEQUENCE:
                sequence = value
            else:
                last = value
        else:
            return None  # unknown field, wrong wire type or a multi-byte tag
    view = memoryview(raw)[data[0]:data[1]] if data[1] >= 0 else _EMPTY
    return ChunkView(request_id=request_id, tensor_id=tensor_id, sequence=sequence, last=bool(last), data=view)


def decode_generate_response(raw: bytes) -> ChunkView | edge_pb.GenerateResponse:
    """gRPC response deserializer for ``Generate``: a :class:`ChunkView` for a tensor chunk,
    otherwise the protobuf-parsed ``GenerateResponse``.

    Raises:
        FramingError: bytes protobuf cannot parse as a ``GenerateResponse`` (gRPC turns a
            raising deserializer into an INTERNAL status on the call).
    """
    view = parse_chunk_view(raw)
    if view is not None:
        return view
    try:
        return edge_pb.GenerateResponse.FromString(raw)
    except DecodeError:
        raise FramingError(f"malformed GenerateResponse from the edge ({len(raw)} bytes)", field="response") from None


def generate_call(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """``EdgeService.Generate`` on ``channel`` with the zero-copy chunk deserializer.

    Answers are :class:`ChunkView` (tensor chunks) or ``GenerateResponse`` (all else).
    """
    return channel.stream_stream(
        GENERATE_METHOD,
        request_serializer=edge_pb.GenerateRequest.SerializeToString,
        response_deserializer=decode_generate_response,
    )


@dataclass(frozen=True)
class MallocTuning:
    """glibc ``malloc`` settings for a process that streams 1 MiB messages.

    Attributes:
        trim_threshold_bytes: free memory at the top of a heap that is kept for reuse instead
            of being returned to the kernel (glibc's default adapts up to 2 × the largest
            freed block, so the heap of a 64 MiB stream of 1 MiB messages shrinks and
            grows again for every tensor).
        mmap_threshold_bytes: allocations of at least this size get their own mapping, which
            is returned to the kernel when freed (whole tensors); smaller ones (messages)
            come from the heap and are reused.
    """

    trim_threshold_bytes: int = 128 << 20
    mmap_threshold_bytes: int = 4 << 20


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned: MallocTuning | None = None


def tune_malloc(tuning: MallocTuning = MallocTuning()) -> bool:
    """Apply ``tuning`` to this process's glibc allocator (once; later calls do nothing).

    Returns True when the settings are in effect (on glibc), False elsewhere.
    """
    global _tuned
    if _tuned is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = (mallopt(_M_TRIM_THRESHOLD, tuning.trim_threshold_bytes) == 1
               and mallopt(_M_MMAP_THRESHOLD, tuning.mmap_threshold_bytes) == 1)
    if applied:
        _tuned = tuning
    return applied
