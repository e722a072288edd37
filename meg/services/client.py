"""The device (UE) client: ask an edge for its part, finish the image here, report it all.

`DeviceClient.generate(request)` opens a `Generate` stream to one of the edge addresses
(client-side `round_robin` with gRPC health checks when there are several), sends the
request and any tensors the recipe's device half sends up, reassembles and verifies the
tensors that come down and hands each to the device half as it completes; the device half
finishes the image (ONNX Runtime by default, or torch). The client knows no recipe: it
dispatches on `GenerationRequest.recipe` (`meg.recipes.registry`). Every call has a
deadline. When the edge is unreachable (UNAVAILABLE), too slow (deadline) or the stream
breaks, the device half generates without it and the report says so.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meg.channel.link import LinkConfig
from meg.codecs.chain import EncodedTensor
from meg.codecs.framing import FramingLimits, TensorAssembler, frame_tensor
from meg.convert import channel_from_link_config, channel_to_dict
from meg.errors import (
    ChannelError,
    DeadlineExceededError,
    FramingError,
    InvalidInputError,
    MegError,
    UnavailableError,
)
from meg.recipes.base import DeviceContext, DeviceHalf, DeviceOutput, Recipe
from meg.recipes.plan import Plan, plan_from_proto, plan_to_proto
from meg.recipes.registry import recipe_by_name, recipe_for
from meg.recipes.report import (
    BytesRecord,
    ChannelRecord,
    DeviceRecord,
    FallbackRecord,
    GenerationReport,
    LatencyRecord,
    PartCost,
    TensorRecord,
    quality_vs_reference,
)
from meg.services.edge_config import EdgeConfig
from meg.services.limits import ServiceLimits
from meg.services.security import TlsConfig, channel_credentials, token_metadata
from meg.services.status import REPLICA_METADATA_KEY, error_from_rpc
from meg.services.transport import channel_options
from meg.services.wire import ChunkView, generate_call
from meg.split.engine import SplitEngine
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import edge_service_pb2_grpc as edge_grpc
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import tensor_pb2

__all__ = ["ClientConfig", "DeviceClient", "DeviceRequest", "GenerationResult", "save_png"]

EDGE_SERVICE = edge_pb.DESCRIPTOR.services_by_name["EdgeService"].full_name
_FALLBACK_ERRORS = (UnavailableError, DeadlineExceededError, ChannelError)


@dataclass(frozen=True)
class ClientConfig:
    """How the device client reaches edges and runs its partition."""

    deadline_s: float = 60.0
    """Deadline of each `Generate` call to the edge."""
    connect_timeout_s: float = 3.0
    """How long to wait for a healthy edge before falling back."""
    token: str | None = None
    """Bearer token presented to the edge."""
    tls: TlsConfig | None = None
    """Trust roots (and client certificate for mutual TLS); None connects in plaintext."""
    runtime: Literal["onnxruntime", "torch", "eager"] = "onnxruntime"
    """Where the device partition runs: the exported ONNX graphs in ONNX Runtime, the same
    graphs in torch, or ("eager") the split engine's own torch modules, whose maths equal
    the unsplit reference bit for bit."""
    onnx_dir: Path = Path.home() / ".cache" / "meg" / "onnx"
    """Cache folder of exported device partitions (one sub-folder per resolution)."""
    onnx_exporter: Literal["auto", "dynamo", "torchscript"] = "torchscript"
    """Exporter used on first use of a resolution (`meg.split.onnx_export.ExportOptions`):
    TorchScript exports the tiny decoder in seconds on a CPU where dynamo takes a minute,
    and its graphs match torch to ~1e-6 here."""
    model: str = EdgeConfig.model
    """Pipeline the device loads for its partition (and for falling back); the edge's default."""
    fallback: bool = True
    """Generate on the device when the edge is unreachable, too slow or the stream breaks."""
    retries: int = 2
    """Times a request whose edge became unavailable (or whose stream broke) is sent again,
    to whichever healthy replica round_robin picks next, before the device falls back. A
    deadline that ran out is not retried."""
    max_message_bytes: int = ServiceLimits.max_message_bytes
    """Largest gRPC message accepted from the edge."""
    framing: FramingLimits = field(default_factory=FramingLimits)
    """Bounds on tensors received from the edge (checked before allocating)."""
    sr_model: str | None = None
    """Hybrid SR: the diffusion SR model for the in-process reference (``reference=True``)."""
    light_sr: str | None = None
    """Hybrid SR: the device's light SR model — a family name or folder, or a Real-ESRGAN
    SRVGGNetCompact weights file; default: the `model`'s family."""
    device_decoder: str | None = None
    """VAE folder of the `model` the device decodes with (e.g. "vae_merge_paper", the decoder
    distilled as MEG's paper does, or "vae", the stock one); default: the pipeline's (for
    meg-tiny, the merge-aware `vae_merge`)."""


