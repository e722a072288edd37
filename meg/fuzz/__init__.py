"""Fuzz targets: one per parser of untrusted bytes or text, for atheris (coverage-guided).

Each target takes the fuzzer's bytes and feeds them to one parser. The contract under test:
only `meg.errors.MegError` subclasses may escape (a clear, typed refusal); anything else is
a crash. Inputs that are not even the container the parser expects (bytes that protobuf
itself cannot read as the message the service would hand over) are skipped, because the
services refuse those before the parser sees them (`INVALID_ARGUMENT`, see
`meg.services.edge_servicer`).

`meg fuzz TARGET --runs N` runs one target (`python -m meg.fuzz TARGET -runs=N` underneath,
one process per target, since libFuzzer exits the process); seeds come from `seeds(target)`,
real encodings of real requests, tensors and reports.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from google.protobuf.message import DecodeError

from meg.errors import MegError

__all__ = ["TARGETS", "check", "seeds"]


def _wire(data: bytes) -> None:
    from meg.services.wire import decode_generate_response

    decode_generate_response(data)


def _framing(data: bytes) -> None:
    from meg.codecs.framing import FramingLimits, TensorAssembler
    from meg.v1 import tensor_pb2

    # [2-byte header length][header][chunks: 2-byte length + TensorChunk]...
    if len(data) < 2:
        return
    n = int.from_bytes(data[:2], "little")
    header = tensor_pb2.TensorHeader()
    try:
        header.ParseFromString(data[2 : 2 + n])
    except DecodeError:
        return
    assembler = TensorAssembler(header, FramingLimits(max_encoded_bytes=1 << 20, max_elements=1 << 20, max_params_bytes=1 << 16))
    pos = 2 + n
    while pos + 2 <= len(data):
        m = int.from_bytes(data[pos : pos + 2], "little")
        chunk = tensor_pb2.TensorChunk()
        try:
            chunk.ParseFromString(data[pos + 2 : pos + 2 + m])
        except DecodeError:
            return
        pos += 2 + m
        if assembler.add(chunk):
            assembler.result()
            return


def _codec_decode(data: bytes) -> None:
    import torch

    from meg.codecs.chain import EncodedTensor, decode
    from meg.codecs.framing import dtype_from_proto

    # [chain spec NUL][dtype byte][rank byte][dims: 2 bytes each][2-byte params length][params][payload]
    spec, sep, rest = data.partition(b"\0")
    if not sep or len(rest) < 2:
        return
    try:
        chain = spec.decode()
    except UnicodeDecodeError:
        return
    dtype: torch.dtype = dtype_from_proto(rest[0] % 8)
    rank = rest[1] % 5
    dims = [int.from_bytes(rest[2 + 2 * i : 4 + 2 * i], "little") % 65 for i in range(rank)]
    pos = 2 + 2 * rank
    k = int.from_bytes(rest[pos : pos + 2], "little")
    params = rest[pos + 2 : pos + 2 + k]
    payload = rest[pos + 2 + k :]
    decode(EncodedTensor(chain=chain, dtype=dtype, shape=tuple(dims), payload=bytes(payload), params=bytes(params)))


def _chain(data: bytes) -> None:
    from meg.codecs.chain import parse_chain

    parse_chain(data.decode("utf-8", errors="replace"))


def _prompt(data: bytes) -> None:
    from meg.models.captions import parse_prompt

    parse_prompt(data.decode("utf-8", errors="replace"))


def _request(data: bytes) -> None:
    from meg.convert import inputs_from_request, link_config_from_channel
    from meg.recipes.plan import plan_from_proto
    from meg.recipes.registry import recipe_for
    from meg.services.limits import ServiceLimits, validate_plan, validate_request
    from meg.v1 import generation_pb2 as gen_pb

    request = gen_pb.GenerationRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return
    limits = ServiceLimits()
    validate_request(request, limits)
    recipe_for(request.recipe)
    link_config_from_channel(request.channel)
    if request.HasField("plan_override"):
        validate_plan(request.plan_override, limits, field="plan_override")
        plan = plan_from_proto(request.plan_override, field="plan_override")
        inputs_from_request(request, plan.steps, default_size_px=128)


def _report(data: bytes) -> None:
    from meg.recipes.report import GenerationReport

    try:
        raw = json.loads(data.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError):
        return
    GenerationReport.from_dict(raw)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wire": _wire,
    "framing": _framing,
    "codec-decode": _codec_decode,
    "chain": _chain,
    "prompt": _prompt,
    "request": _request,
    "report": _report,
}


def check(target: str, data: bytes) -> None:
    """Run one input; a `MegError` is a proper refusal, anything else propagates (a crash)."""
    with contextlib.suppress(MegError):
        TARGETS[target](data)


def seeds(target: str) -> list[bytes]:
    """Real, well-formed inputs of `target` (the fuzzer mutates from these)."""
    from meg.fuzz.corpus import seed_inputs

    return seed_inputs(target)
