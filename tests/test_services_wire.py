"""The zero-copy chunk reader agrees with protobuf on every input."""

from __future__ import annotations

import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meg.codecs.chain import encode
from meg.codecs.framing import TensorAssembler, assemble, frame_tensor
from meg.errors import FramingError
from meg.services.wire import ChunkView, decode_generate_response, parse_chunk_view
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import tensor_pb2

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

uint32 = st.integers(0, (1 << 32) - 1)
chunks = st.builds(
    tensor_pb2.TensorChunk,
    request_id=st.text(max_size=12),
    tensor_id=uint32,
    sequence=uint32,
    last=st.booleans(),
    data=st.binary(max_size=300),
)
headers = st.builds(
    tensor_pb2.TensorHeader,
    request_id=st.text(max_size=8),
    tensor_id=uint32,
    name=st.text(max_size=8),
    shape=st.lists(st.integers(-(1 << 62), 1 << 62), max_size=4),
    codec_chain=st.text(max_size=8),
    encoded_bytes=st.integers(0, (1 << 64) - 1),
    chunk_count=uint32,
    codec_params=st.binary(max_size=16),
)
responses = st.one_of(
    chunks.map(lambda c: edge_pb.GenerateResponse(tensor_chunk=c)),
    headers.map(lambda h: edge_pb.GenerateResponse(tensor_header=h)),
    st.builds(gen_pb.Plan, steps=uint32, codec_chain=st.text(max_size=8),
              merge_ratio=st.floats(allow_nan=False)).map(lambda p: edge_pb.GenerateResponse(plan=p)),
    st.builds(gen_pb.Progress, stage=st.text(max_size=8), step=uint32,
              elapsed_s=st.floats(allow_nan=False)).map(lambda p: edge_pb.GenerateResponse(progress=p)),
    st.builds(gen_pb.Error, message=st.text(max_size=8), field=st.text(max_size=8)).map(
        lambda e: edge_pb.GenerateResponse(error=e)),
    st.just(edge_pb.GenerateResponse(report=gen_pb.EdgeReport())),
    st.just(edge_pb.GenerateResponse()),
)


def _agree(raw: bytes) -> ChunkView | edge_pb.GenerateResponse | None:
    """Decode ``raw`` both ways; assert they agree (values, or both rejecting). None if rejected."""
    try:
        expected: edge_pb.GenerateResponse | None = edge_pb.GenerateResponse.FromString(raw)
    except DecodeError:
        expected = None
    try:
        got: ChunkView | edge_pb.GenerateResponse | None = decode_generate_response(raw)
    except FramingError:  # the reader's refusal of what protobuf cannot parse
        got = None
    if expected is None:
        assert got is None, f"{raw!r}: protobuf rejects it, the fast path gave {got!r}"
        return None
    assert got is not None, f"{raw!r}: protobuf accepts it, the fast path rejected it"
    if isinstance(got, ChunkView):
        assert expected.WhichOneof("kind") == "tensor_chunk"
        chunk = expected.tensor_chunk
        assert (got.request_id, got.tensor_id, got.sequence, got.last, bytes(got.data)) == (
            chunk.request_id, chunk.tensor_id, chunk.sequence, chunk.last, chunk.data)
        assert got.to_response() == expected
    else:
        assert got == expected
    return got


@SETTINGS
@given(responses)
def test_valid_responses_decode_like_protobuf(message: edge_pb.GenerateResponse) -> None:
    raw = message.SerializeToString()
    got = _agree(raw)
    if message.WhichOneof("kind") == "tensor_chunk":
        assert isinstance(got, ChunkView)  # canonical chunks take the fast path ...
        if message.tensor_chunk.data:  # ... and their data is a view of the received bytes
            assert got.data.obj is raw
    else:
        assert isinstance(got, edge_pb.GenerateResponse)


def _varint(value: int, pad: int = 0) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or pad:
            out.append(byte | 0x80)
            if not value:
                pad -= 1
                while pad:
                    out.append(0x80)
                    pad -= 1
                out.append(0)
                break
        else:
            out.append(byte)
            break
    return bytes(out)


_WIRE_TYPES = {1: 2, 2: 0, 3: 0, 4: 0, 5: 2}  # TensorChunk's fields


@st.composite
def wire_fields(draw: st.DrawFn, numbers: st.SearchStrategy[int]) -> bytes:
    """One field with any wire type and value, possibly with an over-long varint."""
    number = draw(numbers)
    usual = _WIRE_TYPES.get(number, 0)  # mostly the field's own wire type, sometimes any
    wire_type = draw(st.sampled_from([usual] * 30 + [0, 1, 2, 5, 3, 4, 6, 7]))
    out = _varint((number << 3) | wire_type, draw(st.sampled_from([0] * 6 + [1, 2])))
    if wire_type == 0:
        out += _varint(draw(st.one_of(st.integers(0, 3), uint32, st.integers(0, (1 << 70) - 1))),
                       draw(st.sampled_from([0] * 6 + [1, 5, 9])))
    elif wire_type == 1:
        out += draw(st.binary(min_size=8, max_size=8))
    elif wire_type == 5:
        out += draw(st.binary(min_size=4, max_size=4))
    elif wire_type == 2:
        body = draw(st.one_of(st.text(max_size=6).map(str.encode), st.binary(max_size=20)))
        out += _varint(len(body), draw(st.sampled_from([0] * 6 + [1, 4, 6]))) + body
    return out


