"""Wire framing: an :class:`EncodedTensor` ⇄ ``meg.v1.TensorHeader`` + ``TensorChunk``s.

The sender splits the encoded payload into chunks of at most 1 MiB (every chunk but the
last exactly ``chunk_size_bytes``) and announces dtype, shape, codec chain, byte counts,
chunk count and the CRC32C (Castagnoli) of the payload in the header. The receiver checks
every header field against :class:`FramingLimits` and against what the codec chain can
produce for that dtype and shape *before* it accepts any data, then accepts chunks strictly
in order (gRPC streams preserve order, so any reordering is an error), and verifies the
checksum when the last chunk is in. Memory in use grows only with bytes actually received
(a large payload's buffer is reserved at its first chunk; its pages are touched as data arrives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import crc32c
import torch

from meg.codecs.chain import EncodedTensor, parse_chain
from meg.codecs.raw import SUPPORTED_DTYPES, numel
from meg.errors import CodecError, CorruptPayloadError, FramingError, ResourceExhaustedError
from meg.v1 import tensor_pb2

__all__ = [
    "MAX_CHUNK_BYTES",
    "ChunkLike",
    "FramingLimits",
    "TensorAssembler",
    "assemble",
    "dtype_from_proto",
    "dtype_to_proto",
    "frame_tensor",
]

MAX_CHUNK_BYTES = 1 << 20

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_PROTO = {v: k for k, v in _DTYPES.items()}
assert set(_DTYPES) == set(SUPPORTED_DTYPES)


class ChunkLike(Protocol):
    """A received chunk: ``meg.v1.TensorChunk`` or a zero-copy view with the same attributes
    (``meg.services.wire.ChunkView``, whose ``data`` is a ``memoryview``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def tensor_id(self) -> int: ...
    @property
    def sequence(self) -> int: ...
    @property
    def last(self) -> bool: ...
    @property
    def data(self) -> bytes | memoryview: ...


@dataclass(frozen=True)
class FramingLimits:
    """What a receiver accepts from one header.

    Attributes:
        max_elements: largest element count of a decoded tensor.
        max_encoded_bytes: largest encoded payload.
        max_params_bytes: largest codec side information.
        max_rank: largest number of dimensions.
    """

    max_elements: int = 1 << 28
    max_encoded_bytes: int = 1 << 30
    max_params_bytes: int = 1 << 24
    max_rank: int = 8


def dtype_to_proto(dtype: torch.dtype) -> int:
    """torch dtype → ``meg.v1.Dtype`` value. Raises FramingError for an unsupported dtype."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise FramingError(f"dtype {dtype} cannot be framed", field="dtype") from None


def dtype_from_proto(value: int) -> torch.dtype:
    """``meg.v1.Dtype`` value → torch dtype. Raises FramingError for UNSPECIFIED/unknown."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise FramingError(f"dtype enum value {value} is not a supported tensor dtype", field="dtype") from None


def _chunk_count(encoded_bytes: int, chunk_size_bytes: int) -> int:
    """At least one chunk, so that an empty payload still carries its `last` flag."""
    return max(1, -(-encoded_bytes // chunk_size_bytes))


def frame_tensor(
    encoded: EncodedTensor,
    *,
    request_id: str,
    tensor_id: int,
    name: str,
    chunk_size_bytes: int = MAX_CHUNK_BYTES,
) -> tuple[tensor_pb2.TensorHeader, list[tensor_pb2.TensorChunk]]:
    """Header and chunks for one encoded tensor.

    Args:
        encoded: from :func:`meg.codecs.encode`.
        request_id, tensor_id, name: identify the tensor in its stream.
        chunk_size_bytes: 1 … 1 MiB.
    Raises:
        FramingError: a chunk size out of range or an unsupported dtype.
    """
    if not 1 <= chunk_size_bytes <= MAX_CHUNK_BYTES:
        raise FramingError(
            f"chunk_size_bytes {chunk_size_bytes} outside 1..{MAX_CHUNK_BYTES}", field="chunk_size_bytes"
        )
    payload = encoded.payload
    count = _chunk_count(len(payload), chunk_size_bytes)
    header = tensor_pb2.TensorHeader(
        request_id=request_id,
        tensor_id=tensor_id,
        name=name,
        dtype=dtype_to_proto(encoded.dtype),  # type: ignore[arg-type]
        shape=list(encoded.shape),
        codec_chain=encoded.chain,
        raw_bytes=numel(encoded.shape) * torch.empty(0, dtype=encoded.dtype).element_size(),
        encoded_bytes=len(payload),
        chunk_count=count,
        crc32c=crc32c.crc32c(payload),
        codec_params=encoded.params,
        chunk_size_bytes=chunk_size_bytes,
    )
    view = memoryview(payload)
    chunks = [
        tensor_pb2.TensorChunk(
            request_id=request_id,
            tensor_id=tensor_id,
            sequence=i,
            last=i == count - 1,
            data=bytes(view[i * chunk_size_bytes : (i + 1) * chunk_size_bytes]),
        )
        for i in range(count)
    ]
    return header, chunks


class TensorAssembler:
    """Receives one tensor: validates its header, then its chunks, then the checksum.

    Args:
        header: the announced tensor.
        limits: what this receiver accepts.
    Raises:
        FramingError: an inconsistent or malformed header field (named in ``field``).
        ResourceExhaustedError: a header within the format but beyond ``limits``.
    """

    def __init__(self, header: tensor_pb2.TensorHeader, limits: FramingLimits = FramingLimits()) -> None:
        self.header = header
        self.limits = limits
        self.dtype = dtype_from_proto(header.dtype)
        self.shape = self._check_shape(header)
        self._check_sizes(header)
        # chunks are kept as received and joined once: one copy of the payload
        self._chunks: list[bytes | memoryview] = []
        self._received_bytes = 0
        self._crc = 0
        self._next = 0

    def _check_shape(self, header: tensor_pb2.TensorHeader) -> tuple[int, ...]:
        shape = tuple(int(d) for d in header.shape)
        if len(shape) > self.limits.max_rank:
            raise FramingError(f"rank {len(shape)} exceeds {self.limits.max_rank}", field="shape")
        if any(d < 0 for d in shape):
            raise FramingError(f"shape {shape} has a negative dimension", field="shape")
        elements = numel(shape)
        if elements > self.limits.max_elements:
            raise ResourceExhaustedError(
                f"shape {shape} has {elements} elements, limit {self.limits.max_elements}", field="shape"
            )
        return shape

    def _check_sizes(self, header: tensor_pb2.TensorHeader) -> None:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        raw = numel(self.shape) * itemsize
        if header.raw_bytes != raw:
            raise FramingError(
                f"raw_bytes {header.raw_bytes} != {raw} for {self.dtype} {self.shape}", field="raw_bytes"
            )
        if header.encoded_bytes > self.limits.max_encoded_bytes:
            raise ResourceExhaustedError(
                f"encoded_bytes {header.encoded_bytes} exceeds {self.limits.max_encoded_bytes}", field="encoded_bytes"
            )
        if len(header.codec_params) > self.limits.max_params_bytes:
            raise ResourceExhaustedError(
                f"codec_params of {len(header.codec_params)} bytes exceeds {self.limits.max_params_bytes}",
                field="codec_params",
            )
        try:
            bound = parse_chain(header.codec_chain).max_payload_bytes(self.dtype, self.shape)
        except CodecError as exc:
            raise FramingError(f"codec_chain {header.codec_chain!r}: {exc.message}", field="codec_chain") from exc
        if header.encoded_bytes > bound:
            raise FramingError(
                f"encoded_bytes {header.encoded_bytes} exceeds the {bound} bytes that chain "
                f"{header.codec_chain!r} can produce for {self.dtype} {self.shape}",
                field="encoded_bytes",
            )
        if not 1 <= header.chunk_size_bytes <= MAX_CHUNK_BYTES:
            raise FramingError(
                f"chunk_size_bytes {header.chunk_size_bytes} outside 1..{MAX_CHUNK_BYTES}", field="chunk_size_bytes"
            )
        expected = _chunk_count(header.encoded_bytes, header.chunk_size_bytes)
        if header.chunk_count != expected:
            raise FramingError(
                f"chunk_count {header.chunk_count} != {expected} for {header.encoded_bytes} bytes "
                f"in chunks of {header.chunk_size_bytes}",
                field="chunk_count",
            )

    @property
    def complete(self) -> bool:
        return self._next == self.header.chunk_count

    def add(self, chunk: tensor_pb2.TensorChunk | ChunkLike) -> bool:
        """Accept the next chunk; True once the last one is in.

        ``chunk`` is a ``TensorChunk`` or anything with its attributes (a zero-copy view
        whose ``data`` is a ``memoryview``: it is kept, not copied, until :meth:`result`).

        Raises:
            FramingError: wrong request/tensor id, a duplicate, a gap, a chunk after the
                last, a wrong `last` flag or a chunk shorter/longer than its position needs.
            ResourceExhaustedError: a chunk larger than the announced chunk size.
        """
        header = self.header
        if chunk.request_id != header.request_id:
            raise FramingError(
                f"chunk request_id {chunk.request_id!r} != header {header.request_id!r}", field="request_id"
            )
        if chunk.tensor_id != header.tensor_id:
            raise FramingError(f"chunk tensor_id {chunk.tensor_id} != header {header.tensor_id}", field="tensor_id")
        if self.complete:
            raise FramingError(
                f"chunk sequence {chunk.sequence} after the last of {header.chunk_count} chunks", field="sequence"
            )
        if chunk.sequence < self._next:
            raise FramingError(f"duplicate chunk sequence {chunk.sequence}", field="sequence")
        if chunk.sequence > self._next:
            raise FramingError(
                f"chunk sequence {chunk.sequence} arrived while {self._next} is missing", field="sequence"
            )
        data = chunk.data  # the protobuf accessor copies: read it once (a view's data is not copied)
        size = len(data)
        if size > header.chunk_size_bytes:
            raise ResourceExhaustedError(
                f"chunk {chunk.sequence} is {size} bytes, chunk size is {header.chunk_size_bytes}", field="data"
            )
        is_last = chunk.sequence == header.chunk_count - 1
        if chunk.last != is_last:
            raise FramingError(
                f"chunk {chunk.sequence} has last={chunk.last}, expected {is_last} of {header.chunk_count} chunks",
                field="last",
            )
        expected = header.encoded_bytes - self._received_bytes if is_last else header.chunk_size_bytes
        if size != expected:
            raise FramingError(f"chunk {chunk.sequence} is {size} bytes, expected {expected}", field="data")
        start = self._received_bytes
        if start + size > header.encoded_bytes:  # implied by the checks above; the copy relies on it
            raise FramingError(f"chunk {chunk.sequence} overruns encoded_bytes {header.encoded_bytes}", field="data")
        self._chunks.append(data)
        self._received_bytes += size
        self._crc = crc32c.crc32c(data, value=self._crc)
        self._next += 1
        return self.complete

    def result(self) -> EncodedTensor:
        """The received tensor, once complete and its checksum verified.

        Raises:
            FramingError: chunks are still missing.
            CorruptPayloadError: the CRC32C does not match.
        """
        header = self.header
        if not self.complete:
            raise FramingError(
                f"tensor {header.tensor_id} incomplete: {self._next} of {header.chunk_count} chunks received",
                field="chunk_count",
            )
        if self._crc != header.crc32c:
            raise CorruptPayloadError(
                f"CRC32C {self._crc:#010x} of the payload != header {header.crc32c:#010x}", field="crc32c"
            )
        return EncodedTensor(
            chain=parse_chain(header.codec_chain).spec,
            dtype=self.dtype,
            shape=self.shape,
            payload=b"".join(self._chunks),
            params=bytes(header.codec_params),
        )


def assemble(
    header: tensor_pb2.TensorHeader,
    chunks: Iterable[tensor_pb2.TensorChunk | ChunkLike],
    limits: FramingLimits = FramingLimits(),
) -> EncodedTensor:
    """Feed every chunk to a :class:`TensorAssembler` and return its result.

    Raises:
        FramingError: also for chunks left over after the last one.
    """
    assembler = TensorAssembler(header, limits)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.result()
