"""`meg bench grpc`: framed-tensor streaming over gRPC vs a raw loopback TCP socket.

As in a deployment, sender and receiver are separate processes: a child process plays
the edge and serves both transports on 127.0.0.1; this process plays the device and
receives, alternating between the transports so that both see the same machine load.

- gRPC: the edge's transport — a `grpc.aio` server with the edge's message-size options
  streaming `EdgeService.Generate` answers (a TensorHeader, then 1 MiB TensorChunks),
  received by a synchronous channel as the device client does (`meg.services.wire`:
  chunks arrive as zero-copy views of the received bytes) and reassembled and
  checksummed by `TensorAssembler`. Both processes tune glibc malloc as the edge server
  and the device client do (`meg.services.wire.tune_malloc`).
- TCP: the same bytes over a plain blocking socket (`sendall` / `recv_into`): no
  framing, no checksum, no protocol. `tcp-raw` receives each transfer into a newly
  allocated buffer, as a receiver of a new tensor must (the reference for
  `ratio_vs_tcp`); `tcp-raw-warm` reuses one buffer whose pages are already mapped —
  the ceiling of this machine's loopback, reported beside it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

__all__ = ["GrpcBenchRow", "run_grpc_bench"]


@dataclass(frozen=True)
class GrpcBenchRow:
    transport: str
    payload_bytes: int
    repeats: int
    median_s: float
    throughput_mb_s: float
    ratio_vs_tcp: float


def _payload_frames(payload_mib: int) -> tuple[Any, list[Any], bytes]:
    import torch

    from meg.codecs.chain import encode
    from meg.codecs.framing import frame_tensor

    generator = torch.Generator().manual_seed(0)
    tensor = torch.randn(payload_mib * (1 << 20) // 2, generator=generator).to(torch.float16)
    encoded = encode(tensor, "none")
    header, chunks = frame_tensor(encoded, request_id="bench", tensor_id=0, name="payload")
    return header, chunks, encoded.payload


def _serve_raw_tcp(listener: socket.socket, payload: bytes) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # listener closed
            return
        with conn:
            conn.sendall(payload)


def _edge_process(payload_mib: int, pipe: Connection) -> None:
    """Child process: serve the framed tensor over gRPC and the raw bytes over TCP."""
    import grpc

    from meg.services.limits import ServiceLimits
    from meg.services.transport import message_options
    from meg.services.wire import tune_malloc
    from meg.v1 import edge_service_pb2, edge_service_pb2_grpc

    tune_malloc()  # as `meg serve edge` does

    header, chunks, payload = _payload_frames(payload_mib)

    class StreamingEdge(edge_service_pb2_grpc.EdgeServiceServicer):
        async def Generate(  # noqa: N802 - gRPC method name
            self, request_iterator: AsyncIterator[Any], context: Any
        ) -> AsyncIterator[Any]:
            async for _ in request_iterator:
                break
            yield edge_service_pb2.GenerateResponse(tensor_header=header)
            for chunk in chunks:
                yield edge_service_pb2.GenerateResponse(tensor_chunk=chunk)

    async def main() -> None:
        server = grpc.aio.server(options=message_options(ServiceLimits.max_message_bytes))
        edge_service_pb2_grpc.add_EdgeServiceServicer_to_server(StreamingEdge(), server)
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_serve_raw_tcp, args=(listener, payload), daemon=True).start()
        pipe.send((grpc_port, listener.getsockname()[1], len(payload)))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop
        listener.close()
        await server.stop(None)

    asyncio.run(main())


def _grpc_once(generate: Any) -> float:
    from meg.codecs.framing import TensorAssembler
    from meg.services.wire import ChunkView
    from meg.v1 import edge_service_pb2

    def requests() -> Iterator[Any]:
        yield edge_service_pb2.GenerateRequest()

    start = time.perf_counter()
    assembler: TensorAssembler | None = None
    for response in generate(requests()):
        if isinstance(response, ChunkView):
            if assembler is not None and assembler.add(response):
                assembler.result()
        elif response.HasField("tensor_header"):
            assembler = TensorAssembler(response.tensor_header)
        elif assembler is not None and assembler.add(response.tensor_chunk):
            assembler.result()
    if assembler is None or not assembler.complete:
        raise RuntimeError("the gRPC stream ended before the tensor was complete")
    return time.perf_counter() - start


def _tcp_once(port: int, size_bytes: int, buffer: memoryview | None = None) -> float:
    start = time.perf_counter()
    if buffer is None:
        buffer = memoryview(bytearray(size_bytes))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        received = 0
        while received < len(buffer):
            n = conn.recv_into(buffer[received:])
            if n == 0:
                break
            received += n
    if received != len(buffer):
        raise RuntimeError(f"raw TCP delivered {received} of {len(buffer)} bytes")
    return time.perf_counter() - start


def run_grpc_bench(payload_mib: int = 64, repeats: int = 5) -> list[GrpcBenchRow]:
    """Measure both transports in one run; returns one row per transport."""
    import grpc

    from meg.services.limits import ServiceLimits
    from meg.services.transport import channel_options
    from meg.services.wire import generate_call, tune_malloc

    tune_malloc()  # as the device client does
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    edge = context.Process(target=_edge_process, args=(payload_mib, child), daemon=True)
    edge.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the benchmark's edge process did not start within 120 s")
        grpc_port, tcp_port, payload_bytes = parent.recv()
        warm = memoryview(bytearray(payload_bytes))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                   options=channel_options(ServiceLimits.max_message_bytes)) as channel:
            generate = generate_call(channel)  # the device client's receive path
            _grpc_once(generate)  # warm-up: connection set-up, HTTP/2 windows
            _tcp_once(tcp_port, payload_bytes, warm)
            grpc_s, tcp_s, warm_s = [], [], []
            for _ in range(repeats):
                grpc_s.append(_grpc_once(generate))
                tcp_s.append(_tcp_once(tcp_port, payload_bytes))
                warm_s.append(_tcp_once(tcp_port, payload_bytes, warm))
    finally:
        parent.send("stop")
        edge.join(10)
        if edge.is_alive():
            edge.kill()

    tcp_median = statistics.median(tcp_s)
    rows = []
    for name, times in (("grpc-framed", grpc_s), ("tcp-raw", tcp_s), ("tcp-raw-warm", warm_s)):
        median = statistics.median(times)
        rows.append(GrpcBenchRow(
            transport=name,
            payload_bytes=payload_bytes,
            repeats=repeats,
            median_s=median,
            throughput_mb_s=payload_bytes / median / 1e6,
            ratio_vs_tcp=tcp_median / median,
        ))
    return rows


@click.command("grpc")
@click.option("--payload-mib", default=64, show_default=True, help="Size of the streamed tensor in MiB.")
@click.option("--repeats", default=5, show_default=True, help="Timed transfers per transport (median reported).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
def bench_grpc(payload_mib: int, repeats: int, json_path: Path | None) -> None:
    """Framed-tensor throughput through the edge's gRPC transport vs raw loopback TCP.

    The edge side runs in a child process; both transports are measured in the same run,
    alternately; ratio_vs_tcp is gRPC throughput as a fraction of raw TCP.
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
