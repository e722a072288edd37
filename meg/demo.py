"""`meg demo`: the whole system on loopback, one image and its report.

Starts a policy service and an edge server on 127.0.0.1 (real sockets, ports picked by
the OS), then acts as the user device: it asks the edge for an image over the emulated
wireless link of MEG's paper (1 MHz band, path-loss SNR at the given distance), decodes
the streamed features, runs its own partition in ONNX Runtime, compares with the unsplit
reference, and writes `image.png` and `report.json`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from meg.recipes.report import GenerationReport

__all__ = ["DemoConfig", "demo", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Defaults of `meg demo`."""

    prompt: str = "a red ring at the top left and a green square at the bottom right"
    """What to draw (meg-tiny knows shapes, colours, positions and backgrounds)."""
    out_dir: Path = Path("meg-demo")
    """Folder that receives image.png and report.json."""
    model: str = "auto"
    """Model of edge and device: "auto" takes meg-tiny when its weights are present, else tiny-random."""
    seed: int = 0
    distance_m: float = 200.0
    """Edge–device distance; the SNR follows MEG's path loss (1 MHz, 30 dBm, −94 dBm noise)."""
    mode: str = "digital"
    """Emulated link: ideal, digital (packets, ARQ) or analog (noisy feature values)."""
    device_profile: str = "jetson-agx-orin"
    recipe: str = "meg"
    """Recipe to run: "meg" or "hybrid-sr"."""
    target_size_px: int = 0
    """Side of the image; 0: the model's native size (MEG), 4 × native (Hybrid SR: 512 px on meg-tiny)."""
    sr_model: str | None = None
    """Hybrid SR: diffusion SR model of the edge (default: the model's family)."""
    light_sr: str | None = None
    """Hybrid SR: light SR model of the device (default: the model's family)."""
    policy: str = "rule"
    """Policy the policy service runs: "rule", "cvpo" (the shipped checkpoint) or a checkpoint folder."""
    latency_limit_s: float = 3.0
    energy_limit_j: float = 0.0
    runtime: str = "onnxruntime"
    torch_threads: int = 1
    """Intra-op threads of torch in this process. Edge and device share it; on a small
    machine one thread avoids OpenMP threads spinning against each other (a tiny-random
    edge pass measured 0.07 s with one thread and 1.3 s with two on a loaded 2-core CPU)."""


def resolve_model(name: str) -> str:
    """"auto" → "meg-tiny" when the embedded family is installed, else "tiny-random"."""
    if name != "auto":
        return name
    try:
        from meg.models.registry import available
    except ImportError:
        return "tiny-random"
    return "meg-tiny" if "meg-tiny" in available() else "tiny-random"


def run_demo(config: DemoConfig = DemoConfig()) -> GenerationReport:
    """Run the demo; returns the report (also written to `config.out_dir`)."""
    import torch

    from meg.channel.link import LinkConfig
    from meg.channel.pathloss import MEG_LINK_BUDGET
    from meg.services.background import ServiceLoop, start_edge, start_policy
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.edge_config import EdgeConfig
    from meg.services.policy_server import PolicyServerConfig
    from meg.split.loading import load_pipeline

    model = resolve_model(config.model)
    started = time.perf_counter()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    # Edge and device live in one process here, so they share the loaded weights; the
    # device side still runs its own partition from the exported ONNX graphs.
    pipeline = load_pipeline(model)
    link = LinkConfig(mode=config.mode,  # type: ignore[arg-type]
                      snr_db=float(MEG_LINK_BUDGET.snr_db(config.distance_m)),
                      bandwidth_hz=MEG_LINK_BUDGET.bandwidth_hz,
                      tx_power_dbm=MEG_LINK_BUDGET.tx_power_dbm)
    loop = ServiceLoop()
    try:
        from meg.policy import load_policy

        policy = start_policy(PolicyServerConfig(port=0), policy=load_policy(config.policy), loop=loop)
        edge_config = EdgeConfig(port=0, model=model, policy_address=policy.address, sr_model=config.sr_model)
        edge = start_edge(edge_config, pipeline=pipeline, loop=loop)
        try:
            size = config.target_size_px
            request = DeviceRequest(prompt=config.prompt, seed=config.seed, device_profile=config.device_profile,
                                    link=link, distance_m=config.distance_m, width=size, height=size,
                                    latency_limit_s=config.latency_limit_s, energy_limit_j=config.energy_limit_j,
                                    model=model, recipe=config.recipe)
            client_config = ClientConfig(model=model, runtime=config.runtime,  # type: ignore[arg-type]
                                         sr_model=config.sr_model, light_sr=config.light_sr)
            with DeviceClient([edge.address], client_config, pipeline=pipeline) as client:
                result = client.generate(request, reference=True)
        finally:
            edge.stop(0.5)
            policy.stop(0.5)
    finally:
        loop.close()
    result.report.extra["demo"] = {
        "model": model,
        "edge_address": edge.address,
        "policy_address": policy.address,
        "total_wall_s": time.perf_counter() - started,
    }
    result.save(config.out_dir)
    return result.report


