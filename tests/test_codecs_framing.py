"""Wire framing: header + chunks round-trip bit-exactly; every damage is detected."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meg.codecs import (
    MAX_CHUNK_BYTES,
    EncodedTensor,
    FramingLimits,
    TensorAssembler,
    assemble,
    decode,
    dtype_from_proto,
    dtype_to_proto,
    encode,
    frame_tensor,
)
from meg.codecs.raw import SUPPORTED_DTYPES, tensor_from_bytes, tensor_to_bytes
from meg.errors import (
    CodecError,
    CorruptPayloadError,
    FramingError,
    MegError,
    ResourceExhaustedError,
)
from meg.v1 import tensor_pb2

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw: st.DrawFn, max_rank: int = 4, max_dim: int = 5) -> torch.Tensor:
    """Any supported dtype and shape, every bit pattern (NaN payloads and infinities too)."""
    dtype = draw(st.sampled_from(SUPPORTED_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, max_dim), max_size=max_rank)))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    count = 1
    for d in shape:
        count *= d
    raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    return tensor_from_bytes(raw, dtype, shape)


def _frame(tensor: torch.Tensor, chain: str = "none", chunk: int = 7) -> tuple[tensor_pb2.TensorHeader, list]:
    encoded = encode(tensor, chain, nan_policy="keep")
    return frame_tensor(encoded, request_id="req-1", tensor_id=3, name="latents", chunk_size_bytes=chunk)


@SETTINGS
@given(tensor=tensors(), chunk=st.integers(1, 64))
def test_any_tensor_round_trips_bit_exactly(tensor: torch.Tensor, chunk: int) -> None:
    header, chunks = _frame(tensor, chunk=chunk)
    assert all(len(c.data) <= chunk for c in chunks)
    assert header.raw_bytes == len(tensor_to_bytes(tensor))
    # through the real wire format, not just the Python objects
    header = tensor_pb2.TensorHeader.FromString(header.SerializeToString())
    chunks = [tensor_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    out = decode(assemble(header, chunks))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)


@SETTINGS
@given(tensor=tensors(), chain=st.sampled_from(["zstd:1", "zstd:3:shuffle"]))
def test_lossless_chains_round_trip_through_frames(tensor: torch.Tensor, chain: str) -> None:
    header, chunks = _frame(tensor, chain=chain, chunk=16)
    out = decode(assemble(header, chunks))
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)


def test_rows_are_little_endian_row_major() -> None:
    tensor = torch.tensor([[1, 2], [3, 256]], dtype=torch.int16)
    header, chunks = _frame(tensor, chunk=MAX_CHUNK_BYTES)
    assert b"".join(c.data for c in chunks) == bytes([1, 0, 2, 0, 3, 0, 0, 1])
    assert list(header.shape) == [2, 2] and header.dtype == tensor_pb2.DTYPE_INT16


def test_dtype_enum_round_trip_and_unknown() -> None:
    for dtype in SUPPORTED_DTYPES:
        assert dtype_from_proto(dtype_to_proto(dtype)) == dtype
    with pytest.raises(FramingError, match="dtype enum value 0"):
        dtype_from_proto(tensor_pb2.DTYPE_UNSPECIFIED)
    with pytest.raises(FramingError, match="complex64"):
        dtype_to_proto(torch.complex64)


def test_chunks_are_at_most_one_mebibyte() -> None:
    tensor = torch.arange((3 << 20) // 4 + 5, dtype=torch.float32)
    header, chunks = frame_tensor(encode(tensor, "none"), request_id="r", tensor_id=0, name="x")
    assert header.chunk_size_bytes == MAX_CHUNK_BYTES == 1 << 20
    assert [len(c.data) for c in chunks] == [1 << 20] * 3 + [20]
    assert [c.last for c in chunks] == [False, False, False, True]
    with pytest.raises(FramingError, match="chunk_size_bytes 2097152"):
        frame_tensor(encode(tensor, "none"), request_id="r", tensor_id=0, name="x", chunk_size_bytes=2 << 20)


def _payload_tensor() -> torch.Tensor:
    return torch.arange(40, dtype=torch.float32).reshape(2, 4, 5)


@SETTINGS
@given(data=st.data())
def test_byte_corruption_is_detected(data: st.DataObject) -> None:
    header, chunks = _frame(_payload_tensor(), chunk=32)
    index = data.draw(st.integers(0, len(chunks) - 1))
    raw = bytearray(chunks[index].data)
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    chunks[index] = tensor_pb2.TensorChunk(
        request_id="req-1", tensor_id=3, sequence=index, last=chunks[index].last, data=bytes(raw)
    )
    with pytest.raises(CorruptPayloadError, match="CRC32C") as info:
        assemble(header, chunks)
    assert info.value.field == "crc32c"


@SETTINGS
@given(data=st.data())
def test_truncation_is_detected(data: st.DataObject) -> None:
    header, chunks = _frame(_payload_tensor(), chunk=32)
    keep = data.draw(st.integers(0, len(chunks) - 1))
    assembler = TensorAssembler(header)
    for chunk in chunks[:keep]:
        assert not assembler.add(chunk)
    with pytest.raises(FramingError, match=f"{keep} of {len(chunks)} chunks"):
        assembler.result()
    # a shortened chunk is rejected where it arrives
    cut = chunks[keep]
    short = tensor_pb2.TensorChunk(request_id="req-1", tensor_id=3, sequence=keep, last=cut.last, data=cut.data[:-1])
    with pytest.raises(FramingError, match=f"chunk {keep} is"):
        assembler.add(short)


@SETTINGS
@given(order=st.permutations(range(5)))
def test_reordering_duplicates_and_gaps_are_rejected(order: list[int]) -> None:
    header, chunks = _frame(_payload_tensor(), chunk=32)
    assert len(chunks) == 5
    shuffled = [chunks[i] for i in order]
    if order == sorted(order):
        assert decode(assemble(header, shuffled)).equal(_payload_tensor())
        return
    with pytest.raises(FramingError, match="sequence") as info:
        assemble(header, shuffled)
    assert info.value.field == "sequence"


def test_specific_chunk_errors() -> None:
    header, chunks = _frame(_payload_tensor(), chunk=32)
    a = TensorAssembler(header)
    a.add(chunks[0])
    with pytest.raises(FramingError, match="duplicate chunk sequence 0"):
        a.add(chunks[0])
    with pytest.raises(FramingError, match="chunk sequence 2 arrived while 1 is missing"):
        a.add(chunks[2])
    with pytest.raises(FramingError, match="request_id 'other'") as info:
        a.add(tensor_pb2.TensorChunk(request_id="other", tensor_id=3, sequence=1, data=chunks[1].data))
    assert info.value.field == "request_id"
    with pytest.raises(FramingError, match="tensor_id 4") as info:
        a.add(tensor_pb2.TensorChunk(request_id="req-1", tensor_id=4, sequence=1, data=chunks[1].data))
    assert info.value.field == "tensor_id"
    with pytest.raises(ResourceExhaustedError, match="33 bytes, chunk size is 32"):
        a.add(tensor_pb2.TensorChunk(request_id="req-1", tensor_id=3, sequence=1, data=bytes(33)))
    with pytest.raises(FramingError, match="last=True"):
        a.add(tensor_pb2.TensorChunk(request_id="req-1", tensor_id=3, sequence=1, last=True, data=chunks[1].data))
    for chunk in chunks[1:]:
        a.add(chunk)
    with pytest.raises(FramingError, match="after the last of 5 chunks"):
        a.add(chunks[-1])
    assert decode(a.result()).equal(_payload_tensor())


def _lie(header: tensor_pb2.TensorHeader, **fields: object) -> tensor_pb2.TensorHeader:
    lied = tensor_pb2.TensorHeader()
    lied.CopyFrom(header)
    for name, value in fields.items():
        if name == "shape":
            del lied.shape[:]
            lied.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(lied, name, value)
    return lied


@pytest.mark.parametrize(
    ("fields", "error", "field"),
    [
        ({"dtype": 0}, FramingError, "dtype"),
        ({"dtype": 42}, FramingError, "dtype"),
        ({"shape": [2, -4, 5]}, FramingError, "shape"),
        ({"shape": [1] * 9}, FramingError, "shape"),
        ({"shape": [1 << 20, 1 << 20]}, ResourceExhaustedError, "shape"),
        ({"raw_bytes": 161}, FramingError, "raw_bytes"),
        ({"shape": [2, 4, 6]}, FramingError, "raw_bytes"),
        ({"dtype": tensor_pb2.DTYPE_FLOAT16}, FramingError, "raw_bytes"),
        ({"encoded_bytes": 1 << 40}, ResourceExhaustedError, "encoded_bytes"),
        ({"encoded_bytes": 161, "chunk_count": 6}, FramingError, "encoded_bytes"),
        ({"chunk_count": 4}, FramingError, "chunk_count"),
        ({"chunk_count": 1 << 31}, FramingError, "chunk_count"),
        ({"chunk_size_bytes": 0}, FramingError, "chunk_size_bytes"),
        ({"chunk_size_bytes": (1 << 20) + 1}, FramingError, "chunk_size_bytes"),
        ({"codec_chain": "gzip"}, FramingError, "codec_chain"),
        ({"codec_chain": "merge:0.5"}, FramingError, "codec_chain"),
        ({"codec_params": bytes(1 << 10)}, ResourceExhaustedError, "codec_params"),
    ],
)
def test_lying_headers_are_rejected_before_any_chunk(fields: dict, error: type[MegError], field: str) -> None:
    header, _ = _frame(_payload_tensor(), chunk=32)
    limits = FramingLimits(max_params_bytes=512)
    with pytest.raises(error) as info:
        TensorAssembler(_lie(header, **fields), limits)
    assert info.value.field == field


def test_header_checks_need_no_allocation_of_the_claimed_size() -> None:
    # 2^28 float32 elements claimed with a 1 GiB raw size: accepted as a header (within
    # limits), yet nothing of that size exists until chunks arrive
    header = tensor_pb2.TensorHeader(
        request_id="r", tensor_id=0, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 14, 1 << 14],
        codec_chain="zstd", raw_bytes=1 << 30, encoded_bytes=10, chunk_count=1, chunk_size_bytes=1 << 20,
    )
    assembler = TensorAssembler(header)
    assert assembler._received_bytes == 0 and not assembler._chunks
    assembler.add(tensor_pb2.TensorChunk(request_id="r", tensor_id=0, sequence=0, last=True, data=bytes(10)))
    with pytest.raises(CorruptPayloadError):
        assembler.result()


@SETTINGS
@given(data=st.data())
def test_random_header_lies_never_crash(data: st.DataObject) -> None:
    """Any mix of lies ends in a meg exception or in a tensor with the header's own shape."""
    tensor = data.draw(tensors(max_rank=3, max_dim=4))
    chain = data.draw(st.sampled_from(["none", "zstd", "zstd:1:shuffle"]))
    header, chunks = frame_tensor(
        encode(tensor, chain, nan_policy="keep"), request_id="r", tensor_id=1, name="t", chunk_size_bytes=8
    )
    lies: dict[str, Any] = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.integers(0, 12),
                "shape": st.lists(st.integers(-2, 6), max_size=4),
                "raw_bytes": st.integers(0, 300),
                "encoded_bytes": st.integers(0, 300),
                "chunk_count": st.integers(0, 40),
                "crc32c": st.integers(0, (1 << 32) - 1),
                "chunk_size_bytes": st.integers(0, 16),
                "codec_chain": st.sampled_from(["none", "zstd", "zstd:1:shuffle", "int8", "merge:0.5", "x"]),
                "codec_params": st.binary(max_size=8),
            },
        )
    )
    try:
        out = decode(assemble(_lie(header, **lies), chunks))
    except (FramingError, CodecError, ResourceExhaustedError):
        return
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == tuple(lies.get("shape", header.shape))


def test_encoded_tensor_counts_its_bits() -> None:
    encoded = EncodedTensor(chain="none", dtype=torch.uint8, shape=(3,), payload=b"abc", params=b"p")
    assert encoded.bits_on_wire == 32
    with pytest.raises(MegError):
        decode(encoded)  # side information where the chain has none
