"""`meg channel ...`: BER curves against theory, and the cost of sending a payload over a link."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import get_args

import click
from rich.console import Console
from rich.table import Table

from meg.channel.ber import BerSweep
from meg.channel.link import LinkConfig, RateModel
from meg.channel.modem import Modulation
from meg.channel.pathloss import LinkBudget
from meg.channel.theory import Fading

_SWEEP = BerSweep()
_BUDGET = LinkBudget()
_LINK = LinkConfig()


def _parse_list(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    values = list(allowed) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise click.BadParameter(f"{', '.join(bad) or text!r} not in {', '.join(allowed)} (or 'all')", param_hint=option)
    return list(dict.fromkeys(values))


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from error
    if not values or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r} must hold finite numbers", param_hint=option)
    return values


@click.group()
def channel() -> None:
    """Wireless channel emulator: BER curves against theory, link budget and airtime."""


@channel.command("ber")
@click.option("--modulation", default=",".join(_SWEEP.modulations), show_default=True,
              help="bpsk, qpsk, 16qam, 64qam, a comma-separated list, or 'all'.")
@click.option("--fading", default=",".join(_SWEEP.fadings), show_default=True,
              help="awgn, rayleigh (fast), rician, a comma-separated list, or 'all'.")
@click.option("--snr-db", default=",".join(f"{v:g}" for v in _SWEEP.snr_db), show_default=True,
              help="Comma-separated Eb/N0 values in dB (energy per bit over noise density; mean Eb/N0 under fading).")
@click.option("--bits", default=_SWEEP.bits, show_default=True, type=click.IntRange(min=1), help="Bits per point.")
@click.option("--seed", default=_SWEEP.seed, show_default=True, help="Seed of the random generator.")
@click.option("--rician-k", default=_SWEEP.rician_k, show_default=True, type=click.FloatRange(min=0), help="Rician K-factor (linear).")
@click.option("--threads", default=_SWEEP.threads, show_default=True, type=click.IntRange(min=1), help="torch intra-op threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the rows to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a BER plot to this PNG file.")
def ber_command(
    modulation: str, fading: str, snr_db: str, bits: int, seed: int, rician_k: float, threads: int,
    json_path: Path | None, plot_path: Path | None,
) -> None:
    """Measure bit error rates through modem, fading, AWGN and zero-forcing; compare with theory.

    Rows: snr_db (Eb/N0 in dB), ber (measured), ber_theory (exact closed form), bits, errors.
    """
    import torch
    from rich.progress import Progress

    from meg.channel.ber import simulate_ber

    modulations = _parse_list(modulation, get_args(Modulation), "--modulation")
    fadings = _parse_list(fading, get_args(Fading), "--fading")
    points = _parse_floats(snr_db, "--snr-db")
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("BER", total=len(modulations) * len(fadings) * len(points))
        for fading_name in fadings:
            for modulation_name in modulations:
                rows += simulate_ber(
                    modulation_name, fading_name, points, bits, generator=generator,  # type: ignore[arg-type]
                    rician_k=rician_k, on_point=lambda _row: progress.advance(task),
                )
    table = Table("modulation", "fading", "Eb/N0 dB", "BER", "theory", "errors", "bits", title="Bit error rate")
    for row in rows:
        table.add_row(row.modulation, row.fading, f"{row.snr_db:g}", f"{row.ber:.3e}", f"{row.ber_theory:.3e}",
                      str(row.errors), str(row.bits))
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        config = {"modulations": modulations, "fadings": fadings, "snr_db": points, "bits": bits, "seed": seed,
                  "rician_k": rician_k, "snr_db_is": "Eb/N0 (dB)"}
        json_path.write_text(json.dumps({"config": config, "rows": [row.to_dict() for row in rows]}, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        from meg.channel.plot import plot_ber

        plot_ber(rows, plot_path, rician_k=rician_k)
        click.echo(f"wrote {plot_path}")


@channel.command("link")
@click.option("--distance-m", type=click.FloatRange(min=0, min_open=True), required=True, help="Distance (m).")
@click.option("--tx-power-dbm", default=_BUDGET.tx_power_dbm, show_default=True, help="Transmit power (dBm).")
@click.option("--bandwidth-hz", default=_BUDGET.bandwidth_hz, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Bandwidth (Hz).")
@click.option("--noise-dbm-hz", type=float, default=None,
              help=f"Noise power spectral density (dBm/Hz); default: --noise-dbm over the band ({_BUDGET.noise_dbm:g} dBm).")
@click.option("--noise-dbm", default=_BUDGET.noise_dbm, show_default=True, help="Total noise power over the band (dBm).")
@click.option("--pl-a-db", default=_BUDGET.pl_a_db, show_default=True, help="Path loss a + b log10(d): a (dB).")
@click.option("--pl-b-db", default=_BUDGET.pl_b_db, show_default=True, help="Path loss a + b log10(d): b (dB/decade).")
@click.option("--payload-bytes", type=click.IntRange(min=0), required=True, help="Bytes to send.")
@click.option("--fading", type=click.Choice(get_args(Fading)), default=_LINK.fading, show_default=True, help="Small-scale fading.")
@click.option("--rician-k", default=_LINK.rician_k, show_default=True, type=click.FloatRange(min=0), help="Rician K-factor.")
@click.option("--rate-model", type=click.Choice(get_args(RateModel)), default=_LINK.rate_model, show_default=True,
              help="shannon: B log2(1+SNR), loss in outage; uncoded: modem BER; mcs: coded MCS table.")
@click.option("--modulation", type=click.Choice(get_args(Modulation)), default=_LINK.modulation, show_default=True,
              help="Modem of the uncoded rate model.")
@click.option("--packet-bytes", default=_LINK.max_packet_bytes, show_default=True, type=click.IntRange(min=1),
              help="Largest payload per packet.")
@click.option("--overhead-bytes", default=_LINK.packet_overhead_bytes, show_default=True, type=click.IntRange(min=0),
              help="Header bytes per packet.")
@click.option("--max-retries", default=_LINK.max_retries, show_default=True, type=click.IntRange(min=0),
              help="Retransmissions per packet.")
@click.option("--seed", default=0, show_default=True, help="Seed of fading and packet losses.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the result to this JSON file.")
def link_command(
    distance_m: float, tx_power_dbm: float, bandwidth_hz: float, noise_dbm_hz: float | None, noise_dbm: float,
    pl_a_db: float, pl_b_db: float, payload_bytes: int, fading: str, rician_k: float, rate_model: str,
    modulation: str, packet_bytes: int, overhead_bytes: int, max_retries: int, seed: int, json_path: Path | None,
) -> None:
    """SNR, rate, airtime and transmit energy of sending PAYLOAD_BYTES over a link DISTANCE_M long."""
    import torch

    from meg.channel.capacity import rayleigh_ergodic_capacity_bps_hz, rayleigh_outage_probability
    from meg.channel.link import LinkEmulator
    from meg.errors import MegError

    try:
        budget = LinkBudget(tx_power_dbm=tx_power_dbm, bandwidth_hz=bandwidth_hz, noise_dbm=noise_dbm,
                            pl_a_db=pl_a_db, pl_b_db=pl_b_db, noise_dbm_hz=noise_dbm_hz)
        snr_db = budget.snr_db(distance_m)
        config = LinkConfig(
            mode="digital", snr_db=snr_db, bandwidth_hz=bandwidth_hz, fading=fading, rician_k=rician_k,  # type: ignore[arg-type]
            tx_power_dbm=tx_power_dbm, modulation=modulation, rate_model=rate_model,  # type: ignore[arg-type]
            packet_overhead_bytes=overhead_bytes, max_packet_bytes=packet_bytes, max_retries=max_retries, on_loss="report",
        )
        link = LinkEmulator(config, generator=torch.Generator().manual_seed(seed))
        report = link.send_bytes(payload_bytes)
    except MegError as error:
        raise click.BadParameter(error.message, param_hint=f"--{(error.field or 'value').replace('_', '-')}") from error
    rate_bps = link.rate_bps(8 * (min(packet_bytes, max(payload_bytes, 1)) + overhead_bytes))
    result: dict[str, object] = {
        "distance_m": distance_m, "path_loss_db": budget.path_loss_db(distance_m), "noise_dbm": budget.noise_power_dbm,
        "snr_db": snr_db, "rate_model": rate_model, "rate_bps": rate_bps, "fading": fading,
        "payload_bytes": payload_bytes, "packets": report.packets, "retransmissions": report.retransmissions,
        "airtime_s": report.airtime_s, "energy_j": report.energy_j, "delivered": report.delivered,
    }
    if fading == "rayleigh":
        result["ergodic_capacity_bps"] = float(rayleigh_ergodic_capacity_bps_hz(snr_db)) * bandwidth_hz
        result["outage_probability"] = float(rayleigh_outage_probability(rate_bps / bandwidth_hz, snr_db))
    if rate_model == "mcs":
        result["mcs"] = link.mcs(8 * (min(packet_bytes, max(payload_bytes, 1)) + overhead_bytes)).index
    table = Table("quantity", "value", title=f"Link at {distance_m:g} m")
    units = {"distance_m": "m", "path_loss_db": "dB", "noise_dbm": "dBm", "snr_db": "dB", "rate_bps": "bit/s",
             "airtime_s": "s", "energy_j": "J", "ergodic_capacity_bps": "bit/s", "payload_bytes": "B"}
    for key, value in result.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, f"{text} {units.get(key, '')}".rstrip())
    Console().print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        click.echo(f"wrote {json_path}")
    if not report.delivered:
        click.echo(f"a packet was lost after {max_retries + 1} attempts at {snr_db:.2f} dB", err=True)
        sys.exit(1)
