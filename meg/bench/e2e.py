"""`meg bench e2e`: every split point over MEG's channels and a 10 Mbit/s link.

One edge server on loopback; the device client forces each plan in turn, so every row is
a real generation through gRPC, the codec chain, the emulated link and the device's ONNX
Runtime partition. Modelled latency and energy use the paper's device profiles (edge
RTX 3080 Ti, device Jetson AGX Orin) and the link's airtime; measured wall time is this
machine's; quality is the MSE against the unsplit reference of the same seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

__all__ = ["E2eRow", "run_e2e_bench"]


@dataclass(frozen=True)
class E2eRow:
    split: str
    plan: str
    channel: str
    link_bytes: int
    downlink_bytes: int
    uplink_bytes: int
    modelled_latency_s: float
    modelled_energy_j: float
    measured_wall_s: float
    mse_vs_reference: float
    latency_vs_image: float
    """Modelled latency as a fraction of the `image` split's on the same channel."""
    fallback: bool
    """True when the device had to generate alone (the row then measures the fallback)."""


def _channels() -> dict[str, tuple[object, float]]:
    from meg.channel.link import LinkConfig
    from meg.channel.pathloss import MEG_LINK_BUDGET

    def meg_link(distance_m: float) -> tuple[object, float]:
        return LinkConfig(mode="digital", snr_db=float(MEG_LINK_BUDGET.snr_db(distance_m)),
                          bandwidth_hz=MEG_LINK_BUDGET.bandwidth_hz, tx_power_dbm=MEG_LINK_BUDGET.tx_power_dbm), distance_m

    return {
        "meg-1MHz-200m": meg_link(200.0),
        "meg-1MHz-300m": meg_link(300.0),
        # 10 Mbit/s (hybrid-SR paper's link) within capacity: 2 MHz at 20 dB carries 13.3 Mbit/s
        "10Mbps": (LinkConfig(mode="digital", snr_db=20.0, bandwidth_hz=2e6, rate_bps=10e6), 0.0),
    }


def run_e2e_bench(model: str = "auto", seed: int = 0, prompt: str | None = None) -> list[E2eRow]:
    """Generate once per (plan, channel); rows in the order of the table."""
    from meg.demo import DemoConfig, resolve_model
    from meg.recipes.plan import make_plan
    from meg.services.background import ServiceLoop, start_edge
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.edge_config import EdgeConfig
    from meg.split.loading import load_pipeline, native_size_px

    model = resolve_model(model)
    pipeline = load_pipeline(model)
    try:
        from meg.models.registry import default_steps

        steps = default_steps(model) if model == "meg-tiny" else 4
    except ImportError:
        steps = 4
    plans = {
        "device": make_plan("device", steps=steps),
        f"step:{steps // 2}": make_plan(f"step:{steps // 2}", steps=steps, codec_chain="fp16,zstd:3"),
        "decoder": make_plan("decoder", steps=steps, codec_chain="fp16,zstd:3"),
        "decoder+merge": make_plan("decoder", steps=steps, merge_ratio=0.5, codec_chain="int8,zstd:3"),
        "image": make_plan("image", steps=steps, codec_chain="int8,zstd:3"),
    }
    rows: list[E2eRow] = []
    loop = ServiceLoop()
    try:
        edge = start_edge(EdgeConfig(port=0, model=model), pipeline=pipeline, loop=loop)
        try:
            with DeviceClient([edge.address], ClientConfig(model=model), pipeline=pipeline) as client:
                for channel_name, (link, distance_m) in _channels().items():
                    by_plan = {}
                    for label, plan in plans.items():
                        request = DeviceRequest(prompt=prompt or DemoConfig.prompt, seed=seed, link=link,  # type: ignore[arg-type]
                                                width=native_size_px(pipeline), height=native_size_px(pipeline),
                                                distance_m=distance_m, plan=plan, model=model)
                        by_plan[label] = client.generate(request, reference=True).report
                    image_latency = by_plan["image"].latency_s.modelled_total
                    for label, report in by_plan.items():
                        assert report.quality is not None
                        rows.append(E2eRow(
                            split=report.plan["split"],
                            plan=label,
                            channel=channel_name,
                            link_bytes=report.bytes.downlink + report.bytes.uplink,
                            downlink_bytes=report.bytes.downlink,
                            uplink_bytes=report.bytes.uplink,
                            modelled_latency_s=report.latency_s.modelled_total,
                            modelled_energy_j=report.energy_j.modelled_total,
                            measured_wall_s=report.latency_s.measured_wall,
                            mse_vs_reference=report.quality.mse_vs_reference,
                            latency_vs_image=report.latency_s.modelled_total / image_latency,
                            fallback=report.fallback.used,
                        ))
        finally:
            edge.stop(0.5)
    finally:
        loop.close()
    return rows


@click.command("e2e")
@click.option("--model", default="auto", show_default=True, help="auto (meg-tiny if installed, else tiny-random) or a model name/folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompt", default=None, help="Prompt (default: the demo's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write rows as JSON here.")
def bench_e2e(model: str, seed: int, prompt: str | None, json_path: Path | None) -> None:
    """Each split point (device, step:K, decoder, image) on MEG's 1 MHz link at 200 m and
    300 m and on a 10 Mbit/s link: bytes, modelled latency/energy (RTX 3080 Ti edge,
    Jetson AGX Orin device), measured wall time and MSE vs the unsplit reference."""
    rows = run_e2e_bench(model, seed, prompt)
    table = Table(title="End-to-end generation per split and channel")
    for column in ("plan", "channel", "link bytes", "model lat ms", "vs image", "model J", "wall s", "MSE vs ref",
                   "fallback"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r.plan, r.channel, str(r.link_bytes), f"{r.modelled_latency_s * 1e3:.1f}",
                      f"{r.latency_vs_image:.2f}", f"{r.modelled_energy_j:.3g}", f"{r.measured_wall_s:.2f}",
                      f"{r.mse_vs_reference:.2e}", "yes" if r.fallback else "no")
    Console(width=140).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