@dataclass(frozen=True)
class DeviceRequest:
    """One generation as the device asks for it (converted to `GenerationRequest`).

    `plan` forces a plan (e.g. `meg.recipes.make_plan("decoder", steps=2)`); None lets the
    edge's policy decide. Width and height 0 mean the model's native size.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    width: int = 0
    height: int = 0
    guidance_scale: float = 0.0
    """0 means the model's default."""
    device_profile: str = "jetson-agx-orin"
    link: LinkConfig = field(default_factory=LinkConfig)
    distance_m: float = 0.0
    latency_limit_s: float = 0.0
    energy_limit_j: float = 0.0
    plan: Plan | None = None
    request_id: str = ""
    model: str = ""
    recipe: str = "meg"
    """Registered recipe name (`meg.recipes.registry`)."""

    def to_proto(self) -> gen_pb.GenerationRequest:
        request = gen_pb.GenerationRequest(
            request_id=self.request_id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            width=self.width,
            height=self.height,
            limits=gen_pb.Limits(latency_s=self.latency_limit_s, energy_j=self.energy_limit_j),
            device_profile=self.device_profile,
            channel=channel_from_link_config(self.link, distance_m=self.distance_m),
            recipe=recipe_by_name(self.recipe).wire_id,  # type: ignore[arg-type]
            model=self.model,
            guidance_scale=self.guidance_scale,
        )
        if self.plan is not None:
            request.plan_override.CopyFrom(plan_to_proto(self.plan))
        return request


@dataclass
class GenerationResult:
    """The image ([1, 3, H, W] float32 in [0, 1]) and its report."""

    image: torch.Tensor
    report: GenerationReport

    def save(self, out_dir: Path) -> tuple[Path, Path]:
        """Write `image.png` and `report.json` into `out_dir`; return both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        image_path, report_path = out_dir / "image.png", out_dir / "report.json"
        save_png(self.image, image_path)
        self.report.save(report_path)
        return image_path, report_path


def save_png(image: torch.Tensor, path: Path) -> None:
    """Save a [1, 3, H, W] or [3, H, W] image in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    pixels = image[0] if image.dim() == 4 else image
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array).save(path)


class _EdgeBroke(UnavailableError):
    """The stream ended without a report, or carried something the device cannot use."""


@dataclass
class _EdgeAnswer:
    plan: Plan | None = None
    report: gen_pb.EdgeReport | None = None
    tensors: list[tuple[str, EncodedTensor]] = field(default_factory=list)
    progress_events: int = 0
    replica: str = ""
    """The replica that answered (its `meg-replica` initial metadata)."""


def _target(addresses: Sequence[str]) -> str:
    """A gRPC target for one or several `host:port` addresses (IPv4 list for round_robin)."""
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInputError(f"edge address {address!r} is not host:port", field="addresses")
        infos = socket.getaddrinfo(host.strip("[]"), int(port), socket.AF_INET, socket.SOCK_STREAM)
        if not infos:
            raise UnavailableError(f"edge address {address!r} does not resolve to IPv4", field="addresses")
        hosts.append(f"{infos[0][4][0]}:{port}")
    return "ipv4:" + ",".join(hosts)


