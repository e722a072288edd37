"""Settings of the edge server: every default of `meg serve edge` lives here once.

This module imports nothing heavy (no torch, no grpc), so that `meg serve edge --help`
can show these defaults at once: the structured defaults are built on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meg.channel.link import LinkConfig
    from meg.codecs.framing import FramingLimits
    from meg.services.limits import ServiceLimits
    from meg.services.security import TlsConfig

__all__ = ["EdgeConfig"]


def _service_limits() -> ServiceLimits:
    from meg.services.limits import ServiceLimits

    return ServiceLimits()


def _uplink_limits() -> FramingLimits:
    from meg.codecs.framing import FramingLimits

    return FramingLimits(max_elements=1 << 24, max_encoded_bytes=64 << 20, max_params_bytes=1 << 20)


def _link() -> LinkConfig:
    from meg.channel.link import LinkConfig

    return LinkConfig()


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `meg serve edge` can set; defaults live here once."""

    host: str = "127.0.0.1"
    """Interface to bind ("0.0.0.0" for all)."""
    port: int = 50051
    """Port to bind; 0 picks a free one."""
    model: str = "meg-tiny"
    """Pipeline the edge loads (`meg.split.load_pipeline` name or local folder); the
    embedded family by default, as in `meg demo`."""
    workers: int = 1
    """Threads running model work concurrently (raised to `batch_max` when batching is on)."""
    replica_id: str = ""
    """Name this edge gives itself in every answer (initial metadata `meg-replica`, and so in
    the device's report); empty: host name, port and process id."""
    batch_max: int = 1
    """Step-level batching: most UNet calls of concurrent requests in one forward pass
    (`meg.split.batching`); 1 turns batching off."""
    batch_wait_ms: float = 5.0
    """Longest a UNet call waits for others to join its batch."""
    queue_size: int = 8
    """Admitted requests that may wait for a worker; beyond this RESOURCE_EXHAUSTED."""
    torch_threads: int = 0
    """`torch.set_num_threads` for the edge; 0 leaves torch's default."""
    policy_address: str | None = None
    """Address of a remote `PolicyService`; None uses the in-process rule-based policy."""
    policy_timeout_s: float = 2.0
    """Deadline of each call to the remote policy."""
    policy_token: str | None = None
    """Bearer token for the remote policy service."""
    policy_tls: TlsConfig | None = None
    """Trust roots (and client certificate) for a TLS policy service; None: plaintext."""
    token: str | None = None
    insecure: bool = False
    """Allow a non-loopback `host` without TLS or a token (refused otherwise)."""
    """Bearer token callers must present; None turns auth off."""
    tls: TlsConfig | None = None
    """Certificate files (with `ca_file`: mutual TLS); None serves plaintext."""
    limits: ServiceLimits = field(default_factory=_service_limits)
    """Bounds on requests."""
    uplink_limits: FramingLimits = field(default_factory=_uplink_limits)
    """Bounds on tensors a client sends up (checked before anything is allocated)."""
    link: LinkConfig = field(default_factory=_link)
    """Emulator defaults for channel fields the request leaves at zero."""
    realtime: bool = False
    """Sleep for the link's airtime instead of only accounting it."""
    packet_payload_bytes: int = 1024
    """Bytes per emulated link packet (each chunk is cut into such packets)."""
    chunk_size_bytes: int | None = None
    """Largest chunk of a framed tensor; None: the framing's maximum
    (`meg.codecs.framing.MAX_CHUNK_BYTES`)."""
    edge_profile: str = "rtx-3080-ti"
    """Device profile the edge's compute is modelled with in the report."""
    max_request_s: float = 300.0
    """Deadline the edge applies when the client sets none."""
    grace_s: float = 5.0
    """Seconds in-flight requests get to finish on shutdown."""
    metrics_port: int | None = None
    """Port of a Prometheus `/metrics` endpoint; None turns it off."""
    reflection: bool = True
    """Serve gRPC server reflection."""
    sr_model: str | None = None
    """Hybrid SR: the edge's diffusion SR model — a family name or folder, or a diffusers
    upscaler folder; default: the served `model`'s family."""
