"""Host the asyncio servers from synchronous code (the demo, benchmarks, tests).

`ServiceLoop` runs one event loop in a daemon thread; `start_edge` / `start_policy` build,
start and (for the edge) wait for the model, returning a handle with the bound address.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from meg.services.edge import EdgeConfig, EdgeServer, create_edge_server
from meg.services.policy_server import PolicyServer, PolicyServerConfig, create_policy_server

__all__ = ["EdgeProcess", "RunningServer", "ServiceLoop", "ServiceProcess", "free_port", "metric_sum", "proc_status_kb",
           "start_edge", "start_policy"]

T = TypeVar("T")


class ServiceLoop:
    """An event loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="meg-services", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        """Stop the loop and its thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class RunningServer:
    """A started server on a `ServiceLoop`: `address`, `port`, `stop()`."""

    def __init__(self, server: EdgeServer | PolicyServer, loop: ServiceLoop, own_loop: bool) -> None:
        self.server = server
        self.loop = loop
        self._own_loop = own_loop

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace_s: float | None = None) -> None:
        """Drain and stop the server (and the loop, if this handle created it)."""
        self.loop.run(self.server.stop(grace_s))
        if self._own_loop:
            self.loop.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_edge(config: EdgeConfig = EdgeConfig(), *, pipeline: Any = None, policy: Any = None,
               loop: ServiceLoop | None = None, ready_timeout_s: float | None = 300.0,
               wait_ready: bool = True, loader: Callable[[], Any] | None = None) -> RunningServer:
    """Create and start an edge server on `loop` (default: a new one); with `wait_ready`,
    return once its model has loaded (see `create_edge_server` for `pipeline`, `policy`,
    `loader`)."""
    own = loop is None
    service_loop = loop or ServiceLoop()

    async def start() -> EdgeServer:
        server, _ = await create_edge_server(config, pipeline=pipeline, policy=policy, loader=loader)
        await server.start()
        if wait_ready:
            await server.wait_until_ready(ready_timeout_s)
        return server

    return RunningServer(service_loop.run(start()), service_loop, own)


def start_policy(config: PolicyServerConfig = PolicyServerConfig(), *, policy: Any = None,
                 loop: ServiceLoop | None = None) -> RunningServer:
    """Create and start a policy server on `loop` (default: a new one)."""
    own = loop is None
    service_loop = loop or ServiceLoop()

    async def start() -> PolicyServer:
        server, _ = await create_policy_server(config, policy=policy)
        await server.start()
        return server

    return RunningServer(service_loop.run(start()), service_loop, own)


def metric_sum(samples: dict[str, float], name: str) -> float:
    """Sum of the samples of metric `name` (all label sets) in a `ServiceProcess.scrape`."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def proc_status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size in kB (``VmRSS``, ``VmHWM``); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A `meg` service in a child process on 127.0.0.1 with Prometheus metrics (benchmarks,
    replica tests): ``command`` is e.g. ``["serve", "policy"]``, ``args`` further options;
    ``port`` (default: a free one) lets a restarted service take its predecessor's place."""

    def __init__(self, command: list[str], args: list[str] = (), *, health_service: str,  # type: ignore[assignment]
                 port: int | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.health_service = health_service
        argv = [*command, "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--log-level", "warning", *args]
        code = "import sys; from meg.cli import main; sys.argv[0] = 'meg'; main()"
        # stderr goes to a file: a pipe nobody reads fills up and blocks the service's logging
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,  # noqa: S603
                                     stderr=self._stderr)  # fmt: skip

    def stderr_tail(self, nbytes: int = 2000) -> str:
        """The last `nbytes` the service wrote to stderr."""
        self._stderr.seek(0, 2)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - nbytes))
        return self._stderr.read().decode(errors="replace")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the service's health reports SERVING; raise if it exits or times out."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"service exited with {self.proc.returncode}: {self.stderr_tail()}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(service=self.health_service), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{self.health_service} on {self.address} not serving after {timeout_s} s")

    def scrape(self) -> dict[str, float]:
        """Every sample on the service's /metrics, by name with labels (``name{label="v"}``)."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on the service's /metrics (0 when absent)."""
        return metric_sum(self.scrape(), name)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-work, as on a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (drain), SIGKILL after 30 s."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()


class EdgeProcess(ServiceProcess):
    """`meg serve edge` in a child process: ``args`` are further `meg serve edge` options
    (e.g. ``["--model", "tiny-random"]``)."""

    def __init__(self, args: list[str], *, replica_id: str = "", port: int | None = None) -> None:
        self.replica_id = replica_id
        super().__init__(["serve", "edge"], [*(["--replica-id", replica_id] if replica_id else []), *args],
                         health_service="meg.v1.EdgeService", port=port)  # fmt: skip
