"""`meg bench grpc`: framed-tensor streaming over gRPC vs a raw loopback TCP socket.

Both transports carry the same payload in the same run on 127.0.0.1. The gRPC side is
the edge's transport: `EdgeService.Generate` streaming a TensorHeader and 1 MiB
TensorChunks, which the receiver reassembles and checksums with `TensorAssembler`
(what the device client does); the TCP side moves the same bytes with no framing, no
checksum and no protocol at all, so it is the ceiling.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import grpc
import torch
from rich.console import Console
from rich.table import Table

from meg.codecs.chain import encode
from meg.codecs.framing import MAX_CHUNK_BYTES, TensorAssembler, frame_tensor
from meg.v1 import edge_service_pb2, edge_service_pb2_grpc

__all__ = ["GrpcBenchRow", "run_grpc_bench"]

_MESSAGE_LIMIT_BYTES = 8 * MAX_CHUNK_BYTES


@dataclass(frozen=True)
class GrpcBenchRow:
    transport: str
    payload_bytes: int
    repeats: int
    median_s: float
    throughput_mb_s: float
    ratio_vs_tcp: float


class _StreamingEdge(edge_service_pb2_grpc.EdgeServiceServicer):
    """Answers every Generate call with one framed tensor, as the edge streams results."""

    def __init__(self, header: object, chunks: list[object]) -> None:
        self._header = header
        self._chunks = chunks

    async def Generate(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[edge_service_pb2.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[edge_service_pb2.GenerateResponse]:
        async for _ in request_iterator:
            break
        yield edge_service_pb2.GenerateResponse(tensor_header=self._header)
        for chunk in self._chunks:
            yield edge_service_pb2.GenerateResponse(tensor_chunk=chunk)


async def _grpc_once(stub: edge_service_pb2_grpc.EdgeServiceStub) -> float:
    start = time.perf_counter()

    async def requests() -> AsyncIterator[edge_service_pb2.GenerateRequest]:
        yield edge_service_pb2.GenerateRequest()

    assembler: TensorAssembler | None = None
    async for response in stub.Generate(requests()):
        if response.HasField("tensor_header"):
            assembler = TensorAssembler(response.tensor_header)
        elif assembler is not None and assembler.add(response.tensor_chunk):
            assembler.result()
    return time.perf_counter() - start


async def _tcp_once(port: int, payload_bytes: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = 0
    while received < payload_bytes:
        block = await reader.read(1 << 20)
        if not block:
            break
        received += len(block)
    writer.close()
    await writer.wait_closed()
    if received != payload_bytes:
        raise RuntimeError(f"raw TCP delivered {received} of {payload_bytes} bytes")
    return time.perf_counter() - start


async def _bench(payload_mib: int, repeats: int) -> list[GrpcBenchRow]:
    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(payload_mib * (1 << 20) // 2, generator=generator).to(torch.float16)
    encoded = encode(tensor, "none")
    header, chunks = frame_tensor(encoded, request_id="bench", tensor_id=0, name="payload")
    payload = encoded.payload

    options = [
        ("grpc.max_send_message_length", _MESSAGE_LIMIT_BYTES),
        ("grpc.max_receive_message_length", _MESSAGE_LIMIT_BYTES),
    ]
    server = grpc.aio.server(options=options)
    edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(_StreamingEdge(header, chunks), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def serve_tcp(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    tcp_server = await asyncio.start_server(serve_tcp, "127.0.0.1", 0)
    tcp_port = tcp_server.sockets[0].getsockname()[1]

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
            stub = edge_service_pb2_grpc.EdgeServiceStub(channel)
            await _grpc_once(stub)  # warm-up: connection set-up, HTTP/2 windows
            await _tcp_once(tcp_port, len(payload))
            grpc_s, tcp_s = [], []
            # interleaved so that both see the same machine load
            for _ in range(repeats):
                grpc_s.append(await _grpc_once(stub))
                tcp_s.append(await _tcp_once(tcp_port, len(payload)))
    finally:
        tcp_server.close()
        await server.stop(None)

    tcp_median = statistics.median(tcp_s)
    rows = []
    for name, times in (("grpc-framed", grpc_s), ("tcp-raw", tcp_s)):
        median = statistics.median(times)
        rows.append(GrpcBenchRow(
            transport=name,
            payload_bytes=len(payload),
            repeats=repeats,
            median_s=median,
            throughput_mb_s=len(payload) / median / 1e6,
            ratio_vs_tcp=tcp_median / median,
        ))
    return rows


def run_grpc_bench(payload_mib: int = 64, repeats: int = 5) -> list[GrpcBenchRow]:
    """Measure both transports in one run; returns one row per transport."""
    return asyncio.run(_bench(payload_mib, repeats))


@click.command("grpc")
@click.option("--payload-mib", default=64, show_default=True, help="Size of the streamed tensor in MiB.")
@click.option("--repeats", default=5, show_default=True, help="Timed transfers per transport (median reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
def bench_grpc(payload_mib: int, repeats: int, json_path: Path | None) -> None:
    """Framed-tensor throughput through the edge's gRPC transport vs raw loopback TCP.

    Both run on 127.0.0.1 in the same process and run, interleaved; ratio_vs_tcp is
    gRPC throughput as a fraction of raw TCP.
    """
    rows = run_grpc_bench(payload_mib, repeats)
    table = Table(title=f"Streaming {payload_mib} MiB on loopback (median of {repeats})")
    for column in ("transport", "MB/s", "median s", "ratio vs TCP"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.transport, f"{row.throughput_mb_s:.0f}", f"{row.median_s:.3f}", f"{row.ratio_vs_tcp:.2f}")
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
