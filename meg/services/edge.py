"""The edge server: lifecycle around `EdgeServicer` (`meg.services.edge_servicer`).

`create_edge_server(config)` binds the port and returns `(server, port)` without starting;
`EdgeServer.start()` serves at once and loads the model in a worker thread (health turns
SERVING when it has loaded); `EdgeServer.stop()` drains; `serve_edge` runs until a signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
from grpc import aio

from meg.devices import load_profile
from meg.recipes.base import EdgeContext
from meg.services.admission import WorkerPool
from meg.services.edge_config import EdgeConfig
from meg.services.edge_servicer import EdgeServicer, PlanSource
from meg.services.observability import ServiceMetrics, log_event
from meg.services.transport import (
    BoundServer,
    bind_server,
    enable_health_and_reflection,
    set_serving,
    stop_signal,
)
from meg.split.batching import StepBatcher
from meg.split.engine import SplitEngine
from meg.v1 import edge_service_pb2 as edge_pb
from meg.v1 import edge_service_pb2_grpc as edge_grpc

__all__ = ["EdgeConfig", "EdgeServer", "create_edge_server", "serve_edge"]

_log = logging.getLogger("meg.services.edge")
SERVICE_NAME = edge_pb.DESCRIPTOR.services_by_name["EdgeService"].full_name


class EdgeServer(BoundServer):
    """An edge server bound to a port: `await start()`, `await stop()`.

    `start` returns at once; the model loads in a worker thread and the health service
    turns SERVING only once it has loaded (until then `Generate` answers UNAVAILABLE).
    """

    def __init__(self, server: aio.Server, port: int, config: EdgeConfig, servicer: EdgeServicer, health: Any,
                 pipeline: Any, loader: Callable[[], Any] | None = None) -> None:
        super().__init__(server, port, config, servicer, health)
        self.config: EdgeConfig = config
        self.servicer: EdgeServicer = servicer
        self._pipeline = pipeline
        self._loader = loader
        self._loaded = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        self._load_error: BaseException | None = None
        self.batcher: StepBatcher | None = None
        """The engine's step batcher when `config.batch_max` > 1 (its `stats`)."""

    service_name = SERVICE_NAME

    async def start(self) -> None:
        """Start serving; the model loads in the background."""
        await self._open()
        self._load_task = asyncio.create_task(self._load())
        log_event(_log, "edge.started", address=self.address, model=self.config.model)

    async def _load(self) -> None:
        try:
            pipeline = self._pipeline
            if pipeline is None:
                if self.config.torch_threads:
                    torch.set_num_threads(self.config.torch_threads)
                if self._loader is not None:
                    pipeline = await asyncio.to_thread(self._loader)
                else:
                    import meg.models  # noqa: F401  (registers meg-tiny as a model source)
                    from meg.split.loading import load_pipeline

                    pipeline = await asyncio.to_thread(load_pipeline, self.config.model)
            engine = SplitEngine(pipeline)
            workers = self.config.workers
            if self.config.batch_max > 1:
                self.batcher = engine.enable_batching(max_batch=self.config.batch_max,
                                                      max_wait_s=self.config.batch_wait_ms / 1000)  # fmt: skip
                workers = max(workers, self.config.batch_max)  # enough requests in flight to fill a batch
            self.servicer.context = EdgeContext(engine=engine, edge_profile=self.config.edge_profile,
                                                model=self.config.model, config=self.config)
            pool = WorkerPool(workers, self.config.queue_size)
            self.servicer.pool = pool
            self.servicer.metrics.watch_queue(lambda: pool.in_system)
            if self.batcher is not None:
                self.servicer.metrics.watch_batcher(self.batcher.stats)
            await set_serving(self.health, [SERVICE_NAME], True)
            log_event(_log, "edge.serving", address=self.address, model=self.config.model)
        except Exception as exc:
            self._load_error = exc
            _log.exception("edge.load_failed", extra={"model": self.config.model})
        finally:
            self._loaded.set()

    async def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the model has loaded; re-raise a loading error."""
        await asyncio.wait_for(self._loaded.wait(), timeout_s)
        if self._load_error is not None:
            raise self._load_error

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests (health NOT_SERVING), let in-flight ones finish within
        `grace_s` (default `config.grace_s`), then close."""
        await self._close(grace_s)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.servicer.pool is not None:
            self.servicer.pool.shutdown()
        if self.servicer.context is not None:
            self.servicer.context.engine.disable_batching()
        await self.servicer.plans.close()
        self.servicer.metrics.close()
        log_event(_log, "edge.stopped", address=self.address)


async def create_edge_server(
    config: EdgeConfig = EdgeConfig(), *, pipeline: Any = None, policy: Any = None,
    loader: Callable[[], Any] | None = None,
) -> tuple[EdgeServer, int]:
    """Build (not start) an edge server; returns it and the bound port.

    Args:
        config: address, model, pool sizes, auth, TLS, limits, link defaults.
        pipeline: an already-loaded diffusers pipeline to serve instead of `config.model`
            (tests and the demo share one between edge and device).
        policy: in-process `meg.policy.Policy` used when `config.policy_address` is None;
            default the rule-based policy.
        loader: called in a worker thread after `start` to load the pipeline (default
            `load_pipeline(config.model)`); ignored when `pipeline` is given.
    """
    load_profile(config.edge_profile)  # a wrong profile name fails here, not in every request
    server, port = bind_server(config.host, config.port, max_message_bytes=config.limits.max_message_bytes,
                               token=config.token, tls=config.tls, insecure=config.insecure)
    servicer = EdgeServicer(config, PlanSource(config, policy), ServiceMetrics("edge"))
    servicer.replica = config.replica_id or f"{socket.gethostname()}:{port}/{os.getpid()}"
    edge_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    health = enable_health_and_reflection(server, [SERVICE_NAME], reflect=config.reflection)
    await set_serving(health, [SERVICE_NAME], False)
    return EdgeServer(server, port, config, servicer, health, pipeline, loader), port


async def serve_edge(config: EdgeConfig, *, on_ready: Callable[[EdgeServer], None] | None = None) -> None:
    """Run an edge server until SIGINT/SIGTERM, then drain in-flight requests."""
    from meg.services.wire import tune_malloc

    tune_malloc()  # this process streams 1 MiB messages: reuse their freed buffers
    server, _ = await create_edge_server(config)
    await server.start()
    stop = stop_signal()
    await server.wait_until_ready()
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    await server.stop()
