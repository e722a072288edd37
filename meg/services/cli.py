"""`meg serve policy` and `meg generate` (`meg serve edge` is in `meg.services.serve_cli`).

Defaults come from the services' frozen dataclasses (`EdgeConfig`, `PolicyServerConfig`,
`ClientConfig`, `DeviceRequest`), so they are defined once. Errors are reported by the one
handler of `meg.cli` (one line, documented exit code).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from meg.recipes.meg import DEFAULT_STEPS
from meg.recipes.report import GenerationReport
from meg.services.client import ClientConfig, DeviceRequest
from meg.services.edge_config import EdgeConfig
from meg.services.policy_server import PolicyServerConfig
from meg.services.security import TOKEN_ENV_VAR
from meg.services.serve_cli import insecure_option, tls_config, tls_options

__all__ = ["generate", "serve_policy_command"]


@click.command("policy")
@click.option("--host", default=PolicyServerConfig.host, show_default=True, help="Interface to bind.")
@click.option("--port", type=int, default=PolicyServerConfig.port, show_default=True, help="Port; 0 picks a free one.")
@click.option("--token", default=None, help=f"Bearer token callers must present (or ${TOKEN_ENV_VAR}).")
@tls_options
@insecure_option
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port.")
@click.option("--checkpoint", default="rule", show_default=True,
              help="Policy to serve: a checkpoint folder from `meg policy train`, \"cvpo\" (the shipped CVPO "
                   "checkpoint), \"rule\" (the rule-based policy) or \"hybrid-sr\" (Hybrid SR's "
                   "annealing controller, rules for MEG).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
def serve_policy_command(host: str, port: int, token: str | None, tls_cert: Path | None, tls_key: Path | None,
                         tls_ca: Path | None, insecure: bool, metrics_port: int | None, checkpoint: str, log_level: str) -> None:
    """Run the policy service (PolicyService.Decide) until Ctrl-C.

    The edge reaches it with `meg serve edge --policy-address HOST:PORT`; every answer
    carries the measured decision time, which the edge puts in its report."""
    from meg.policy import load_policy
    from meg.services.observability import configure_logging
    from meg.services.policy_server import PolicyServer, serve_policy
    from meg.services.security import resolve_token

    configure_logging(log_level)
    config = PolicyServerConfig(host=host, port=port, token=resolve_token(token), tls=tls_config(tls_cert, tls_key, tls_ca),
                                insecure=insecure, metrics_port=metrics_port)

    def ready(server: PolicyServer) -> None:
        click.echo(f"policy service on {server.address}" +
                   (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), err=True)

    asyncio.run(serve_policy(config, policy=load_policy(checkpoint), on_ready=ready))


@click.command("generate")
@click.option("--edge", "edges", multiple=True, default=[f"{EdgeConfig.host}:{EdgeConfig.port}"], show_default=True,
              help="Edge address host:port; repeat for round-robin over several.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--negative-prompt", default="", help="Negative prompt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--width", type=int, default=None, help="Width in pixels (default: the model's).")
@click.option("--height", type=int, default=None, help="Height in pixels (default: the model's).")
@click.option("--device-profile", default=DeviceRequest.device_profile, show_default=True, help="Device profile for modelled costs.")
@click.option("--mode", type=click.Choice(["ideal", "digital", "analog"]), default="ideal", show_default=True,
              help="Emulated link: ideal, digital (packets, ARQ) or analog (noisy features).")
@click.option("--snr-db", type=float, default=None, help="Link SNR (default: from --distance-m, else the emulator's).")
@click.option("--distance-m", type=float, default=None, help="Distance to the edge; SNR from MEG's link budget.")
@click.option("--bandwidth-hz", type=float, default=None, help="Link bandwidth.")
@click.option("--rate-bps", type=float, default=None, help="Fixed link rate (default: from SNR and bandwidth).")
@click.option("--fading", type=click.Choice(["awgn", "rayleigh", "rician"]), default="awgn", show_default=True)
@click.option("--recipe", type=click.Choice(["meg", "hybrid-sr"]), default="meg", show_default=True,
              help="Which system generates: MEG or Hybrid SR.")
@click.option("--target-size", type=int, default=None, help="Square image side in pixels (sets --width and --height).")
@click.option("--sr-scale", type=click.Choice(["1", "2", "4"]), default=None,
              help="Hybrid SR: force a plan with this SR scale S (the edge generates at target/S).")
@click.option("--foreground-fraction", type=float, default=None,
              help="Hybrid SR: fraction of cells upscaled by diffusion SR on the edge (default 0.25); needs --sr-scale.")
@click.option("--light-sr", default=None, help="Hybrid SR: the device's light SR model (family, folder or Real-ESRGAN .pth).")
@click.option("--device-decoder", default=None,
              help="VAE folder of the model the device decodes with (vae_merge_paper: MEG's paper distillation; vae: stock).")
@click.option("--sr-model", default=None, help="Hybrid SR: diffusion SR model for the --reference run.")
@click.option("--split", default=None,
              help="Force a plan with this split (device, step:K, decoder, image, unet:B); default: the policy decides.")
@click.option("--steps", type=int, default=None, help=f"Steps of a forced plan (default {DEFAULT_STEPS}); needs --split.")
@click.option("--merge-ratio", type=float, default=None, help="Merge ratio of a forced plan (default 0); needs --split.")
@click.option("--codec", default=None, help="Codec chain of a forced plan (default none); needs --split.")
@click.option("--tome-ratio", type=float, default=None, help="Edge ToMe ratio of a forced plan (default 0); needs --split.")
@click.option("--latency-limit-s", type=float, default=0.0, show_default=True, help="Latency limit (0: none).")
@click.option("--energy-limit-j", type=float, default=0.0, show_default=True, help="Energy limit (0: none).")
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch", "eager"]), default=ClientConfig.runtime, show_default=True,
              help="Device partition runtime.")
@click.option("--model", default=ClientConfig.model, show_default=True, help="Pipeline of the device partition.")
@click.option("--token", default=None, envvar=TOKEN_ENV_VAR, help=f"Bearer token (or ${TOKEN_ENV_VAR}).")
@tls_options
@click.option("--tls-server-name", default=None, help="Host name the edge certificate carries, if not the address.")
@click.option("--deadline-s", type=float, default=ClientConfig.deadline_s, show_default=True, help="Deadline of the edge call.")
@click.option("--no-fallback", is_flag=True, help="Fail instead of generating on the device.")
@click.option("--reference", is_flag=True, help="Also run the unsplit reference and report the difference.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("meg-out"),
              show_default=True, help="Folder for image.png and report.json.")
def generate(edges: tuple[str, ...], prompt: str, negative_prompt: str, seed: int, width: int | None, height: int | None,
             device_profile: str, mode: str, recipe: str, target_size: int | None, sr_scale: str | None,
             foreground_fraction: float | None, light_sr: str | None, device_decoder: str | None, sr_model: str | None, snr_db: float | None, distance_m: float | None, bandwidth_hz: float | None,
             rate_bps: float | None, fading: str, split: str | None, steps: int | None, merge_ratio: float | None,
             codec: str | None, tome_ratio: float | None, latency_limit_s: float, energy_limit_j: float, runtime: str,
             model: str, token: str | None, tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None,
             tls_server_name: str | None, deadline_s: float, no_fallback: bool, reference: bool, out_dir: Path) -> None:
    """Generate one image as the user device: the edge runs its part, this machine the rest."""
    import dataclasses

    from meg.channel.link import LinkConfig
    from meg.channel.pathloss import MEG_LINK_BUDGET
    from meg.recipes.hybrid_sr import HybridSrConfig, hybrid_plan
    from meg.recipes.plan import make_plan
    from meg.services.client import DeviceClient
    from meg.services.wire import tune_malloc

    plan_options = {"--steps": steps, "--merge-ratio": merge_ratio, "--codec": codec, "--tome-ratio": tome_ratio,
                    "--foreground-fraction": foreground_fraction}
    given = [name for name, value in plan_options.items() if value is not None]
    forcing = "--sr-scale" if recipe == "hybrid-sr" else "--split"
    if (split if recipe == "meg" else sr_scale) is None and given:
        raise click.UsageError(f"{', '.join(given)} set a forced plan and need {forcing} (else the policy decides)")
    if recipe == "meg" and (sr_scale is not None or foreground_fraction is not None):
        raise click.UsageError("--sr-scale and --foreground-fraction are Hybrid SR settings: add --recipe hybrid-sr")
    if recipe == "hybrid-sr" and (split is not None or merge_ratio is not None or tome_ratio is not None):
        raise click.UsageError("--split, --merge-ratio and --tome-ratio are MEG settings; Hybrid SR takes --sr-scale")
    if target_size is not None:
        width = height = target_size
    link_fields: dict[str, Any] = {"mode": mode, "fading": fading}
    if snr_db is None and distance_m is not None:
        snr_db = float(MEG_LINK_BUDGET.snr_db(distance_m))
    for name, value in (("snr_db", snr_db), ("bandwidth_hz", bandwidth_hz), ("rate_bps", rate_bps)):
        if value is not None:
            link_fields[name] = value
    sizes: dict[str, Any] = {k: v for k, v in (("width", width), ("height", height)) if v is not None}
    if recipe == "hybrid-sr":
        plan = (hybrid_plan(steps=steps or DEFAULT_STEPS, sr_scale=int(sr_scale),
                            foreground_fraction=HybridSrConfig.foreground_fraction if foreground_fraction is None
                            else foreground_fraction, codec_chain=codec or HybridSrConfig.codec_chain)
                if sr_scale is not None else None)
    else:
        plan = (make_plan(split, steps=steps or DEFAULT_STEPS, merge_ratio=merge_ratio or 0.0,
                          codec_chain=codec or "none", tome_ratio=tome_ratio or 0.0) if split else None)
    request = DeviceRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, device_profile=device_profile,
                            link=dataclasses.replace(LinkConfig(), **link_fields), distance_m=distance_m or 0.0,
                            latency_limit_s=latency_limit_s, energy_limit_j=energy_limit_j, plan=plan, recipe=recipe,
                            **sizes)
    config = ClientConfig(deadline_s=deadline_s, token=token, runtime=runtime,  # type: ignore[arg-type]
                          tls=tls_config(tls_cert, tls_key, tls_ca, tls_server_name), model=model,
                          fallback=not no_fallback, light_sr=light_sr, sr_model=sr_model, device_decoder=device_decoder)
    tune_malloc()  # this process receives 1 MiB messages: reuse their freed buffers
    with DeviceClient(list(edges), config) as client:
        result = client.generate(request, reference=reference)
    image_path, report_path = result.save(out_dir)
    print_summary(result.report)
    click.echo(f"wrote {image_path} and {report_path}")


def print_summary(report: GenerationReport) -> None:
    """A short table of a generation report: plan, bytes, latency parts, quality."""
    from rich.console import Console
    from rich.table import Table

    plan = report.plan
    table = Table(title=f"{report.recipe} request {report.request_id[:12]}", show_header=True)
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("split / steps", f"{plan['split']} / {plan['steps']}")
    table.add_row("codec / merge / ToMe", f"{plan['codec_chain']} / {plan['merge_ratio']:g} / {plan['tome_ratio']:g}")
    for name, value in plan["params"].items():
        table.add_row(f"plan {name}", f"{value:g}")
    table.add_row("policy", str(plan["policy"]))
    table.add_row("fallback", report.fallback.reason or "" if report.fallback.used else "no")
    table.add_row("link", f"{report.channel.mode} @ {report.channel.snr_db:.1f} dB")
    table.add_row("bytes down / up", f"{report.bytes.downlink} / {report.bytes.uplink}")
    for part in report.parts:
        kind = "measured" if part.measured else "modelled"
        table.add_row(f"{part.part} ({part.profile}, {kind})", f"{part.latency_s * 1e3:.2f} ms")
    table.add_row("modelled latency / energy",
                  f"{report.latency_s.modelled_total * 1e3:.2f} ms / {report.energy_j.modelled_total:.3g} J")
    table.add_row("measured wall", f"{report.latency_s.measured_wall * 1e3:.1f} ms")
    hybrid = report.extra.get("hybrid_sr")
    if hybrid and "foreground_cells" in hybrid:
        table.add_row("foreground cells (diffusion SR on the edge)", ", ".join(map(str, hybrid["foreground_cells"])) or "none")
        table.add_row("bytes foreground / background", f"{hybrid['foreground_bytes']} / {hybrid['background_bytes']}")
        table.add_row("measured overlap of the two paths", f"{hybrid['measured_overlap_s'] * 1e3:.1f} ms")
    if report.quality is not None:
        table.add_row("MSE vs reference", f"{report.quality.mse_vs_reference:.3g}")
    Console().print(table)
