"""Structured logs with a request id, and Prometheus metrics behind a flag.

Logs are one JSON object per line on stderr (`event`, `request_id` and the event's own
fields), so they can be grepped and shipped without parsing prose. Metrics live in a
registry per server, so several servers in one process (tests, `meg demo`) do not clash.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

__all__ = ["JsonFormatter", "ServiceMetrics", "configure_logging", "log_event"]

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with its `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    """Send `meg.*` logs as JSON lines to stderr (used by `meg serve ...`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("meg")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured fields (e.g. `request_id=...`, `latency_s=...`)."""
    logger.log(level, event, extra=fields)


class ServiceMetrics:
    """Counters and histograms of one server, in their own registry.

    Args:
        service: label value naming the service ("edge", "policy").
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter("meg_requests", "Requests received", ["service"], registry=self.registry)
        self.errors = Counter("meg_errors", "Requests that ended in an error, by gRPC code", ["service", "code"], registry=self.registry)
        self.latency = Histogram(
            "meg_request_latency_seconds",
            "Wall time from request to last response message",
            ["service"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.bytes_sent = Counter("meg_bytes_sent", "Tensor bytes sent (headers and chunks)", ["service"], registry=self.registry)
        self.in_system = Gauge("meg_requests_in_system", "Requests admitted and not finished (running or queued)",
                               ["service"], registry=self.registry)  # fmt: skip
        self._http: Any = None

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Report `depth()` (requests running or queued) as `meg_requests_in_system`."""
        self.in_system.labels(self.service).set_function(depth)

    def watch_batcher(self, stats: Any) -> None:
        """Export a step batcher's `BatchStats` (`meg.split.batching`) as `meg_unet_*` metrics."""
        self.registry.register(_BatchCollector(self.service, stats))

    def observe(self, *, latency_s: float, code: str, bytes_sent: int = 0) -> None:
        """Record one finished request; `code` is the gRPC status name ("OK" on success)."""
        self.requests.labels(self.service).inc()
        if code != "OK":
            self.errors.labels(self.service, code).inc()
        self.latency.labels(self.service).observe(latency_s)
        if bytes_sent:
            self.bytes_sent.labels(self.service).inc(bytes_sent)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose `/metrics` on `addr:port` (0 picks a free port); return the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the `/metrics` endpoint, if it runs."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _BatchCollector:
    """Reads a `BatchStats` at scrape time: calls, forward passes, busy seconds, sizes."""

    def __init__(self, service: str, stats: Any) -> None:
        self.service = service
        self.stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        labels = [self.service]
        calls = CounterMetricFamily("meg_unet_calls", "UNet calls of requests (one per denoising step)", labels=["service"])
        calls.add_metric(labels, self.stats.calls)
        forwards = CounterMetricFamily("meg_unet_forwards", "Batched UNet forward passes", labels=["service"])
        forwards.add_metric(labels, self.stats.forwards)
        busy = CounterMetricFamily("meg_unet_busy_seconds", "Seconds inside batched UNet forward passes", labels=["service"])
        busy.add_metric(labels, self.stats.busy_s)
        sizes = CounterMetricFamily("meg_unet_batch_forwards", "Forward passes by number of calls batched",
                                    labels=["service", "batch_size"])  # fmt: skip
        for size, count in sorted(self.stats.sizes.items()):
            sizes.add_metric([self.service, str(size)], count)
        yield from (calls, forwards, busy, sizes)


def monotonic_s() -> float:
    """Monotonic clock in seconds (one name for all wall-time measurements here)."""
    return time.perf_counter()