@st.composite
def chunk_like_bytes(draw: st.DrawFn) -> bytes:
    """A GenerateResponse built field by field: repeated, unknown, mistyped and extra fields."""
    inner = b"".join(draw(st.lists(wire_fields(st.integers(1, 7)), max_size=8)))
    outer = [_varint((4 << 3) | 2, draw(st.sampled_from([0, 0, 0, 1]))) + _varint(len(inner)) + inner]
    if draw(st.booleans()):
        outer += draw(st.lists(wire_fields(st.sampled_from([1, 2, 3, 4, 5, 6, 9])), max_size=2))
    return b"".join(draw(st.permutations(outer)))


@SETTINGS
@given(chunk_like_bytes())
def test_hand_built_encodings_decode_like_protobuf(raw: bytes) -> None:
    _agree(raw)


@SETTINGS
@given(chunks, st.data())
def test_corrupted_and_truncated_chunks_decode_like_protobuf(chunk: tensor_pb2.TensorChunk, data: st.DataObject) -> None:
    raw = bytearray(edge_pb.GenerateResponse(tensor_chunk=chunk).SerializeToString())
    for _ in range(data.draw(st.integers(0, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _agree(bytes(raw[:cut]))
    _agree(bytes(raw))


@SETTINGS
@given(st.binary(max_size=64))
def test_random_bytes_decode_like_protobuf(raw: bytes) -> None:
    _agree(raw)


def test_invalid_utf8_request_id_is_rejected_like_protobuf() -> None:
    inner = b"\x0a\x02\xc3\x28" + b"\x2a\x01x"
    raw = b"\x22" + bytes([len(inner)]) + inner
    assert parse_chunk_view(raw) is None
    try:
        decode_generate_response(raw)
    except FramingError:
        pass
    else:
        raise AssertionError("invalid UTF-8 in request_id was accepted")


def test_invalid_utf8_in_an_overwritten_request_id_is_still_rejected() -> None:
    raw = b'"\x05\n\x01\x80\n\x00'  # request_id = b"\x80" (invalid), then request_id = ""
    assert parse_chunk_view(raw) is None
    assert _agree(raw) is None


def test_last_occurrence_of_a_repeated_field_wins() -> None:
    inner = b"\x10\x01\x2a\x02ab\x10\x07\x2a\x01c\x20\x01"
    raw = b"\x22" + bytes([len(inner)]) + inner
    view = parse_chunk_view(raw)
    assert view is not None and (view.tensor_id, bytes(view.data), view.last) == (7, b"c", True)
    _agree(raw)


def test_assembler_accepts_views() -> None:
    generator = torch.Generator().manual_seed(0)
    encoded = encode(torch.randn(1000, generator=generator), "none")
    header, chunk_msgs = frame_tensor(encoded, request_id="r", tensor_id=3, name="x", chunk_size_bytes=512)
    views = [decode_generate_response(edge_pb.GenerateResponse(tensor_chunk=c).SerializeToString())
             for c in chunk_msgs]
    assert all(isinstance(v, ChunkView) for v in views)
    assembler = TensorAssembler(header)
    for view in views:
        assembler.add(view)  # type: ignore[arg-type]
    result = assembler.result()
    assert result.payload == encoded.payload == assemble(header, chunk_msgs).payload
    assert type(result.payload) is bytes and hash(result.payload) == hash(encoded.payload)


def test_assembler_checks_views_like_chunks() -> None:
    encoded = encode(torch.arange(600, dtype=torch.float32), "none")
    header, chunk_msgs = frame_tensor(encoded, request_id="r", tensor_id=0, name="x", chunk_size_bytes=1024)
    bad = tensor_pb2.TensorChunk()
    bad.CopyFrom(chunk_msgs[1])
    bad.data = bytes([bad.data[0] ^ 1]) + bad.data[1:]
    views = [decode_generate_response(edge_pb.GenerateResponse(tensor_chunk=c).SerializeToString())
             for c in (chunk_msgs[0], bad, *chunk_msgs[2:])]
    assembler = TensorAssembler(header)
    for view in views:
        assembler.add(view)  # type: ignore[arg-type]
    from meg.errors import CorruptPayloadError, FramingError

    try:
        assembler.result()
    except CorruptPayloadError as exc:
        assert exc.field == "crc32c"
    else:
        raise AssertionError("a corrupted view passed the checksum")
    again = TensorAssembler(header)
    again.add(views[0])  # type: ignore[arg-type]
    try:
        again.add(views[0])  # type: ignore[arg-type]
    except FramingError as exc:
        assert exc.field == "sequence"
    else:
        raise AssertionError("a duplicate view was accepted")


def test_tune_malloc_applies_once_on_glibc() -> None:
    import platform

    from meg.services import wire

    applied = wire.tune_malloc()
    if platform.libc_ver()[0] == "glibc":
        assert applied and wire._tuned == wire.MallocTuning()
    assert wire.tune_malloc() == applied  # idempotent
