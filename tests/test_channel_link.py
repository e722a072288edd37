"""LinkEmulator: airtime and energy accounting, ARQ statistics, losses, analog feature noise."""

from __future__ import annotations

import math

import pytest
import torch

from meg.channel.capacity import rayleigh_outage_probability, shannon_rate_bps
from meg.channel.link import LinkConfig, LinkEmulator, config_from_channel_state
from meg.channel.mcs import MCS_TABLE, select_mcs
from meg.channel.theory import ber_theory
from meg.errors import ChannelError, InvalidInputError, NonFiniteError
from meg.v1 import generation_pb2


def _link(seed: int = 0, **fields: object) -> LinkEmulator:
    return LinkEmulator(LinkConfig(**fields), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]


def test_ideal_link_costs_nothing_and_changes_nothing() -> None:
    link = _link()
    report = link.send_packets([100, 2000, 0])
    assert (report.payload_bytes, report.packets, report.airtime_s, report.energy_j, report.delivered) == (2100, 3, 0.0, 0.0, True)
    x = torch.randn(3, 7)
    y, analog = link.send_analog(x)
    assert torch.equal(x, y) and analog.feature_snr_db == math.inf and analog.symbols == 11


def test_digital_airtime_counts_overhead_and_energy_is_power_times_airtime() -> None:
    link = _link(mode="digital", snr_db=20.0, bandwidth_hz=1e6, tx_power_dbm=30.0)
    sizes = [1 << 20, 1 << 20, 12345]
    report = link.send_packets(sizes)
    expected_airtime = sum(8 * (s + 40) for s in sizes) / shannon_rate_bps(20.0, 1e6)
    assert report.retransmissions == 0 and report.delivered
    assert report.airtime_s == pytest.approx(expected_airtime)
    assert report.energy_j == pytest.approx(1.0 * expected_airtime)  # 30 dBm = 1 W
    fixed = _link(mode="digital", rate_bps=1e6, tx_power_dbm=20.0, packet_overhead_bytes=0).send_packets([125_000])
    assert fixed.airtime_s == pytest.approx(1.0) and fixed.energy_j == pytest.approx(0.1)


def test_send_bytes_splits_into_wire_sized_packets() -> None:
    link = _link(mode="digital", rate_bps=1e6, packet_overhead_bytes=10, max_packet_bytes=1000)
    report = link.send_bytes(2500)
    assert (report.packets, report.payload_bytes) == (3, 2500)
    assert report.airtime_s == pytest.approx(8 * (2500 + 3 * 10) / 1e6)
    assert link.send_bytes(0).packets == 0
    with pytest.raises(InvalidInputError, match="-1"):
        link.send_bytes(-1)


def test_retransmissions_follow_the_packet_error_rate() -> None:
    # QPSK at Es/N0 = 9 dB (Eb/N0 = 6 dB) and 320-bit packets: PER ≈ 0.53
    link = _link(7, mode="digital", snr_db=9.0, rate_model="uncoded", packet_overhead_bytes=4, max_retries=60)
    per = link.packet_error_rate(9.0, 320)
    ber = float(ber_theory("qpsk", 9.0 - 10 * math.log10(2)))
    assert per == pytest.approx(1 - (1 - ber) ** 320)
    assert 0.4 < per < 0.7
    packets = 3000
    report = link.send_packets([36] * packets)
    # failures before success are geometric: mean p/(1−p), variance p/(1−p)^2
    mean, sd = per / (1 - per), math.sqrt(per) / (1 - per)
    assert abs(report.retransmissions / packets - mean) < 5 * sd / math.sqrt(packets)
    assert link.rate_bps() == 2e6  # uncoded QPSK: 2 bits per symbol, B symbols/s
    assert report.airtime_s == pytest.approx((packets + report.retransmissions) * 320 / 2e6)


def test_shannon_rate_loses_packets_exactly_in_outage() -> None:
    awgn = _link(mode="digital", snr_db=-3.0, max_retries=0).send_packets([1500] * 50)
    assert awgn.retransmissions == 0 and awgn.delivered
    link = _link(11, mode="digital", snr_db=10.0, fading="rayleigh", max_retries=80)
    packets = 2000
    report = link.send_packets([100] * packets)
    # rate = capacity of the mean SNR: P(outage) = 1 − exp(−(2^R − 1)/γ̄) = 1 − e^{−1}
    p = float(rayleigh_outage_probability(math.log2(1 + 10.0), 10.0))
    assert p == pytest.approx(1 - math.exp(-1))
    mean, sd = p / (1 - p), math.sqrt(p) / (1 - p)
    assert abs(report.retransmissions / packets - mean) < 5 * sd / math.sqrt(packets)


def test_exhausted_retries_raise_or_report() -> None:
    with pytest.raises(ChannelError, match="packet 0 .*3 attempts") as info:
        _link(mode="digital", snr_db=-5.0, rate_model="uncoded", max_retries=2).send_packets([1500, 1500])
    assert info.value.field == "snr_db"
    fields = {"mode": "digital", "snr_db": -5.0, "rate_model": "uncoded", "max_retries": 2, "on_loss": "report"}
    report = _link(**fields).send_packets([1500, 1500])
    assert not report.delivered and report.retransmissions == 2
    assert report.airtime_s == pytest.approx(3 * 8 * 1540 / 2e6)