class DeviceClient:
    """The user device's side of every recipe; `generate` may be called from several threads.

    Args:
        addresses: edge addresses `host:port`; several are balanced round-robin, and only
            edges whose health service reports SERVING get requests.
        config: deadlines, auth, TLS, runtime, fallback.
        pipeline: an already-loaded pipeline for the device partition (default: load
            `config.model` on first use).
    """

    def __init__(self, addresses: Sequence[str] | str, config: ClientConfig = ClientConfig(), *, pipeline: Any = None) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise InvalidInputError("at least one edge address is needed", field="addresses")
        self.config = config
        service_config = {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": EDGE_SERVICE},
            # gRPC's transparent retry: a call refused UNAVAILABLE before any answer (a replica
            # that is going away) is sent again, to another replica; a stream that breaks after
            # the edge answered is retried by `generate` (ClientConfig.retries).
            "methodConfig": [{
                "name": [{"service": EDGE_SERVICE}],
                "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
            }],
        }  # fmt: skip
        options: list[tuple[str, Any]] = [
            *channel_options(config.max_message_bytes),
            ("grpc.service_config", json.dumps(service_config)),
            ("grpc.enable_retries", 1),
            ("grpc.per_rpc_retry_buffer_size", 1 << 20),  # larger uplinks are not replayed by gRPC itself
        ]
        target = _target(self.addresses)
        if config.tls is not None:
            if config.tls.server_name_override:
                options.append(("grpc.ssl_target_name_override", config.tls.server_name_override))
            self._channel = grpc.secure_channel(target, channel_credentials(config.tls), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = edge_grpc.EdgeServiceStub(self._channel)
        # Generate with the zero-copy deserializer: tensor chunks arrive as ChunkView
        self._generate = generate_call(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # After a failure (and at first) wait for a healthy edge before calling; while calls
        # succeed, skip that extra RPC (it would also skew round_robin's alternation).
        self._edge_ok = False
        self._metadata = token_metadata(config.token)
        self._pipeline = pipeline
        self._context: DeviceContext | None = None
        self._runtimes: dict[tuple[int, int, tuple[str, ...], str | None], Any] = {}
        self._lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------

    def generate(
        self,
        request: DeviceRequest | gen_pb.GenerationRequest,
        *,
        reference: bool = False,
        on_event: Callable[[edge_pb.GenerateResponse], None] | None = None,
    ) -> GenerationResult:
        """Generate one image with the edge's help (or alone, on fallback).

        Args:
            request: what to generate, with the device profile and channel state.
            reference: also produce the recipe's unsplit reference here and report the difference.
            on_event: called with every message the edge streams (plan, progress, ...), as a
                ``GenerateResponse``; tensor chunks are received without copying their data and
                converted (with a copy) only when this is set.

        Raises:
            InvalidInputError (and other `MegError`s): the edge refused the request for a
                reason falling back would not fix (bad input, auth, not found).
        """
        proto = request.to_proto() if isinstance(request, DeviceRequest) else request
        if not proto.request_id:
            proto.request_id = uuid.uuid4().hex
        recipe = recipe_for(proto.recipe)
        context = self._device_context(proto.device_profile or None)
        half = recipe.device_half(context, proto)
        started = time.perf_counter()
        answer = _EdgeAnswer()
        fallback_reason: str | None = None
        retried: list[str] = []
        planned: DeviceHalf | None = None
        try:
            while True:
                if not self._edge_ok:
                    self._wait_for_edge()  # no healthy replica at all: fall back at once
                try:
                    self._call_edge(proto, half, answer, on_event)
                    break
                except (UnavailableError, ChannelError) as exc:
                    # the replica died or broke the stream: another healthy one gets the request
                    self._edge_ok = False
                    if len(retried) >= self.config.retries:
                        raise
                    retried.append(f"{answer.replica or 'unknown replica'}: {type(exc).__name__}: {exc.message}")
                    if half.plan is not None:
                        planned = half  # a fallback keeps the plan the edge chose
                    half = recipe.device_half(context, proto)
                    answer = _EdgeAnswer()
            edge_wall_s = time.perf_counter() - started
            try:
                output = half.finish()
            except MegError as exc:  # the edge answered with something this device cannot use
                raise _EdgeBroke(f"edge sent unusable data: {exc.message}", field=exc.field) from exc
            self._edge_ok = True
            plan = half.plan
        except _FALLBACK_ERRORS as exc:
            self._edge_ok = False
            if not self.config.fallback:
                raise
            fallback_reason = f"{type(exc).__name__}: {exc.message}"
            edge_wall_s = time.perf_counter() - started
            if half.plan is None and planned is not None:
                half = planned
            output = half.fallback(fallback_reason)
            plan = half.fallback_plan()
        assert plan is not None
        wall_s = time.perf_counter() - started - output.setup_s
        report = self._report(proto, recipe, plan, answer, fallback_reason, output,
                              edge_wall_s=edge_wall_s, wall_s=wall_s)
        report.served_by = answer.replica if fallback_reason is None else "device"
        report.retries = retried
        if reference:
            expected = half.reference()
            if expected is not None:
                report.quality = quality_vs_reference(
                    output.image, expected, "unsplit generation, same seed and steps, torch")
        return GenerationResult(image=output.image, report=report)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the edge call -----------------------------------------------------------------------

    def _wait_for_edge(self) -> None:
        """Wait (up to `connect_timeout_s`) until round_robin has a healthy edge.

        A health check with `wait_for_ready` is routed only once some edge is connected
        and its health service reports SERVING (edges still loading are skipped).
        """
        check = health_pb2.HealthCheckRequest(service=EDGE_SERVICE)
        try:
            answer = self._health.Check(check, timeout=self.config.connect_timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise UnavailableError(
                f"no healthy edge at {', '.join(self.addresses)} within {self.config.connect_timeout_s} s "
                f"({exc.code().name})"
            ) from None
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise UnavailableError(f"edge at {', '.join(self.addresses)} is not serving")

    def _request_stream(self, request: gen_pb.GenerationRequest, half: DeviceHalf) -> Iterator[edge_pb.GenerateRequest]:
        """``start``, then every tensor the device half sends up, framed like the downlink."""
        yield edge_pb.GenerateRequest(start=request)
        for tensor_id, (name, encoded) in enumerate(half.uplink()):
            header, chunks = frame_tensor(encoded, request_id=request.request_id, tensor_id=tensor_id, name=name)
            yield edge_pb.GenerateRequest(tensor_header=header)
            for chunk in chunks:
                yield edge_pb.GenerateRequest(tensor_chunk=chunk)

    def _call_edge(self, request: gen_pb.GenerationRequest, half: DeviceHalf, answer: _EdgeAnswer,
                   on_event: Callable[[edge_pb.GenerateResponse], None] | None) -> None:
        assemblers: dict[int, TensorAssembler] = {}
        names: dict[int, str] = {}

        def add_chunk(chunk: ChunkView | tensor_pb2.TensorChunk) -> None:
            if chunk.tensor_id not in assemblers:
                raise FramingError(f"chunk for unknown tensor_id {chunk.tensor_id}", field="tensor_chunk")
            if assemblers[chunk.tensor_id].add(chunk):
                encoded = assemblers.pop(chunk.tensor_id).result()
                answer.tensors.append((names[chunk.tensor_id], encoded))
                half.on_tensor(names[chunk.tensor_id], encoded)

        try:
            call = self._generate(self._request_stream(request, half), timeout=self.config.deadline_s,
                                  metadata=self._metadata)
            for key, value in call.initial_metadata() or ():
                if key == REPLICA_METADATA_KEY:
                    answer.replica = str(value)
            for message in call:
                if isinstance(message, ChunkView):  # the zero-copy path of a tensor chunk
                    if on_event is not None:
                        on_event(message.to_response())  # built (with a copy) only for the callback
                    add_chunk(message)
                    continue
                if on_event is not None:
                    on_event(message)
                kind = message.WhichOneof("kind")
                if kind == "plan":
                    answer.plan = plan_from_proto(message.plan)
                    half.on_plan(answer.plan)
                elif kind == "progress":
                    answer.progress_events += 1
                elif kind == "tensor_header":
                    header = message.tensor_header
                    if header.tensor_id in assemblers or header.tensor_id in names:
                        raise FramingError(f"edge announced tensor {header.name!r} twice", field="tensor_header")
                    if answer.plan is None:
                        raise FramingError(f"edge sent tensor {header.name!r} before its plan", field="tensor_header")
                    assemblers[header.tensor_id] = TensorAssembler(header, self.config.framing)
                    names[header.tensor_id] = header.name
                elif kind == "tensor_chunk":  # a chunk the zero-copy reader left to protobuf
                    add_chunk(message.tensor_chunk)
                elif kind == "report":
                    answer.report = message.report
                elif kind == "error":
                    pass  # the status that follows carries the same code and message
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        except MegError as exc:
            raise _EdgeBroke(f"edge sent unusable data: {exc.message}", field=exc.field) from exc
        if answer.report is None or answer.plan is None or assemblers:
            raise _EdgeBroke("edge stream ended without a complete answer (plan, tensors and report)")

    # -- the device partition ------------------------------------------------------------------

    def _device_context(self, device_profile: str | None) -> DeviceContext:
        with self._lock:
            if self._context is None:
                pipeline = self._pipeline
                if pipeline is None:
                    import meg.models  # noqa: F401  (registers meg-tiny as a model source)
                    from meg.split.loading import load_pipeline

                    pipeline = load_pipeline(self.config.model)
                device_vae = None
                if self.config.device_decoder:
                    from meg.models.registry import load_vae

                    device_vae = load_vae(self.config.model, self.config.device_decoder)
                self._context = DeviceContext(engine=SplitEngine(pipeline, device_vae=device_vae), runtime=self._runtime,
                                              device_profile=None, config=self.config)
        # one engine and runtime cache for every request; the profile is the request's
        return DeviceContext(engine=self._context.engine, runtime=self._runtime, device_profile=device_profile,
                             config=self.config, store=self._context.store)

    def _runtime(self, height: int, width: int, parts: tuple[str, ...], decoder: str | None = None) -> Any:
        """The device runtime for ``parts`` at one resolution (exports ONNX on first use),
        decoding with the VAE folder ``decoder`` of the model when given."""
        assert self._context is not None
        engine = self._context.engine
        key = (height, width, parts, decoder)
        with self._lock:
            if key not in self._runtimes:
                vae = engine.device_vae
                if decoder is not None:
                    from meg.models.registry import load_vae

                    vae = self._context.cached(f"vae:{decoder}", lambda: load_vae(self.config.model, decoder))
                if self.config.runtime == "eager" and decoder is None:
                    self._runtimes[key] = None
                elif self.config.runtime in ("torch", "eager"):
                    from meg.split.runtime import TorchRuntime

                    self._runtimes[key] = TorchRuntime(engine.device_unet, vae)
                else:
                    from meg.split.onnx_export import ExportOptions, export_device_partitions
                    from meg.split.runtime import OnnxRuntime

                    chosen = decoder or self.config.device_decoder
                    out_dir = Path(self.config.onnx_dir) / (f"{height}x{width}" + (f"-{chosen}" if chosen else ""))
                    export_device_partitions(engine.pipeline, out_dir=out_dir, height=height, width=width,
                                             parts=parts, unet=engine.device_unet, vae=vae,
                                             options=ExportOptions(exporter=self.config.onnx_exporter))
                    self._runtimes[key] = OnnxRuntime(out_dir)
            return self._runtimes[key]

    # -- the report ------------------------------------------------------------------------------

    def _report(self, request: gen_pb.GenerationRequest, recipe: Recipe, plan: Plan, answer: _EdgeAnswer,
                fallback_reason: str | None, output: DeviceOutput, *, edge_wall_s: float,
                wall_s: float) -> GenerationReport:
        edge = answer.report if fallback_reason is None else None
        parts: list[PartCost] = [PartCost.from_proto(c) for c in edge.costs] if edge is not None else []
        parts += output.parts
        tensors = [TensorRecord(name=name, codec_chain=enc.chain, shape=list(enc.shape),
                                dtype=str(enc.dtype).removeprefix("torch."),
                                raw_bytes=enc.numel * enc.dtype.itemsize, encoded_bytes=enc.bits_on_wire // 8)
                   for name, enc in answer.tensors] if edge is not None else []
        channel = channel_to_dict(edge.channel if edge is not None else request.channel)
        channel_record = ChannelRecord(
            **channel,
            downlink_airtime_s=edge.downlink_airtime_s if edge else 0.0,
            retransmissions=int(edge.retransmissions) if edge else 0,
            feature_snr_db=edge.feature_snr_db if edge and channel["mode"] == "analog" else None,
        )
        _, energy = GenerationReport.totals(parts)
        modelled_latency_s = recipe.modelled_latency_s(parts, output.extra)
        height, width = (int(s) for s in output.image.shape[-2:])
        return GenerationReport(
            request_id=request.request_id,
            recipe=recipe.name,
            prompt=request.prompt,
            seed=int(request.seed),
            width=width,
            height=height,
            edge_addresses=list(self.addresses),
            plan=plan.to_dict(),
            fallback=FallbackRecord(fallback_reason is not None, fallback_reason),
            channel=channel_record,
            bytes=BytesRecord(int(edge.downlink_bytes) if edge else 0, int(edge.uplink_bytes) if edge else 0, tensors),
            parts=parts,
            latency_s=LatencyRecord(modelled_total=modelled_latency_s, measured_edge_call=edge_wall_s,
                                    measured_wall=wall_s, measured_runtime_setup=output.setup_s),
            energy_j=energy,
            device=DeviceRecord(request.device_profile or None, output.runtime, list(output.providers)),
            extra=dict(output.extra),
        )
