"""`meg serve edge` and the `meg serve` group (`meg serve policy` lives in `meg.services.cli`).

Light on purpose: `meg serve edge --help` shows `EdgeConfig`'s defaults without importing
torch or the services; the server's modules are imported when it runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meg.cli import LazyGroup
from meg.services.edge_config import EdgeConfig
from meg.services.security import TOKEN_ENV_VAR, TlsConfig

if TYPE_CHECKING:
    from meg.services.edge import EdgeServer

__all__ = ["serve", "tls_config", "tls_options"]


def tls_config(cert: Path | None, key: Path | None, ca: Path | None, server_name: str | None = None) -> TlsConfig | None:
    """The `TlsConfig` of the --tls-* options; None when none is given (plaintext)."""
    if cert is None and key is None and ca is None:
        return None
    return TlsConfig(cert_file=cert, key_file=key, ca_file=ca, server_name_override=server_name)


_PATH = click.Path(dir_okay=False, path_type=Path)


def tls_options(fn: Any) -> Any:
    """--tls-cert, --tls-key and --tls-ca."""
    fn = click.option("--tls-ca", type=_PATH, help="CA certificate (PEM); on a server it turns on mutual TLS.")(fn)
    fn = click.option("--tls-key", type=_PATH, help="Private key (PEM).")(fn)
    fn = click.option("--tls-cert", type=_PATH, help="Certificate (PEM).")(fn)
    return fn


insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Serve on a non-loopback --host without TLS or a token (refused otherwise): anyone who reaches it can use it.")


@click.group("serve", cls=LazyGroup,
             lazy={"policy": ("meg.services.cli:serve_policy_command", "Run the policy service (PolicyService.Decide) until Ctrl-C.")})
def serve() -> None:
    """Run a service: the edge server or the policy service (JSON logs on stderr)."""


@serve.command("edge")
@click.option("--host", default=EdgeConfig.host, show_default=True, help="Interface to bind (0.0.0.0 for all).")
@click.option("--port", type=int, default=EdgeConfig.port, show_default=True, help="Port; 0 picks a free one.")
@click.option("--model", default=EdgeConfig.model, show_default=True, help="Pipeline name or local diffusers folder.")
@click.option("--workers", type=int, default=EdgeConfig.workers, show_default=True, help="Threads running model work.")
@click.option("--queue-size", type=int, default=EdgeConfig.queue_size, show_default=True, help="Waiting requests before RESOURCE_EXHAUSTED.")
@click.option("--replica-id", default="", envvar="MEG_REPLICA_ID", help="Name this edge gives itself in every answer (or $MEG_REPLICA_ID; default: host:port/pid).")
@click.option("--batch-max", type=click.IntRange(min=1), default=EdgeConfig.batch_max, show_default=True,
              help="Step-level batching: most UNet calls of concurrent requests per forward pass (1: off).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=EdgeConfig.batch_wait_ms, show_default=True,
              help="Longest a UNet call waits for others to join its batch.")
@click.option("--policy-address", default=None, help="Remote PolicyService host:port (default: in-process rules).")
@click.option("--policy-token", default=None, help="Bearer token for the remote policy service.")
@click.option("--policy-timeout-s", type=click.FloatRange(min=0, min_open=True), default=EdgeConfig.policy_timeout_s, show_default=True,
              help="Deadline of each call to the remote policy; past it (or when it is down) the edge plans in-process.")
@click.option("--policy-tls-ca", type=_PATH, default=None, help="CA certificate of a TLS policy service (PEM).")
@click.option("--token", default=None, help=f"Bearer token callers must present (or ${TOKEN_ENV_VAR}).")
@tls_options
@insecure_option
@click.option("--realtime", is_flag=True, help="Sleep for the emulated link's airtime.")
@click.option("--edge-profile", default=EdgeConfig.edge_profile, show_default=True,
              help="Device profile the edge's compute is modelled with in reports.")
@click.option("--torch-threads", type=int, default=EdgeConfig.torch_threads, show_default=True,
              help="torch threads for model work (0: torch's default).")
@click.option("--grace-s", type=float, default=EdgeConfig.grace_s, show_default=True,
              help="Seconds in-flight requests get to finish on shutdown.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port.")
@click.option("--sr-model", default=None,
              help="Hybrid SR: diffusion SR model (family name/folder or diffusers upscaler folder); default: the model's family.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
def serve_edge_command(host: str, port: int, model: str, workers: int, queue_size: int, replica_id: str, batch_max: int,
                       batch_wait_ms: float,
                       policy_address: str | None,
                       policy_token: str | None, policy_timeout_s: float, policy_tls_ca: Path | None, token: str | None, tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None,
                       insecure: bool, realtime: bool, edge_profile: str, torch_threads: int, grace_s: float,
                       metrics_port: int | None, sr_model: str | None, log_level: str) -> None:
    """Run the edge server (EdgeService.Generate) until Ctrl-C, then drain."""
    from meg.services.edge import serve_edge
    from meg.services.observability import configure_logging
    from meg.services.security import resolve_token

    configure_logging(log_level)
    config = EdgeConfig(host=host, port=port, model=model, workers=workers, queue_size=queue_size,
                        replica_id=replica_id, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                        policy_address=policy_address, policy_token=policy_token, policy_timeout_s=policy_timeout_s,
                        policy_tls=tls_config(None, None, policy_tls_ca), token=resolve_token(token), tls=tls_config(tls_cert, tls_key, tls_ca), insecure=insecure,
                        realtime=realtime, edge_profile=edge_profile, torch_threads=torch_threads, grace_s=grace_s,
                        metrics_port=metrics_port, sr_model=sr_model)

    def ready(server: EdgeServer) -> None:
        click.echo(f"edge serving {model} on {server.address}" +
                   (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), err=True)

    asyncio.run(serve_edge(config, on_ready=ready))
