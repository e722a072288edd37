"""`PolicyService` over gRPC: `Decide(observation) -> plan` for edges that ask remotely, and
`DecideBatch(observations) -> plans` for requests that share the edge and are planned together.

The servicer is thin: it calls any `meg.policy.Policy` (by default the rule-based one)
and times the decision; `DecideBatch` calls the policy's `decide_batch` when it has one
(a joint decision, e.g. the Hybrid SR controller), else `decide` on each observation. `create_policy_server` builds the server without starting it;
`serve_policy` runs one until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from meg.errors import ResourceExhaustedError
from meg.services.limits import ServiceLimits, validate_plan
from meg.services.observability import ServiceMetrics, log_event, monotonic_s
from meg.services.security import TlsConfig
from meg.services.status import error_message, grpc_code_for
from meg.services.transport import (
    BoundServer,
    bind_server,
    enable_health_and_reflection,
    set_serving,
    stop_signal,
)
from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb
from meg.v1 import policy_service_pb2_grpc as policy_grpc

__all__ = ["PolicyServer", "PolicyServerConfig", "create_policy_server", "serve_policy"]

_log = logging.getLogger("meg.services.policy")
SERVICE_NAME = policy_pb.DESCRIPTOR.services_by_name["PolicyService"].full_name


@dataclass(frozen=True)
class PolicyServerConfig:
    """Where and how `meg serve policy` listens."""

    host: str = "127.0.0.1"
    """Interface to bind ("0.0.0.0" for all)."""
    port: int = 50052
    """Port to bind; 0 picks a free one."""
    token: str | None = None
    insecure: bool = False
    """Allow a non-loopback `host` without TLS or a token."""
    """Bearer token callers must present; None turns auth off."""
    tls: TlsConfig | None = None
    """Certificate files; None serves plaintext."""
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    """Bounds every returned plan is checked against."""
    metrics_port: int | None = None
    """Port of a Prometheus `/metrics` endpoint; None turns it off."""
    grace_s: float = 2.0
    """Seconds in-flight calls get to finish on shutdown."""


def _parsing(method: Any, request_type: Any) -> Any:
    """``method`` behind a parser of the raw request bytes: bytes that are not a
    ``request_type`` are the client's fault (INVALID_ARGUMENT, a one-line warning), where
    grpc's own deserializer would answer UNKNOWN before any handler ran."""
    name = request_type.DESCRIPTOR.full_name

    async def handler(raw: bytes, context: aio.ServicerContext) -> Any:
        try:
            request = request_type.FromString(raw)
        except DecodeError as exc:
            message = f"request: not a valid {name} ({exc})"
            log_event(_log, "decide.error", level=logging.WARNING, code="INVALID_ARGUMENT", error=message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return await method(request, context)

    return handler


def _add_parsing_servicer(servicer: PolicyServicer, server: aio.Server) -> None:
    """Register the servicer's RPCs (as the generated `add_PolicyServiceServicer_to_server`),
    parsing requests in the handler (`_parsing`)."""
    rpcs: dict[str, tuple[Any, Any, Any]] = {
        "Decide": (servicer.Decide, policy_pb.DecideRequest, policy_pb.DecideResponse),
        "DecideBatch": (servicer.DecideBatch, policy_pb.DecideBatchRequest, policy_pb.DecideBatchResponse),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(_parsing(method, request_type),
                                                  response_serializer=response_type.SerializeToString)
        for name, (method, request_type, response_type) in rpcs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


MAX_BATCH = 256
"""Most observations one DecideBatch plans (more: RESOURCE_EXHAUSTED; the decision blocks the service)."""


class PolicyServicer(policy_grpc.PolicyServiceServicer):
    """Answers `Decide` with `policy.decide(observation)`."""

    def __init__(self, policy: Any, limits: ServiceLimits, metrics: ServiceMetrics) -> None:
        self.policy = policy
        self.limits = limits
        self.metrics = metrics

    async def Decide(self, request: policy_pb.DecideRequest, context: aio.ServicerContext) -> policy_pb.DecideResponse:  # noqa: N802
        def decide() -> list[gen_pb.Plan]:
            return [self.policy.decide(request.observation)]

        plans, latency_s = await self._answer(context, "decide", decide)
        return policy_pb.DecideResponse(plan=plans[0], decision_latency_s=latency_s)

    async def DecideBatch(self, request: policy_pb.DecideBatchRequest,  # noqa: N802
                          context: aio.ServicerContext) -> policy_pb.DecideBatchResponse:
        def decide() -> list[gen_pb.Plan]:
            observations = list(request.observations)
            if len(observations) > MAX_BATCH:
                raise ResourceExhaustedError(f"DecideBatch with {len(observations)} observations; at most {MAX_BATCH} are planned "
                                             "together", field="observations")  # fmt: skip
            joint = getattr(self.policy, "decide_batch", None)
            return list(joint(observations)) if joint is not None else [self.policy.decide(o) for o in observations]

        plans, latency_s = await self._answer(context, "decide_batch", decide)
        return policy_pb.DecideBatchResponse(plans=plans, decision_latency_s=latency_s)

    async def _answer(self, context: aio.ServicerContext, event: str,
                      decide: Callable[[], list[gen_pb.Plan]]) -> tuple[list[gen_pb.Plan], float]:  # fmt: skip
        """Run `decide`, check every plan against the limits and time it; the one boundary
        where exceptions become statuses (and a metric and a warning line)."""
        start = monotonic_s()
        try:
            plans = decide()
            for plan in plans:
                validate_plan(plan, self.limits)
        except Exception as exc:
            code = grpc_code_for(exc)
            self.metrics.observe(latency_s=monotonic_s() - start, code=code.name)
            log_event(_log, f"{event}.error", level=logging.WARNING, code=code.name, error=error_message(exc))
            await context.abort(code, error_message(exc))
        latency_s = monotonic_s() - start
        self.metrics.observe(latency_s=latency_s, code="OK")
        return plans, latency_s


class PolicyServer(BoundServer):
    """A policy service bound to a port; `start`, then `stop`."""

    service_name = SERVICE_NAME

    async def start(self) -> None:
        await self._open()
        await set_serving(self.health, [SERVICE_NAME], True)
        log_event(_log, "policy.started", address=self.address, policy=getattr(self.servicer.policy, "name", "?"))

    async def stop(self, grace_s: float | None = None) -> None:
        await self._close(grace_s)
        self.servicer.metrics.close()
        log_event(_log, "policy.stopped", address=self.address)


async def create_policy_server(config: PolicyServerConfig = PolicyServerConfig(), *, policy: Any = None) -> tuple[PolicyServer, int]:
    """Build (not start) a policy server; returns it and the bound port.

    Args:
        config: address, auth, TLS, limits.
        policy: any object with `name` and `decide(observation) -> Plan`; default rule-based.
    """
    server, port = bind_server(config.host, config.port, max_message_bytes=config.limits.max_message_bytes, token=config.token, tls=config.tls,
                               insecure=config.insecure)
    if policy is None:
        from meg.policy.serving import rule_policy

        policy = rule_policy()
    servicer = PolicyServicer(policy, config.limits, ServiceMetrics("policy"))
    _add_parsing_servicer(servicer, server)
    health = enable_health_and_reflection(server, [SERVICE_NAME])
    await set_serving(health, [SERVICE_NAME], False)
    return PolicyServer(server, port, config, servicer, health), port


async def serve_policy(config: PolicyServerConfig, *, policy: Any = None,
                       on_ready: Callable[[PolicyServer], None] | None = None) -> None:
    """Run a policy server until SIGINT/SIGTERM, then drain."""
    server, _ = await create_policy_server(config, policy=policy)
    await server.start()
    if on_ready is not None:
        on_ready(server)
    await stop_signal().wait()
    await server.stop()