def test_mcs_rate_model() -> None:
    # the fit is continuous at each threshold: a · exp(−g γ_p) = 1
    for entry in MCS_TABLE:
        assert entry.per_a * math.exp(-entry.per_g * 10 ** (entry.threshold_snr_db / 10)) == pytest.approx(1.0, abs=0.01)
    chosen = [select_mcs(snr).index for snr in range(-2, 25)]
    assert chosen == sorted(chosen) and chosen[0] == 0 and chosen[-1] == 5
    link = _link(mode="digital", snr_db=12.0, rate_model="mcs")
    bits = 8 * (1500 + 40)
    entry = link.mcs(bits)
    assert entry.packet_error_rate(12.0, bits) <= 0.1
    assert link.rate_bps(bits) == pytest.approx(entry.bits_per_symbol * 1e6)
    report = link.send_packets([1500] * 200)
    assert report.delivered and report.airtime_s >= 200 * bits / link.rate_bps(bits)
    # longer packets fail more often at the same SNR
    assert entry.packet_error_rate(12.0, 10 * bits) > entry.packet_error_rate(12.0, bits)


def test_fading_process_has_memory() -> None:
    n = 5000
    link = _link(3, mode="digital", fading="rayleigh", fading_correlation=0.9)
    gains = torch.tensor([link.next_gain() for _ in range(n)], dtype=torch.complex128)
    lag1 = (gains[1:] * gains[:-1].conj()).mean().real / gains.abs().square().mean()
    assert abs(lag1.item() - 0.9) < 5 * math.sqrt((1 - 0.81) / n) * 2
    independent = _link(3, mode="digital", fading="rayleigh")
    gains0 = torch.tensor([independent.next_gain() for _ in range(n)], dtype=torch.complex128)
    assert abs((gains0[1:] * gains0[:-1].conj()).mean().real.item()) < 5 / math.sqrt(n)


def test_analog_awgn_feature_snr_equals_channel_snr() -> None:
    x = torch.randn(4, 1000, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y, report = _link(mode="analog", snr_db=10.0).send_analog(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert report.symbols == x.numel() // 2 and report.airtime_s == pytest.approx(report.symbols / 1e6)
    measured = 10 * math.log10(float(x.square().sum() / (y - x).square().sum()))
    assert report.feature_snr_db == pytest.approx(measured, abs=1e-3)
    # ZF over AWGN: noise per value N0·P against power P → feature SNR = Es/N0; 64000 values
    assert report.feature_snr_db == pytest.approx(10.0, abs=5 * 10 / math.log(10) * math.sqrt(2 / x.numel()))


def test_analog_block_fading_scales_the_snr_by_the_drawn_gain() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(2))
    _, report = _link(5, mode="analog", snr_db=15.0, fading="rayleigh").send_analog(x)
    gain = _link(5, mode="analog", snr_db=15.0, fading="rayleigh").next_gain()  # same first draw
    assert report.feature_snr_db == pytest.approx(15.0 + 10 * math.log10(abs(gain) ** 2), abs=0.3)


def test_analog_mmse_has_lower_error_than_zf_in_fast_fading() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    fields = {"mode": "analog", "snr_db": 5.0, "fading": "rayleigh", "coherence_symbols": 1}
    y_zf, zf = _link(4, **fields).send_analog(x)
    y_mmse, mmse = _link(4, **fields, equalizer="mmse").send_analog(x)
    assert y_zf.shape == (3, 5, 7) and y_zf.dtype == torch.float16 and zf.symbols == 53
    assert mmse.feature_snr_db > zf.feature_snr_db
    again, _ = _link(4, **fields).send_analog(x)
    assert torch.equal(again, y_zf)


def test_analog_input_checks() -> None:
    link = _link(mode="analog")
    with pytest.raises(NonFiniteError):
        link.send_analog(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InvalidInputError, match="int64"):
        link.send_analog(torch.arange(4))
    with pytest.raises(InvalidInputError, match="digital"):
        _link(mode="digital").send_analog(torch.zeros(4))
    zeros, report = link.send_analog(torch.zeros(5))
    assert torch.equal(zeros, torch.zeros(5)) and report.feature_snr_db == math.inf
    with pytest.raises(InvalidInputError, match="-3") as info:
        link.send_packets([10, -3])
    assert info.value.field == "sizes_bytes"


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "smoke"), ("fading", "rain"), ("modulation", "8psk"), ("bandwidth_hz", 0.0), ("snr_db", float("nan")),
     ("max_retries", -1), ("fading_correlation", 2.0), ("rate_model", "lte")],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        LinkConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field and str(value) in str(info.value)


def test_config_from_wire_channel_state() -> None:
    state = generation_pb2.ChannelState(
        snr_db=3.5, bandwidth_hz=2e6, fading=generation_pb2.FADING_MODEL_RICIAN, rician_k=5.0,
        mode=generation_pb2.TRANSPORT_MODE_ANALOG,
    )
    config = config_from_channel_state(state, equalizer="mmse")
    assert (config.snr_db, config.bandwidth_hz, config.fading, config.rician_k, config.mode, config.equalizer) == (
        3.5, 2e6, "rician", 5.0, "analog", "mmse")
    assert config.tx_power_dbm == LinkConfig().tx_power_dbm
    assert config_from_channel_state(generation_pb2.ChannelState()).mode == "ideal"