@click.command("demo")
@click.option("--prompt", default=DemoConfig.prompt, show_default=True, help="Text prompt.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DemoConfig.out_dir,
              show_default=True, help="Output folder for image.png and report.json.")
@click.option("--model", default=DemoConfig.model, show_default=True,
              help="auto (meg-tiny if installed, else tiny-random), tiny-random, meg-tiny or a local diffusers folder.")
@click.option("--seed", type=int, default=DemoConfig.seed, show_default=True)
@click.option("--distance-m", type=float, default=DemoConfig.distance_m, show_default=True,
              help="Edge–device distance in metres (MEG: 200–300 m).")
@click.option("--mode", type=click.Choice(["ideal", "digital", "analog"]), default=DemoConfig.mode, show_default=True,
              help="Emulated link mode.")
@click.option("--recipe", type=click.Choice(["meg", "hybrid-sr", "preview-refine"]), default=DemoConfig.recipe, show_default=True,
              help="MEG (edge denoises, device decodes) or Hybrid SR (edge generates small and upscales the "
                   "salient cells, device upscales the rest) or preview-refine (a scripted three-round session: "
                   "device previews, the edge refines the last; writes preview-N.png too).")
@click.option("--target-size", "target_size_px", type=int, default=DemoConfig.target_size_px, show_default=True,
              help="Image side in pixels; 0: the model's native size (MEG) or 4x it (Hybrid SR, 512 px on meg-tiny).")
@click.option("--sr-model", default=None, help="Hybrid SR: the edge's diffusion SR model (family or upscaler folder).")
@click.option("--light-sr", default=None, help="Hybrid SR: the device's light SR model (family, folder or Real-ESRGAN .pth).")
@click.option("--policy", default=DemoConfig.policy, show_default=True,
              help='Policy that plans the request: "rule", "cvpo" (the shipped CVPO checkpoint) or a checkpoint folder.')
@click.option("--runtime", type=click.Choice(["onnxruntime", "torch", "eager"]), default=DemoConfig.runtime,
              show_default=True, help="Where the device partition runs.")
@click.option("--threads", "torch_threads", type=int, default=DemoConfig.torch_threads, show_default=True,
              help="torch intra-op threads (0: torch's default).")
def demo(prompt: str, out_dir: Path, model: str, seed: int, distance_m: float, mode: str, recipe: str,
         target_size_px: int, sr_model: str | None, light_sr: str | None, policy: str, runtime: str,
         torch_threads: int) -> None:
    """Run edge server, policy service and device client on loopback; write one image.

    No arguments needed. Prints a summary (plan, bytes, latency breakdown, quality vs the
    unsplit reference) and writes OUT/image.png and OUT/report.json.
    """
    from meg.services.cli import print_summary

    if recipe == "preview-refine":
        from meg.session_cli import SessionDemoConfig, run_session_demo

        summary = run_session_demo(dataclasses.replace(SessionDemoConfig(), out_dir=out_dir, model=resolve_model(model),
                                                       seed=seed))
        for i, r in enumerate(summary["rounds"], 1):
            click.echo(f"round {i}: {r['prompt']!r} → {r['png']} ({r['preview_s'] * 1000:.0f} ms)")
        final = summary["final"]
        click.echo(f"final: {'refined at strength ' + str(final.get('strength')) if summary['refined'] else 'edge lost, last preview kept'}"
                   f" → {final['png']}, {final['report']}")
        return
    config = dataclasses.replace(DemoConfig(), prompt=prompt, out_dir=out_dir, model=model, seed=seed,
                                 distance_m=distance_m, mode=mode, recipe=recipe, target_size_px=target_size_px,
                                 sr_model=sr_model, light_sr=light_sr, policy=policy, runtime=runtime,
                                 torch_threads=torch_threads)
    from meg.services.wire import tune_malloc

    tune_malloc()  # this process streams 1 MiB messages: reuse their freed buffers
    report = run_demo(config)
    print_summary(report)
    info = report.extra["demo"]
    click.echo(f"model {info['model']}; edge {info['edge_address']}, policy {info['policy_address']}; "
               f"{info['total_wall_s']:.1f} s in all")
    click.echo(f"wrote {out_dir / 'image.png'} and {out_dir / 'report.json'}")
