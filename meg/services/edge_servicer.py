"""`EdgeService.Generate`: runs a recipe's edge half for one request and streams the cut.

One request, top to bottom (DESIGN.md §3). The servicer knows no recipe: it dispatches
on `GenerationRequest.recipe` (`meg.recipes.registry`) and does the same for every one:

1. read `start`, check it against `ServiceLimits` (INVALID_ARGUMENT naming the field) and
   find its recipe;
2. take the plan: the request's override, else the policy (in-process or remote); the
   recipe checks it before anything is queued;
3. admit the request (RESOURCE_EXHAUSTED when the queue is full) and run the recipe's edge
   half in a worker thread; every tensor it yields (already through the feature path) is
   framed, pushed through the emulated link (packets, airtime, retransmissions) and sent at
   once, interleaved with `Progress` events; uplink tensors the recipe takes arrive in its
   inbox meanwhile;
4. send the `EdgeReport`: the recipe's compute parts, the link's and the policy's.

Errors anywhere become one `Error` message plus the matching status (`meg.services.status`);
a client's cancellation or a passed deadline stops the worker at its next check.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc import aio

from meg.channel.link import DigitalReport, LinkEmulator
from meg.codecs.framing import MAX_CHUNK_BYTES, TensorAssembler, frame_tensor
from meg.convert import channel_from_link_config, link_config_from_channel
from meg.devices import load_profile
from meg.errors import (
    CancelledByClient,
    FramingError,
    InvalidInputError,
    MegError,
    ModelNotFoundError,
    UnavailableError,
)
from meg.recipes.base import EdgeContext, EdgeJob, Outgoing, Recipe, UplinkInbox
from meg.recipes.plan import plan_from_proto, plan_to_proto
from meg.recipes.registry import recipe_for
from meg.recipes.report import PartCost
from meg.services.admission import WorkerPool
from meg.services.edge_config import EdgeConfig
from meg.services.limits import validate_plan, validate_request
from meg.services.observability import ServiceMetrics, log_event, monotonic_s
from meg.services.security import channel_credentials, token_metadata
from meg.services.status import (
    FIELD_METADATA_KEY,
    REPLICA_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    error_message,
    error_proto,
    grpc_code_for,
)
from meg.services.transport import channel_options
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import edge_service_pb2_grpc as edge_grpc
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb
from meg.v1 import policy_service_pb2_grpc as policy_grpc

__all__ = ["EdgeServicer", "PlanSource"]

_log = logging.getLogger("meg.services.edge")
_DONE = object()  # end of the worker's stream of events


@dataclass
class _Job:
    """State shared between a request's coroutine, its reader task and its worker thread."""

    request_id: str
    deadline_at: float
    stop: threading.Event = field(default_factory=threading.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    uplink_bytes: int = 0
    inbox: UplinkInbox = field(default_factory=UplinkInbox)
    started_s: float = field(default_factory=monotonic_s)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()
        self.failed.set()
        self.inbox.close()

    def should_stop(self) -> bool:
        return self.stop.is_set() or time.monotonic() > self.deadline_at


@dataclass
class _LinkTally:
    """What the downlink cost so far."""

    airtime_s: float = 0.0
    energy_j: float = 0.0
    retransmissions: int = 0
    sent_bytes: int = 0
    feature_snr_sum: float = 0.0
    feature_numel: int = 0

    def add_packets(self, report: DigitalReport) -> None:
        self.airtime_s += report.airtime_s
        self.energy_j += report.energy_j
        self.retransmissions += report.retransmissions

    def add_analog(self, outgoing: Outgoing) -> None:
        sent = outgoing.sent
        self.airtime_s += sent.airtime_s
        self.energy_j += sent.energy_j
        if sent.feature_snr_db is not None:
            self.feature_snr_sum += sent.feature_snr_db * sent.encoded.numel
            self.feature_numel += sent.encoded.numel

    @property
    def feature_snr_db(self) -> float:
        return self.feature_snr_sum / self.feature_numel if self.feature_numel else 0.0


class PlanSource:
    """Where plans come from: an in-process policy, or a remote `PolicyService`."""

    def __init__(self, config: EdgeConfig, policy: Any) -> None:
        if policy is None:
            from meg.policy.serving import rule_policy

            policy = rule_policy()
        self.policy = policy
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
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UnavailableError(
                    f"policy service at {self.address!r} failed: {exc.code().name}: {exc.details()}"
                ) from exc
            # down or too slow: the in-process policy plans, and the plan says so
            start = monotonic_s()
            plan = self.policy.decide(observation)
            plan.policy = f"{plan.policy or 'in-process'} (policy service {exc.code().name.lower()})"
            log_event(_log, "policy.fallback", level=logging.WARNING, address=self.address, code=exc.code().name)
            return plan, monotonic_s() - start
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
        self.replica = ""
        """This edge's name, sent to every caller as initial metadata `meg-replica`."""
        self.context: EdgeContext | None = None
        self.pool: WorkerPool | None = None

    # -- the RPC ---------------------------------------------------------------------------

    async def Generate(  # noqa: N802 - name fixed by the proto
        self, request_iterator: AsyncIterator[edge_pb.GenerateRequest], context: aio.ServicerContext
    ) -> None:
        started = monotonic_s()
        job: _Job | None = None
        bytes_sent = 0
        try:
            if self.context is None or self.pool is None:
                raise UnavailableError("edge is not ready: the model is still loading")
            await context.send_initial_metadata(((REPLICA_METADATA_KEY, self.replica),))
            request_iterator = _parsed(request_iterator)
            try:
                first = await anext(aiter(request_iterator))
            except StopAsyncIteration:
                raise InvalidInputError("request stream ended before a 'start' message", field="start") from None
            kind = first.WhichOneof("kind")
            if kind != "start":
                raise InvalidInputError(f"first message must be 'start', got {kind!r}", field="kind")
            request = first.start
            validate_request(request, self.config.limits)
            recipe = recipe_for(request.recipe)
            remaining = context.time_remaining()
            budget_s = min(self.config.max_request_s, remaining if remaining is not None else math.inf)
            job = _Job(request_id=request.request_id or uuid.uuid4().hex, deadline_at=time.monotonic() + budget_s)
            job.uplink_bytes = first.ByteSize()
            log_event(_log, "generate.start", request_id=job.request_id, recipe=recipe.name,
                      prompt_chars=len(request.prompt), deadline_s=round(budget_s, 3))
            reader = asyncio.create_task(self._read_uplink(request_iterator, job, recipe))
            try:
                bytes_sent = await self._generate(request, recipe, job, context)
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
        log_event(_log, "generate.done", request_id=job.request_id, latency_s=round(monotonic_s() - started, 4),
                  downlink_bytes=bytes_sent)

    async def _answer_error(self, exc: Exception, context: aio.ServicerContext, job: _Job | None, started: float) -> None:
        code = grpc_code_for(exc)
        request_id = job.request_id if job else ""
        self.metrics.observe(latency_s=monotonic_s() - started, code=code.name)
        if isinstance(exc, MegError):
            log_event(_log, "generate.error", level=logging.WARNING, request_id=request_id, code=code.name,
                      error=error_message(exc))
        else:
            _log.exception("generate.internal_error", extra={"request_id": request_id})
        field_name = exc.field if isinstance(exc, MegError) and exc.field else ""
        # the stream may already be gone; the status still goes out
        with contextlib.suppress(Exception):
            await context.write(edge_pb.GenerateResponse(error=error_proto(exc)))
        trailing = []
        if field_name:
            trailing.append((FIELD_METADATA_KEY, field_name))
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            trailing.append((RETRY_AFTER_METADATA_KEY, str(max(1, round(retry_after * 1000)))))
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        await context.abort(code, error_message(exc))

    # -- uplink ----------------------------------------------------------------------------

    async def _read_uplink(self, request_iterator: AsyncIterator[edge_pb.GenerateRequest], job: _Job,
                           recipe: Recipe) -> None:
        """Read what follows `start`: cancellation, or tensors framed like the downlink.

        Uplink tensors go through the same checks as every framed tensor (header before
        allocation, order, duplicates, sizes, CRC32C, codec chain); a complete tensor goes
        to the recipe's inbox when the recipe takes that name, else it is refused by name.
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
                    if header.tensor_id in assemblers or header.tensor_id in names:
                        raise FramingError(f"tensor_id {header.tensor_id} announced twice", field="tensor_header.tensor_id")
                    with _field_prefix("tensor_header"):
                        assemblers[header.tensor_id] = TensorAssembler(header, self.config.uplink_limits)
                    names[header.tensor_id] = header.name
                elif kind == "tensor_chunk":
                    chunk = message.tensor_chunk
                    assembler = assemblers.get(chunk.tensor_id)
                    if assembler is None:
                        raise FramingError(f"chunk for tensor_id {chunk.tensor_id} before its header",
                                           field="tensor_chunk.tensor_id")
                    with _field_prefix("tensor_chunk"):
                        complete = assembler.add(chunk)
                        # checksum and sizes are verified even for a tensor refused by name
                        tensor = assemblers.pop(chunk.tensor_id).result() if complete else None
                    if tensor is not None:
                        name = names[chunk.tensor_id]
                        if name not in recipe.uplink_names:
                            taken = ", ".join(recipe.uplink_names) or "none"
                            raise InvalidInputError(
                                f"uplink tensor {name!r} is not taken by the {recipe.name} recipe (it takes: {taken})",
                                field="tensor_header.name",
                            )
                        job.inbox.put(name, tensor)
                else:
                    raise InvalidInputError(f"unexpected {kind!r} message after 'start'", field="kind")
            job.inbox.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            job.fail(exc)

    # -- the generation --------------------------------------------------------------------

    async def _generate(self, request: gen_pb.GenerationRequest, recipe: Recipe, job: _Job,
                        context: aio.ServicerContext) -> int:
        assert self.context is not None and self.pool is not None
        config = self.config
        decision_s = 0.0
        if request.HasField("plan_override"):
            wire_plan = gen_pb.Plan()
            wire_plan.CopyFrom(request.plan_override)
            wire_plan.policy = wire_plan.policy or "override"
            plan_field = "plan_override"
        else:
            wire_plan, decision_s = await self._await_or_fail(self.plans.decide(_observation(request)), job)
            plan_field = "plan"
        validate_plan(wire_plan, config.limits, field=plan_field)
        plan = plan_from_proto(wire_plan, field=plan_field)
        link = dataclasses.replace(link_config_from_channel(request.channel, config.link), realtime=config.realtime)
        if request.model and request.model != config.model:
            raise ModelNotFoundError(
                f"model {request.model!r} is not served here (this edge serves {config.model!r})", field="model"
            )
        if request.device_profile:
            load_profile(request.device_profile)  # unknown names fail here, naming the profile
        with _field_prefix(plan_field, only="plan."):
            recipe.check_plan(self.context, request, plan)  # an impossible plan fails here, before queueing
        await context.write(edge_pb.GenerateResponse(plan=plan_to_proto(plan)))

        # Link emulators per request and direction, seeded from the request for reproducibility.
        downlink = LinkEmulator(link, generator=torch.Generator().manual_seed(int(request.seed) + 1))
        # the uplink carries the request and any uplink tensors as packets (analog applies to the downlink)
        uplink_link = dataclasses.replace(link, mode="ideal" if link.mode == "analog" else link.mode, realtime=False)
        uplink = LinkEmulator(uplink_link, generator=torch.Generator().manual_seed(int(request.seed) + 2))

        events: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        started = monotonic_s()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        def on_progress(stage: str, step: int, total: int) -> None:
            emit(gen_pb.Progress(stage=stage, step=step, total_steps=total, elapsed_s=monotonic_s() - started))

        edge_job = EdgeJob(request_id=job.request_id, request=request, plan=plan, link=link, downlink=downlink,
                           on_progress=on_progress, should_stop=job.should_stop, uplink=job.inbox)

        queued_at = time.perf_counter()
        waited: list[float] = []

        def work() -> None:
            waited.append(time.perf_counter() - queued_at)
            try:
                for outgoing in recipe.run_edge(self.context, edge_job):  # type: ignore[arg-type]
                    emit(outgoing)
            finally:
                emit(_DONE)

        tally = _LinkTally()
        slot = self.pool.admit()
        try:
            future = asyncio.ensure_future(self.pool.run(slot, work))
            # when the request fails first (e.g. a broken uplink), the work's own exception is
            # expected and already answered: retrieve it so asyncio does not report it
            future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
            await self._stream_events(future, events, job, context, downlink, tally)
        finally:
            slot.release()

        uplink_report = await self._send_packets(uplink, job.uplink_bytes, uplink_link.mode, False)
        costs = [PartCost("policy.decide", "this-machine", decision_s, measured=True),
                 PartCost("edge.queue", "this-machine", waited[0] if waited else 0.0, measured=True), *edge_job.costs,
                 PartCost("link.downlink", "link", tally.airtime_s, tally.energy_j),
                 PartCost("link.uplink", "link", uplink_report.airtime_s, uplink_report.energy_j)]
        report = gen_pb.EdgeReport(
            request_id=job.request_id,
            plan=plan_to_proto(plan),
            channel=request.channel,
            downlink_bytes=tally.sent_bytes,
            uplink_bytes=job.uplink_bytes,
            downlink_airtime_s=tally.airtime_s,
            retransmissions=tally.retransmissions,
            feature_snr_db=tally.feature_snr_db,
            costs=[cost.to_proto() for cost in costs],
        )
        report.channel.mode = channel_from_link_config(link).mode  # the mode actually emulated
        await context.write(edge_pb.GenerateResponse(report=report))
        return tally.sent_bytes

    async def _stream_events(self, work: asyncio.Future[Any], events: asyncio.Queue[Any], job: _Job,
                             context: aio.ServicerContext, downlink: LinkEmulator, tally: _LinkTally) -> None:
        """Send the worker's events as they come (progress, framed tensors) until it is done."""
        tensor_id = 0
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                failed = asyncio.ensure_future(job.failed.wait())
                done, _ = await asyncio.wait({getter, failed}, return_when=asyncio.FIRST_COMPLETED)
                failed.cancel()
                if getter not in done:
                    getter.cancel()
                if job.error is not None:
                    raise job.error
                item = getter.result()
                if item is _DONE:
                    await work  # the worker's own error, if any
                    return
                if isinstance(item, gen_pb.Progress):
                    await context.write(edge_pb.GenerateResponse(progress=item))
                    continue
                await self._send_tensor(item, tensor_id, job, context, downlink, tally)
                tensor_id += 1
                await context.write(edge_pb.GenerateResponse(progress=gen_pb.Progress(
                    stage="send", step=tensor_id, total_steps=0, elapsed_s=monotonic_s() - job.started_s)))
        finally:
            if not work.done():
                job.stop.set()
                work.cancel()

    async def _send_tensor(self, outgoing: Outgoing, tensor_id: int, job: _Job, context: aio.ServicerContext,
                           downlink: LinkEmulator, tally: _LinkTally) -> None:
        """Frame one tensor and send it; digital/ideal links carry every message as packets,
        analog links carry the values as symbols (already counted) and only headers as packets."""
        chunk_size_bytes = MAX_CHUNK_BYTES if self.config.chunk_size_bytes is None else self.config.chunk_size_bytes
        header, chunks = frame_tensor(outgoing.sent.encoded, request_id=job.request_id, tensor_id=tensor_id,
                                      name=outgoing.name, chunk_size_bytes=chunk_size_bytes)
        mode = downlink.config.mode
        tally.add_analog(outgoing)
        messages = [edge_pb.GenerateResponse(tensor_header=header)]
        messages += [edge_pb.GenerateResponse(tensor_chunk=c) for c in chunks]
        for message in messages:
            size = message.ByteSize()
            if mode != "analog" or message.HasField("tensor_header"):
                tally.add_packets(await self._send_packets(downlink, size, mode, downlink.config.realtime))
            if job.error is not None:
                raise job.error
            await context.write(message)
            tally.sent_bytes += size

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

    async def _send_packets(self, emulator: LinkEmulator, size_bytes: int, mode: str, realtime: bool) -> DigitalReport:
        """Account one message on the link as packets of `packet_payload_bytes`."""
        step = self.config.packet_payload_bytes
        sizes = [min(step, size_bytes - offset) for offset in range(0, size_bytes, step)] or [0]
        if mode == "ideal" and not realtime:
            return emulator.send_packets(sizes)
        # per-packet error draws (and real-time sleeping) stay off the event loop
        return await asyncio.to_thread(emulator.send_packets, sizes)


async def _parsed(messages: AsyncIterator[edge_pb.GenerateRequest]) -> AsyncIterator[edge_pb.GenerateRequest]:
    """The request stream, with bytes that do not parse as a `GenerateRequest` turned into
    the client's error (INVALID_ARGUMENT) instead of a server one."""
    iterator = aiter(messages)
    while True:
        try:
            message = await anext(iterator)
        except StopAsyncIteration:
            return
        except DecodeError as exc:
            raise InvalidInputError(f"a request message is not a valid meg.v1.GenerateRequest ({exc})",
                                    field="request") from None
        yield message


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
def _field_prefix(prefix: str, *, only: str = "") -> Iterator[None]:
    """Qualify the `field` of an error with the message it came from (for fields starting
    with ``only``, replacing that start, when given)."""
    try:
        yield
    except MegError as exc:
        if exc.field and not exc.field.startswith(prefix):
            if only:
                if exc.field.startswith(only):
                    exc.field = f"{prefix}.{exc.field[len(only):]}"
            else:
                exc.field = f"{prefix}.{exc.field}"
        raise
