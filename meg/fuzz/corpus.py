"""Seed inputs of the fuzz targets: real encodings of requests, tensors, streams and reports."""

from __future__ import annotations

import json

__all__ = ["seed_inputs"]

_CHAINS = ("none", "fp16", "fp16,zstd:3", "int8", "int8,zstd:3", "merge:0.5,int8,zstd:3", "merge:0.25:g2,fp16", "zstd:3")


def _tensor() -> object:
    import torch

    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _framed(chain: str, chunk: int) -> bytes:
    from meg.codecs.chain import encode
    from meg.codecs.framing import frame_tensor

    header, chunks = frame_tensor(encode(_tensor(), chain), request_id="seed", tensor_id=0, name="latents",  # type: ignore[arg-type]
                                  chunk_size_bytes=chunk)  # fmt: skip
    raw = header.SerializeToString()
    out = len(raw).to_bytes(2, "little") + raw
    for c in chunks:
        rc = c.SerializeToString()
        out += len(rc).to_bytes(2, "little") + rc
    return out


def _encoded(chain: str) -> bytes:
    from meg.codecs.chain import encode
    from meg.codecs.framing import dtype_to_proto

    enc = encode(_tensor(), chain)  # type: ignore[arg-type]
    dims = b"".join(int(d).to_bytes(2, "little") for d in enc.shape)
    return (enc.chain.encode() + b"\0" + bytes([dtype_to_proto(enc.dtype), len(enc.shape)]) + dims
            + len(enc.params).to_bytes(2, "little") + enc.params + enc.payload)  # fmt: skip


def _requests() -> list[bytes]:
    from meg.recipes.hybrid_sr import hybrid_plan
    from meg.recipes.plan import make_plan
    from meg.services.client import DeviceRequest

    reqs = [DeviceRequest(prompt="a red circle at the top left", seed=3),
            DeviceRequest(prompt="two blue squares", width=128, height=128, plan=make_plan("decoder", steps=4, merge_ratio=0.5,
                                                                                          codec_chain="int8,zstd:3", tome_ratio=0.5)),
            DeviceRequest(prompt="a star", plan=make_plan("step:2", steps=4), distance_m=200.0, latency_limit_s=3.0),
            DeviceRequest(prompt="a ring", width=512, height=512, recipe="hybrid-sr", plan=hybrid_plan(steps=2, sr_scale=4))]  # fmt: skip
    return [r.to_proto().SerializeToString() for r in reqs]


def _responses() -> list[bytes]:
    from meg.codecs.chain import encode
    from meg.codecs.framing import frame_tensor
    from meg.recipes.plan import make_plan, plan_to_proto
    from meg.v1 import edge_service_pb2 as edge_pb
    from meg.v1 import generation_pb2 as gen_pb

    header, chunks = frame_tensor(encode(_tensor(), "fp16"), request_id="seed", tensor_id=0, name="latents",  # type: ignore[arg-type]
                                  chunk_size_bytes=64)  # fmt: skip
    messages = [edge_pb.GenerateResponse(plan=plan_to_proto(make_plan("decoder", steps=4))),
                edge_pb.GenerateResponse(progress=gen_pb.Progress(stage="denoise", step=1, total_steps=4, elapsed_s=0.1)),
                edge_pb.GenerateResponse(tensor_header=header),
                *(edge_pb.GenerateResponse(tensor_chunk=c) for c in chunks[:2])]  # fmt: skip
    return [m.SerializeToString() for m in messages]


def _report() -> bytes:
    from meg.recipes.report import (
        BytesRecord,
        ChannelRecord,
        DeviceRecord,
        EnergyRecord,
        FallbackRecord,
        GenerationReport,
        LatencyRecord,
        PartCost,
    )

    report = GenerationReport(
        request_id="r1", recipe="meg", prompt="a red circle", seed=1, width=128, height=128, edge_addresses=["127.0.0.1:50051"],
        plan={"split": "decoder", "steps": 4, "merge_ratio": 0.5, "codec_chain": "merge:0.5,int8", "tome_ratio": 0.5,
              "policy": "rule", "params": {}},
        fallback=FallbackRecord(), channel=ChannelRecord("digital", "awgn", 20.0, 1e6, 200.0, 0.0, 0.0, 23.0),
        bytes=BytesRecord(962, 120, []), parts=[PartCost("edge.compute", "this-machine", 0.1, flops=1e9, measured=True)],
        latency_s=LatencyRecord(0.1, 0.2, 0.3, 0.0), energy_j=EnergyRecord(1.0, 0.1, 0.2, 1.3),
        device=DeviceRecord("jetson-agx-orin", "onnxruntime", ["CPUExecutionProvider"]), served_by="edge-0",
    )  # fmt: skip
    return report.to_json().encode()


def seed_inputs(target: str) -> list[bytes]:
    """Seeds of one of `meg.fuzz.TARGETS`."""
    if target == "wire":
        return _responses()
    if target == "framing":
        return [_framed(c, chunk) for c in ("none", "fp16,zstd:3", "int8") for chunk in (64, 1 << 20)]
    if target == "codec-decode":
        return [_encoded(c) for c in _CHAINS]
    if target == "chain":
        return [c.encode() for c in _CHAINS]
    if target == "prompt":
        return [p.encode() for p in ("a red circle at the top left", "two small blue squares and a green star on a white background",
                                     "a big purple ring, striped, bottom right", "")]  # fmt: skip
    if target == "request":
        return _requests()
    if target == "report":
        return [_report(), json.dumps({"request_id": "x"}).encode()]
    raise KeyError(target)
