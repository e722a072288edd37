"""`EdgeService.Generate`: runs the edge partition of one request and streams the cut.

One request, top to bottom (DESIGN.md §3):

1. read `start`, check it against `ServiceLimits` (INVALID_ARGUMENT naming the field);
2. take the plan: the request's override, else the policy (in-process or remote);
3. admit the request (RESOURCE_EXHAUSTED when the queue is full) and run the edge stages
   in a worker thread, streaming `Progress` events while it runs;
4. encode each crossing tensor with the plan's codec chain, frame it, push every chunk
   through the emulated link (airtime, retransmissions, feature noise) and send it;
5. send the `EdgeReport`.

Errors anywhere become one `Error` message plus the matching status (`meg.services.status`);
a client's cancellation or a passed deadline stops the worker at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc import aio

from meg.channel.link import LinkConfig, LinkEmulator
from meg.codecs.chain import EncodedTensor, encode, parse_chain
from meg.codecs.framing import TensorAssembler, frame_tensor
from meg.devices import load_profile
from meg.errors import (
    DeadlineExceededError,
    FramingError,
    InvalidInputError,
    MegError,
    ModelNotFoundError,
    UnavailableError,
)
from meg.services.admission import WorkerPool
from meg.services.convert import (
    channel_from_link_config,
    inputs_from_request,
    link_config_from_channel,
    split_from_proto,
)
from meg.services.edge_config import EdgeConfig
from meg.services.limits import validate_plan, validate_request
from meg.services.observability import ServiceMetrics, log_event, monotonic_s
from meg.services.rule_policy import RuleBasedPolicy
from meg.services.security import channel_credentials, token_metadata
from meg.services.status import FIELD_METADATA_KEY, error_message, error_proto, grpc_code_for
from meg.services.transport import (
    channel_options,
)
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.points import SplitPoint
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import edge_service_pb2_grpc as edge_grpc
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb
from meg.v1 import policy_service_pb2_grpc as policy_grpc

__all__ = ["CancelledByClient", "EdgeServicer", "PlanSource"]

_log = logging.getLogger("meg.services.edge")


class CancelledByClient(MegError):
    """The client sent `Cancel` on the request stream (answered with CANCELLED)."""


@dataclass
class _Job:
    """State shared between a request's coroutine, its reader task and its worker thread."""

    request_id: str
    deadline_at: float
    stop: threading.Event = field(default_factory=threading.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    uplink_bytes: int = 0

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()
        self.failed.set()

    def should_stop(self) -> bool:
        return self.stop.is_set() or time.monotonic() > self.deadline_at


@dataclass
class _EdgeOutput:
    """What the worker thread hands back to the coroutine."""

    encoded: dict[str, EncodedTensor]
    compute_s: float
    encode_s: float
    analog_airtime_s: float = 0.0
    analog_energy_j: float = 0.0
    feature_snr_db: float = 0.0


class PlanSource:
    """Where plans come from: an in-process policy, or a remote `PolicyService`."""

    def __init__(self, config: EdgeConfig, policy: Any) -> None:
        self.policy = policy or RuleBasedPolicy()
        self.address = config.policy_address
        self.timeout_s = config.policy_timeout_s
        self.metadata = token_metadata(config.policy_token)
        self.tls = config.policy_tls
        self._channel: aio.Channel | None = None
        self._stub: policy_grpc.PolicyServiceStub | None = None
        self._max_message_bytes = config.limits.max_message_bytes

    async def decide(self, observation: policy_pb.Observation) -> tuple[gen_pb.Plan, float]:
        """The plan and the policy's decision time in seconds (measured in-process, or as
        the policy service reports it)."""
        if self.address is None:
            start = monotonic_s()
            plan = self.policy.decide(observation)
            return plan, monotonic_s() - start
        if self._stub is None:
            options = channel_options(self._max_message_bytes)
            self._channel = (
                aio.secure_channel(self.address, channel_credentials(self.tls), options=options)
                if self.tls is not None
                else aio.insecure_channel(self.address, options=options)
            )
            self._stub = policy_grpc.PolicyServiceStub(self._channel)
        try:
            response = await self._stub.Decide(
                policy_pb.DecideRequest(observation=observation), timeout=self.timeout_s, metadata=self.metadata
            )
        except aio.AioRpcError as exc:
            raise UnavailableError(
                f"policy service at {self.address!r} failed: {exc.code().name}: {exc.details()}"
            ) from exc
        return response.plan, response.decision_latency_s

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class EdgeServicer(edge_grpc.EdgeServiceServicer):
    """Implements `Generate`; model work goes to the worker pool."""

    def __init__(self, config: EdgeConfig, plans: PlanSource, metrics: ServiceMetrics) -> None:
        self.config = config
        self.plans = plans
        self.metrics = metrics
        self.engine: SplitEngine | None = None
        self.pool: WorkerPool | None = None

    # -- the RPC ---------------------------------------------------------------------------

    async def Generate(  # noqa: N802 - name fixed by the proto
        self, request_iterator: AsyncIterator[edge_pb.GenerateRequest], context: aio.ServicerContext
    ) -> None:
        started = monotonic_s()
        job: _Job | None = None
        bytes_sent = 0
        try:
            if self.engine is None or self.pool is None:
                raise UnavailableError("edge is not ready: the model is still loading")
            try:
                first = await anext(aiter(request_iterator))
            except StopAsyncIteration:
                raise InvalidInputError("request stream ended before a 'start' message", field="start") from None
            kind = first.WhichOneof("kind")
            if kind != "start":
                raise InvalidInputError(f"first message must be 'start', got {kind!r}", field="kind")
            request = first.start
            validate_request(request, self.config.limits)
            remaining = context.time_remaining()
            budget_s = min(self.config.max_request_s, remaining if remaining is not None else math.inf)
            job = _Job(request_id=request.request_id or uuid.uuid4().hex, deadline_at=time.monotonic() + budget_s)
            job.uplink_bytes = first.ByteSize()
            log_event(_log, "generate.start", request_id=job.request_id, prompt_chars=len(request.prompt), deadline_s=round(budget_s, 3))
            reader = asyncio.create_task(self._read_uplink(request_iterator, job))
            try:
                bytes_sent = await self._generate(request, job, context)
            finally:
                reader.cancel()
        except asyncio.CancelledError:
            if job is not None:
                job.stop.set()
            self.metrics.observe(latency_s=monotonic_s() - started, code="CANCELLED")
            log_event(_log, "generate.cancelled", request_id=job.request_id if job else "")
            raise
        except Exception as exc:  # the one boundary where exceptions become statuses
            if job is not None:
                job.stop.set()
            await self._answer_error(exc, context, job, started)
            return
        self.metrics.observe(latency_s=monotonic_s() - started, code="OK", bytes_sent=bytes_sent)
        log_event(_log, "generate.done", request_id=job.request_id, latency_s=round(monotonic_s() - started, 4), downlink_bytes=bytes_sent)

    async def _answer_error(self, exc: Exception, context: aio.ServicerContext, job: _Job | None, started: float) -> None:
        code = grpc.StatusCode.CANCELLED if isinstance(exc, CancelledByClient) else grpc_code_for(exc)
        request_id = job.request_id if job else ""
        self.metrics.observe(latency_s=monotonic_s() - started, code=code.name)
        if isinstance(exc, MegError):
            log_event(_log, "generate.error", level=logging.WARNING, request_id=request_id, code=code.name, error=error_message(exc))
        else:
            _log.exception("generate.internal_error", extra={"request_id": request_id})
        field_name = exc.field if isinstance(exc, MegError) and exc.field else ""
        # the stream may already be gone; the status still goes out
        with contextlib.suppress(Exception):
            await context.write(edge_pb.GenerateResponse(error=error_proto(exc)))
        if field_name:
            context.set_trailing_metadata(((FIELD_METADATA_KEY, field_name),))
        await context.abort(code, error_message(exc))

    # -- uplink ----------------------------------------------------------------------------

    async def _read_uplink(self, request_iterator: AsyncIterator[edge_pb.GenerateRequest], job: _Job) -> None:
        """Read what follows `start`: cancellation, or tensors framed like the downlink.

        Uplink tensors go through the same checks as every framed tensor (header before
        allocation, order, duplicates, sizes, CRC32C, codec chain). The MEG recipe
        consumes none, so a complete and valid uplink tensor is refused by name.
        """
        assemblers: dict[int, TensorAssembler] = {}
        names: dict[int, str] = {}
        try:
            async for message in request_iterator:
                job.uplink_bytes += message.ByteSize()
                kind = message.WhichOneof("kind")
                if kind == "cancel":
                    job.fail(CancelledByClient(f"cancelled by the client: {message.cancel.reason or 'no reason given'}"))
                    return
                if kind == "tensor_header":
                    header = message.tensor_header
                    if header.tensor_id in assemblers:
                        raise FramingError(f"tensor_id {header.tensor_id} announced twice", field="tensor_header.tensor_id")
                    with _field_prefix("tensor_header"):
                        assemblers[header.tensor_id] = TensorAssembler(header, self.config.uplink_limits)
                    names[header.tensor_id] = header.name
                elif kind == "tensor_chunk":
                    chunk = message.tensor_chunk
                    assembler = assemblers.get(chunk.tensor_id)
                    if assembler is None:
                        raise FramingError(f"chunk for tensor_id {chunk.tensor_id} before its header", field="tensor_chunk.tensor_id")
                    with _field_prefix("tensor_chunk"):
                        complete = assembler.add(chunk)
                        if complete:  # checksum and sizes are verified even for a refused tensor
                            assembler.result()
                    if complete:
                        raise InvalidInputError(
                            f"uplink tensor {names[chunk.tensor_id]!r} is not taken by the MEG recipe "
                            "(it consumes no uplink tensors)",
                            field="tensor_header.name",
                        )
                else:
                    raise InvalidInputError(f"unexpected {kind!r} message after 'start'", field="kind")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.fail(exc)

    # -- the generation --------------------------------------------------------------------

    async def _generate(self, request: gen_pb.GenerationRequest, job: _Job, context: aio.ServicerContext) -> int:
        assert self.engine is not None and self.pool is not None
        config = self.config
        decision_s = 0.0
        if request.HasField("plan_override"):
            plan = gen_pb.Plan()
            plan.CopyFrom(request.plan_override)
            plan.policy = plan.policy or "override"
            plan_field = "plan_override"
        else:
            plan, decision_s = await self._await_or_fail(self.plans.decide(self._observation(request)), job)
            plan_field = "plan"
        validate_plan(plan, config.limits, field=plan_field)
        split = split_from_proto(plan.split, field=f"{plan_field}.split")
        inputs = inputs_from_request(request, int(plan.steps))
        chain = _chain_spec(plan, plan_field)
        link = dataclasses.replace(link_config_from_channel(request.channel, config.link), realtime=config.realtime)
        if request.model and request.model != config.model:
            raise ModelNotFoundError(
                f"model {request.model!r} is not served here (this edge serves {config.model!r})", field="model"
            )
        if request.device_profile:
            load_profile(request.device_profile)  # unknown names fail here, naming the profile
        self.engine.crossing(split, inputs)  # an impossible split fails here, before queueing
        await context.write(edge_pb.GenerateResponse(plan=plan))

        # Link emulators per request and direction, seeded from the request for reproducibility.
        downlink = LinkEmulator(link, generator=torch.Generator().manual_seed(inputs.seed + 1))
        # the uplink carries only the request (bytes): analog transmission does not apply
        uplink_link = dataclasses.replace(link, mode="ideal" if link.mode == "analog" else link.mode, realtime=False)
        uplink = LinkEmulator(uplink_link, generator=torch.Generator().manual_seed(inputs.seed + 2))

        slot = self.pool.admit()
        try:
            progress: asyncio.Queue[edge_pb.GenerateResponse] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            started = monotonic_s()

            def on_progress(stage: str, step: int, total: int) -> None:
                event = gen_pb.Progress(stage=stage, step=step, total_steps=total, elapsed_s=monotonic_s() - started)
                loop.call_soon_threadsafe(progress.put_nowait, edge_pb.GenerateResponse(progress=event))

            work = asyncio.ensure_future(
                self.pool.run(slot, lambda: self._edge_work(inputs, split, plan, chain, job, on_progress, downlink, link))
            )
            output = await self._forward_progress(work, progress, job, context)
        finally:
            slot.release()

        sent_bytes = 0
        airtime_s = output.analog_airtime_s
        link_energy_j = output.analog_energy_j
        retransmissions = 0
        for tensor_id, (name, encoded) in enumerate(output.encoded.items()):
            header, chunks = frame_tensor(
                encoded, request_id=job.request_id, tensor_id=tensor_id, name=name, chunk_size_bytes=config.chunk_size_bytes
            )
            messages = [edge_pb.GenerateResponse(tensor_header=header)]
            messages += [edge_pb.GenerateResponse(tensor_chunk=c) for c in chunks]
            for message in messages:
                size = message.ByteSize()
                # analog mode carries the values as symbols; only headers (side information) go as packets
                if link.mode != "analog" or message.HasField("tensor_header"):
                    report = await self._send_packets(downlink, size, link.mode, link.realtime)
                    airtime_s += report.airtime_s
                    link_energy_j += report.energy_j
                    retransmissions += report.retransmissions
                if job.error is not None:
                    raise job.error
                await context.write(message)
                sent_bytes += size
            await context.write(edge_pb.GenerateResponse(progress=gen_pb.Progress(
                stage="send", step=tensor_id + 1, total_steps=len(output.encoded), elapsed_s=monotonic_s() - started)))

        uplink_report = await self._send_packets(uplink, job.uplink_bytes, uplink_link.mode, False)
        report = gen_pb.EdgeReport(
            request_id=job.request_id,
            plan=plan,
            channel=request.channel,
            downlink_bytes=sent_bytes,
            uplink_bytes=job.uplink_bytes,
            downlink_airtime_s=airtime_s,
            retransmissions=retransmissions,
            feature_snr_db=output.feature_snr_db,
            costs=self._costs(split, inputs, float(plan.tome_ratio), output, airtime_s, link_energy_j, uplink_report,
                              decision_s),
        )
        report.channel.mode = channel_from_link_config(link).mode  # the mode actually emulated
        await context.write(edge_pb.GenerateResponse(report=report))
        return sent_bytes

    async def _await_or_fail(self, awaitable: Any, job: _Job) -> Any:
        """Await `awaitable`, unless the reader reports a failure first (then raise it)."""
        task = asyncio.ensure_future(awaitable)
        failed = asyncio.ensure_future(job.failed.wait())
        try:
            await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
        if not task.done():
            task.cancel()
            assert job.error is not None
            raise job.error
        return task.result()

    async def _forward_progress(
        self,
        work: asyncio.Future[_EdgeOutput],
        progress: asyncio.Queue[edge_pb.GenerateResponse],
        job: _Job,
        context: aio.ServicerContext,
    ) -> _EdgeOutput:
        """Send progress events while the worker runs; return its output."""
        try:
            while True:
                getter = asyncio.ensure_future(progress.get())
                failed = asyncio.ensure_future(job.failed.wait())
                waiting: set[asyncio.Future[Any]] = {work, getter, failed}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
                if getter in done:
                    await context.write(getter.result())
                else:
                    getter.cancel()
                if job.error is not None:
                    raise job.error
                if work.done():
                    while not progress.empty():
                        await context.write(progress.get_nowait())
                    return work.result()
        finally:
            if not work.done():
                job.stop.set()
                work.cancel()

    async def _send_packets(self, emulator: LinkEmulator, size_bytes: int, mode: str, realtime: bool) -> Any:
        """Account one message on the link as packets of `packet_payload_bytes`."""
        step = self.config.packet_payload_bytes
        sizes = [min(step, size_bytes - offset) for offset in range(0, size_bytes, step)] or [0]
        if mode == "ideal" and not realtime:
            return emulator.send_packets(sizes)
        # per-packet error draws (and real-time sleeping) stay off the event loop
        return await asyncio.to_thread(emulator.send_packets, sizes)

    def _edge_work(
        self,
        inputs: GenerationInputs,
        split: SplitPoint,
        plan: gen_pb.Plan,
        chain: str,
        job: _Job,
        on_progress: Callable[[str, int, int], None],
        downlink: LinkEmulator,
        link: LinkConfig,
    ) -> _EdgeOutput:
        """Worker thread: run the edge stages, then (analog mode) the link, then encode."""
        assert self.engine is not None
        if job.should_stop():
            raise DeadlineExceededError(f"request {job.request_id} ran out of time while queued")
        start = monotonic_s()
        crossing = self.engine.run_edge(
            inputs, split, tome_ratio=float(plan.tome_ratio), on_progress=on_progress, should_stop=job.should_stop
        )
        compute_s = monotonic_s() - start
        output = _EdgeOutput(encoded={}, compute_s=compute_s, encode_s=0.0)
        if link.mode == "analog":
            # the values themselves cross as noisy symbols (before any merging or quantising)
            snr_weighted, numel = 0.0, 0
            for name, tensor in crossing.items():
                if tensor.is_floating_point():
                    crossing[name], report = downlink.send_analog(tensor)
                    output.analog_airtime_s += report.airtime_s
                    output.analog_energy_j += report.energy_j
                    snr_weighted += report.feature_snr_db * tensor.numel()
                    numel += tensor.numel()
            output.feature_snr_db = snr_weighted / numel if numel else 0.0
        start = monotonic_s()
        for name, tensor in crossing.items():
            generator = torch.Generator().manual_seed(inputs.seed)
            output.encoded[name] = encode(tensor, _chain_for(name, chain, plan.merge_ratio), generator=generator)
        output.encode_s = monotonic_s() - start
        return output

    def _costs(self, split: SplitPoint, inputs: GenerationInputs, tome_ratio: float, output: _EdgeOutput,
               airtime_s: float, link_energy_j: float, uplink_report: Any,
               decision_s: float) -> list[gen_pb.PartCost]:
        assert self.engine is not None
        flops = self.engine.flops(split, inputs, tome_ratio=tome_ratio)  # cached by the engine
        profile = load_profile(self.config.edge_profile)
        return [
            gen_pb.PartCost(part="policy.decide", profile="this-machine", latency_s=decision_s, measured=True),
            gen_pb.PartCost(part="edge.compute", profile="this-machine", latency_s=output.compute_s,
                            flops=flops.edge_flops, measured=True),
            gen_pb.PartCost(part="edge.encode", profile="this-machine", latency_s=output.encode_s, measured=True),
            gen_pb.PartCost(part="edge.compute", profile=profile.name, latency_s=profile.compute_latency_s(flops.edge_flops) if flops.edge_flops else 0.0,
                            energy_j=profile.compute_energy_j(flops.edge_flops) if flops.edge_flops else 0.0,
                            flops=flops.edge_flops, measured=False),
            gen_pb.PartCost(part="link.downlink", profile="link", latency_s=airtime_s, energy_j=link_energy_j, measured=False),
            gen_pb.PartCost(part="link.uplink", profile="link", latency_s=uplink_report.airtime_s,
                            energy_j=uplink_report.energy_j, measured=False),
        ]

    @staticmethod
    def _observation(request: gen_pb.GenerationRequest) -> policy_pb.Observation:
        return policy_pb.Observation(
            channel=request.channel,
            width=request.width,
            height=request.height,
            limits=request.limits,
            device_profile=request.device_profile,
            recipe=request.recipe,
        )


@contextlib.contextmanager
def _field_prefix(prefix: str) -> Iterator[None]:
    """Qualify the `field` of a framing error with the message it came from."""
    try:
        yield
    except MegError as exc:
        if exc.field and not exc.field.startswith(prefix):
            exc.field = f"{prefix}.{exc.field}"
        raise


def _chain_spec(plan: gen_pb.Plan, plan_field: str) -> str:
    """Canonical codec chain of the plan; an unknown chain raises `CodecError` naming it."""
    spec = plan.codec_chain or "none"
    try:
        return parse_chain(spec).spec
    except MegError as exc:
        exc.field = f"{plan_field}.codec_chain"
        raise


def _chain_for(name: str, chain: str, merge_ratio: float) -> str:
    """The chain for one crossing tensor: the final latent is token-merged first (MEG)."""
    if name == "latents" and merge_ratio > 0 and not chain.startswith("merge"):
        return f"merge:{merge_ratio:g}" if chain == "none" else f"merge:{merge_ratio:g},{chain}"
    return chain
